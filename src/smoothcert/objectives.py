"""Training objectives on logits [B, k, C] (Gaussian augmentation, ADREREG) and the method registry
(Gaussian, ADRE, SmoothAdv, ADREADV): one function per method, one registry line each."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoothcert.attacks import noisy_logits, runner_up, smooth_pgd_l2, smoothed_log_probs


def _check_lam(lam: float) -> None:
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def adre_loss(
    logits: Tensor,
    y: Tensor,
    lam: float,
    single_draw: bool = False,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    floor: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADREREG loss mean_i(l_per − lam·l_adre) of logits [B, k, C] (paper Algorithm 1).

    l_per is the CE averaged over the k draws, or, with `single_draw`, the CE of one draw per
    example picked uniformly with `generator`; l_adre = −log max(Ĝ_ŷ, floor) with ŷ the
    runner-up of the averaged softmax Ĝ. Returns the loss and the detached batch means of
    l_per and l_adre.

    With floor = 0 the regulariser is unbounded below and its gradient never vanishes, so a
    network can lower the loss forever by inflating its logits (LeNet on MNIST diverged this
    way); a floor > 0 stops the push once the runner-up is below it, as the probability-space
    form log(Ĝ + eps) of common implementations does.
    """
    if not (math.isfinite(floor) and 0 <= floor < 1):
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    if logits.dim() != 3 or logits.shape[1] < 1 or logits.shape[2] < 2:
        raise ValueError(
            f"logits must have shape [B, k, C] with k >= 1, C >= 2, got {tuple(logits.shape)}"
        )
    if y.shape != logits.shape[:1]:
        raise ValueError(f"y must have shape [{logits.shape[0]}], got {tuple(y.shape)}")
    _check_lam(lam)
    _check_label_smoothing(label_smoothing)
    b, k, _ = logits.shape

    if single_draw:
        device = logits.device if generator is None else generator.device
        j = torch.randint(k, (b,), generator=generator, device=device).to(logits.device)
        l_per = F.cross_entropy(
            logits[torch.arange(b, device=logits.device), j], y, label_smoothing=label_smoothing
        )
    else:
        # One CE over all B*k noisy inputs: with lam = 0 this is Gaussian augmentation exactly.
        l_per = F.cross_entropy(
            logits.flatten(0, 1), y.repeat_interleave(k), label_smoothing=label_smoothing
        )
    log_g = smoothed_log_probs(logits)
    log_runner_up = log_g.gather(1, runner_up(log_g, y).unsqueeze(1))
    if floor > 0:
        log_runner_up = log_runner_up.clamp(min=math.log(floor))
    l_adre = -log_runner_up.mean()
    loss = l_per - lam * l_adre if lam > 0 else l_per
    return loss, {"l_per": l_per.detach(), "l_adre": l_adre.detach()}


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters of a training method; fields a method does not use are ignored."""

    lam: float = 0.0
    k: int = 1
    eps: float = 0.0
    steps: int = 1
    single_draw: bool = False
    label_smoothing: float = 0.0
    adre_floor: float = 1e-6

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        if self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")
        _check_label_smoothing(self.label_smoothing)
        if not (math.isfinite(self.adre_floor) and 0 <= self.adre_floor < 1):
            raise ValueError(f"adre_floor must be in [0, 1), got {self.adre_floor}")


Method = Callable[
    [nn.Module, Tensor, Tensor, Tensor, MethodConfig], tuple[Tensor, dict[str, Tensor]]
]


def _loss_at(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: Tensor,
    cfg: MethodConfig,
    lam: float,
    single_draw: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """adre_loss on the model's logits at x + noise, plus the noisy accuracy."""
    if noise.shape != (x.shape[0], cfg.k, *x.shape[1:]):
        raise ValueError(
            f"noise must have shape [B, k, *x.shape[1:]] = "
            f"{[x.shape[0], cfg.k, *x.shape[1:]]}, got {list(noise.shape)}"
        )
    logits = noisy_logits(model, x, noise)
    loss, terms = adre_loss(
        logits, y, lam, single_draw=single_draw, label_smoothing=cfg.label_smoothing,
        floor=cfg.adre_floor,
    )
    terms["acc"] = (logits.detach().argmax(dim=-1) == y.unsqueeze(1)).float().mean()
    return loss, terms


def gaussian(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: MethodConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gaussian augmentation (Cohen 2019); with k > 1 the mean CE over the k draws (Salman 2019)."""
    return _loss_at(model, x, y, noise, cfg, 0.0, False)


def adre(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: MethodConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADREREG (Feng 2020, Algorithm 1)."""
    return _loss_at(model, x, y, noise, cfg, cfg.lam, cfg.single_draw)


def smoothadv(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: MethodConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """SmoothAdv (Salman 2019): Gaussian augmentation at the smoothed classifier's PGD point."""
    x_adv = smooth_pgd_l2(model, x, y, noise, cfg.eps, cfg.steps)
    return _loss_at(model, x_adv, y, noise, cfg, 0.0, False)


def adreadv(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: MethodConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADREADV (Feng 2020): ADREREG at the PGD point of the ADRE-regularised attack."""
    x_adv = smooth_pgd_l2(model, x, y, noise, cfg.eps, cfg.steps, lam=cfg.lam)
    return _loss_at(model, x_adv, y, noise, cfg, cfg.lam, cfg.single_draw)


METHODS: dict[str, Method] = {
    "gaussian": gaussian,
    "adre": adre,
    "smoothadv": smoothadv,
    "adreadv": adreadv,
}


def get_method(name: str) -> Method:
    """The training method registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
