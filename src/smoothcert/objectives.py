"""Training objectives on logits [B, k, C] and their registry: Gaussian augmentation,
ADREREG, SmoothAdv, ADREADV, and the baselines MACER, Consistency and SmoothMix. Each objective
is one function, registered with `@register_objective(name, config=ItsConfig)`, and one config
dataclass whose fields are its `train` options.

The baselines are written from the papers' method sections (equations and algorithm boxes):
MACER (Zhai et al., ICLR 2020, Sec. 4 and Algorithm 1), consistency regularisation (Jeong & Shin,
NeurIPS 2020, Sec. 3) and SmoothMix (Jeong et al., NeurIPS 2021, Sec. 3). Their hyper-parameters
and the papers' values are documented on their config classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, make_dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoothcert.attacks import noisy_logits, runner_up, smooth_pgd_l2, smoothed_log_probs


def _check_lam(lam: float, name: str = "lam") -> None:
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {lam}")


def _check_positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 3 or logits.shape[1] < 1 or logits.shape[2] < 2:
        raise ValueError(
            f"logits must have shape [B, k, C] with k >= 1, C >= 2, got {tuple(logits.shape)}"
        )
    if y.shape != logits.shape[:1]:
        raise ValueError(f"y must have shape [{logits.shape[0]}], got {tuple(y.shape)}")


def _at_least_float32(logits: Tensor) -> Tensor:
    # Under autocast the logits may be half precision; probabilities are taken in float32.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def gaussian_ce(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over every example and draw of logits [B, k, C] (Gaussian
    augmentation, Cohen et al. 2019; with k > 1 the mean over the draws, Salman et al. 2019)."""
    return F.cross_entropy(
        logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]), label_smoothing=label_smoothing
    )


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
    _check_logits(logits, y)
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
        l_per = gaussian_ce(logits, y, label_smoothing)
    log_g = smoothed_log_probs(logits)
    log_runner_up = log_g.gather(1, runner_up(log_g, y).unsqueeze(1))
    if floor > 0:
        log_runner_up = log_runner_up.clamp(min=math.log(floor))
    l_adre = -log_runner_up.mean()
    loss = l_per - lam * l_adre if lam > 0 else l_per
    return loss, {"l_per": l_per.detach(), "l_adre": l_adre.detach()}


def macer_loss(
    logits: Tensor, y: Tensor, sigma: float, lam: float, beta: float, gamma: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """MACER (Zhai et al. 2020, Algorithm 1) on logits [B, k, C]: l_C + lam · l_R.

    l_C = mean_i −log Ĝ_y(x_i), the cross-entropy of the soft smoothed classifier
    Ĝ = mean_j softmax(logits_j). The robustness term uses the soft smoothed classifier with
    inverse temperature beta, Ĝ^β = mean_j softmax(beta · logits_j) (Sec. 4.2): on the examples
    it classifies correctly (the set G_θ), with ξ = Φ⁻¹(Ĝ^β_y) − Φ⁻¹(Ĝ^β_ŷ) and ŷ its runner-up,
    (σ/2)·ξ is the certified radius of Cohen et al. and l_R = (1/B) Σ_{i∈G_θ} (σ/2)·max(γ − ξ_i, 0)
    (Sec. 4.1, the hinge on the radius). G_θ and ŷ are chosen without gradient; an example
    with a saturated Ĝ^β (ξ = ∞) is outside the hinge. Returns the loss and the detached l_C
    (as l_per) and l_R (as l_macer).
    """
    _check_logits(logits, y)
    _check_positive(sigma, "sigma")
    _check_lam(lam, "macer_lam")
    _check_positive(beta, "macer_beta")
    _check_positive(gamma, "macer_gamma")
    logits = _at_least_float32(logits)
    l_c = F.nll_loss(smoothed_log_probs(logits), y)
    g_beta = torch.softmax(beta * logits, dim=-1).mean(dim=1)
    second = runner_up(g_beta, y)
    with torch.no_grad():
        xi = torch.special.ndtri(g_beta.gather(1, y[:, None])) - torch.special.ndtri(
            g_beta.gather(1, second[:, None])
        )
        active = (g_beta.argmax(dim=1) == y) & (xi.squeeze(1) < gamma)
    # ξ again, with gradient, on the hinge's examples only: elsewhere Φ⁻¹ may be infinite and
    # its gradient would turn the zero of the hinge into NaN.
    rows = active.nonzero().squeeze(1)
    xi_active = torch.special.ndtri(g_beta[rows, y[rows]]) - torch.special.ndtri(
        g_beta[rows, second[rows]]
    )
    l_r = (sigma / 2) * (gamma - xi_active).sum() / logits.shape[0]
    loss = l_c + lam * l_r if lam > 0 else l_c
    return loss, {"l_per": l_c.detach(), "l_macer": l_r.detach()}


def consistency_loss(
    logits: Tensor,
    y: Tensor,
    lam: float,
    eta: float,
    adre_lam: float = 0.0,
    label_smoothing: float = 0.0,
    adre_floor: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Consistency regularisation (Jeong & Shin 2020, Sec. 3.2) on logits [B, m, C].

    mean_j CE(F(x+δ_j), y) + lam · mean_j KL(F̂(x) ‖ F(x+δ_j)) + eta · H(F̂(x)), with F the
    softmax, F̂ = mean_j F(x+δ_j) and H the entropy; no stop-gradient (the paper writes none).
    With adre_lam > 0, ADRE's −adre_lam·l_adre (runner-up of F̂, floored at adre_floor) is
    added on top. lam = eta = adre_lam = 0 is Gaussian augmentation exactly. Logs l_per,
    l_adre, l_kl and l_ent (batch means).
    """
    _check_lam(lam, "consistency_lam")
    _check_lam(eta, "consistency_eta")
    loss, terms = adre_loss(logits, y, adre_lam, label_smoothing=label_smoothing, floor=adre_floor)
    log_p = F.log_softmax(_at_least_float32(logits), dim=-1)
    log_mean = smoothed_log_probs(logits)
    mean = log_mean.exp()
    l_kl = (mean.unsqueeze(1) * (log_mean.unsqueeze(1) - log_p)).sum(dim=-1).mean()
    l_ent = -(mean * log_mean).sum(dim=-1).mean()
    if lam > 0 or eta > 0:
        loss = loss + lam * l_kl + eta * l_ent
    return loss, {**terms, "l_kl": l_kl.detach(), "l_ent": l_ent.detach()}


def smoothmix_loss(
    logits: Tensor,
    logits_mix: Tensor,
    y: Tensor,
    mix: Tensor,
    eta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SmoothMix (Jeong et al. 2021, Sec. 3) on logits [B, m, C] at x + δ_j and logits_mix
    [B, m, C] at x_mix + δ_j, x_mix = (1 − mix)·x + mix·x_adv with mix [B] in [0, 1/2].

    L_nat + eta · L_mix: L_nat = mean_j CE(F(x+δ_j), y) (Gaussian augmentation); the mixup
    target ỹ = (1 − mix)·F̂(x) + mix·(1/C) moves the soft smoothed prediction F̂ = mean_j F(x+δ_j)
    towards the uniform distribution along the adversarial direction, and
    L_mix = (1/(B·m)) Σ_i 1[argmax F̂(x_i) = y_i] Σ_j KL(ỹ_i ‖ F(x_mix,i + δ_ij)), on the
    examples F̂ classifies correctly. The indicator carries no gradient; ỹ does (the paper
    writes no stop-gradient). eta = 0 is Gaussian augmentation exactly. Logs l_per (= L_nat)
    and l_mix.
    """
    _check_logits(logits, y)
    if logits_mix.shape != logits.shape:
        raise ValueError(
            f"logits_mix must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(logits_mix.shape)}"
        )
    if mix.shape != y.shape:
        raise ValueError(f"mix must have shape [{y.shape[0]}], got {tuple(mix.shape)}")
    _check_lam(eta, "smoothmix_eta")
    _check_label_smoothing(label_smoothing)
    l_nat = gaussian_ce(logits, y, label_smoothing)
    log_mean = smoothed_log_probs(logits)
    correct = (log_mean.detach().argmax(dim=1) == y).float()
    mix = mix.to(log_mean.dtype).unsqueeze(1)
    target = (1 - mix) * log_mean.exp() + mix / logits.shape[2]
    log_q = F.log_softmax(_at_least_float32(logits_mix), dim=-1)
    kl = (torch.special.xlogy(target, target).unsqueeze(1) - target.unsqueeze(1) * log_q).sum(-1)
    l_mix = (correct.unsqueeze(1) * kl).mean()
    loss = l_nat + eta * l_mix if eta > 0 else l_nat
    return loss, {"l_per": l_nat.detach(), "l_mix": l_mix.detach()}


def _help(text: str, default, **kwargs):
    """A config field with its `train --help` text."""
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class CommonConfig:
    """The settings every objective receives. `sigma` is the training noise level; `warmup`,
    the epoch's warm-up factor in (0, 1], is set by the trainer (`TrainConfig.objective_config`).

    An objective's own config subclasses this one; its fields are `train` options (`--name`,
    help from the field's metadata) and TrainConfig fields of the same name. at_epoch applies
    the warm-ups; check_training refuses settings that would not train."""

    k: int = _help("Gaussian draws per example", 1)
    label_smoothing: float = _help("label smoothing of the cross-entropy, in [0, 1)", 0.0)
    adre_floor: float = _help(
        "l_adre = -log max(G_runner-up, floor); 0 = unbounded (may diverge)", 1e-6
    )
    sigma: float = _help("training noise level", 0.25)
    warmup: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k}")
        _check_label_smoothing(self.label_smoothing)
        if not (math.isfinite(self.adre_floor) and 0 <= self.adre_floor < 1):
            raise ValueError(f"adre_floor must be in [0, 1), got {self.adre_floor}")
        _check_positive(self.sigma, "sigma")
        if not 0 < self.warmup <= 1:
            raise ValueError(f"warmup must be in (0, 1], got {self.warmup}")

    def at_epoch(self, epoch: int, warmup: float) -> CommonConfig:
        """These settings in `epoch` (0-based), whose warm-up factor is `warmup`."""
        return replace(self, warmup=warmup)

    def check_training(self, objective: str) -> None:
        """Raise ValueError if training `objective` with these settings would be meaningless."""


@dataclass(frozen=True)
class LamConfig(CommonConfig):
    lam: float = _help("ADRE regularisation weight lambda (>= 0)", 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lam(self.lam)


@dataclass(frozen=True)
class AdreConfig(LamConfig):
    """ADREREG (Feng et al. 2020, Algorithm 1)."""

    single_draw: bool = _help(
        "l_per from one random draw per example (the paper's Table-1 variant)", False
    )


@dataclass(frozen=True)
class StepsConfig(CommonConfig):
    steps: int = _help("PGD steps", 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")


@dataclass(frozen=True)
class AttackConfig(StepsConfig):
    """An L2 PGD attack of radius eps, warmed up with the epochs (SmoothAdv, ADREADV)."""

    eps: float = _help("L2 attack radius for smoothadv/adreadv", 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")

    def at_epoch(self, epoch: int, warmup: float) -> AttackConfig:
        return replace(super().at_epoch(epoch, warmup), eps=self.eps * warmup)

    def check_training(self, objective: str) -> None:
        super().check_training(objective)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 for objective {objective}, got {self.eps}")


@dataclass(frozen=True)
class AdreAdvConfig(AdreConfig, AttackConfig):
    """ADREADV (Feng et al. 2020): ADREREG at the point of the ADRE-regularised attack."""


@dataclass(frozen=True)
class MacerConfig(CommonConfig):
    """MACER (Zhai et al. 2020). Paper values (CIFAR-10, ResNet-110): k = 16, β = 16, γ = 8,
    λ = 12 at σ = 0.25 and 0.5, λ = 4 at σ = 1.0. The MNIST runs of later papers use λ = 16
    (σ ≤ 0.5) and 6 (σ = 1), deferring the robustness term to the first lr decay."""

    macer_lam: float = _help("MACER's robustness weight lambda (>= 0)", 12.0)
    macer_beta: float = _help("MACER's inverse temperature beta (> 0)", 16.0)
    macer_gamma: float = _help("MACER's hinge on the radius gamma (> 0)", 8.0)
    macer_defer: int = _help("epochs trained with macer_lam 0 before the robustness term", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lam(self.macer_lam, "macer_lam")
        _check_positive(self.macer_beta, "macer_beta")
        _check_positive(self.macer_gamma, "macer_gamma")

    def at_epoch(self, epoch: int, warmup: float) -> MacerConfig:
        warmed = super().at_epoch(epoch, warmup)
        return replace(warmed, macer_lam=0.0) if epoch < self.macer_defer else warmed


@dataclass(frozen=True)
class ConsistencyConfig(LamConfig):
    """Consistency regularisation (Jeong & Shin 2020); lam adds ADRE's regulariser. Paper values
    (CIFAR-10, ResNet-110): m = k = 2, η = 0.5, λ = 20 at σ = 0.25 and λ = 10 at σ = 0.5 and 1.0
    (the models behind the published ACRs 0.552 / 0.720 / 0.756)."""

    consistency_lam: float = _help("consistency weight lambda (>= 0)", 10.0)
    consistency_eta: float = _help("entropy weight eta (>= 0)", 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lam(self.consistency_lam, "consistency_lam")
        _check_lam(self.consistency_eta, "consistency_eta")


@dataclass(frozen=True)
class SmoothMixConfig(StepsConfig):
    """SmoothMix (Jeong et al. 2021). Paper values (CIFAR-10, ResNet-110): m = k = 2, steps
    T = 4, α = 0.5 / 1.0 / 2.0 at σ = 0.25 / 0.5 / 1.0, η = 5, smoothmix_mix_step 0 (1: the
    "one-step adversary" variant). The warm-up scales η and the one-step adversary's radius."""

    smoothmix_eta: float = _help("weight eta of the mixup loss (>= 0)", 5.0)
    smoothmix_step: float = _help("length alpha of each adversarial step (> 0)", 1.0)
    smoothmix_mix_step: int = _help("adversary step of the clean end (0: x itself)", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_lam(self.smoothmix_eta, "smoothmix_eta")
        _check_positive(self.smoothmix_step, "smoothmix_step")
        if not 0 <= self.smoothmix_mix_step < self.steps:
            raise ValueError(
                f"smoothmix_mix_step must be an integer in [0, steps) = [0, {self.steps}), "
                f"got {self.smoothmix_mix_step}"
            )


Objective = Callable[[nn.Module, Tensor, Tensor, Tensor, Any], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class RegisteredObjective:
    function: Objective
    config: type[CommonConfig]


_REGISTRY: dict[str, RegisteredObjective] = {}
# name -> function, for scripts written against the registry's first form.
OBJECTIVES: dict[str, Objective] = {}


def register_objective(
    name: str, config: type[CommonConfig] = CommonConfig
) -> Callable[[Objective], Objective]:
    """Register the decorated `fn(model, x, y, noise, cfg) -> (loss, terms)` as objective `name`,
    trained with the settings of `config` (a CommonConfig subclass). A field that another
    objective's config also has must agree with it in type and default: they are one option."""

    def register(fn: Objective) -> Objective:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered")
        known = {f.name: (f.type, f.default) for f in option_fields()}
        for f in fields(config):
            if known.get(f.name, (f.type, f.default)) != (f.type, f.default):
                raise ValueError(f"objective {name}: field {f.name} differs from the option of "
                                 "the same name of another objective")
        _REGISTRY[name] = RegisteredObjective(fn, config)
        OBJECTIVES[name] = fn
        return fn

    return register


def list_objectives() -> list[str]:
    """The registered objectives' names, in registration order (`smoothcert objectives`)."""
    return list(_REGISTRY)


def get_objective(name: str) -> Objective:
    """The training objective registered under `name`."""
    return _registered(name).function


def objective_config_class(name: str) -> type[CommonConfig]:
    """The config dataclass of the objective registered under `name`."""
    return _registered(name).config


def _registered(name: str) -> RegisteredObjective:
    if name not in _REGISTRY:
        raise ValueError(f"objective must be one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def option_fields() -> list[Field]:
    """Every registered config's fields, each name once, in registration order."""
    seen: dict[str, Field] = {}
    for entry in _REGISTRY.values():
        for f in fields(entry.config):
            seen.setdefault(f.name, f)
    return list(seen.values())


def readers(option: str) -> list[str]:
    """The objectives whose config has the field `option`."""
    return [name for name, entry in _REGISTRY.items()
            if option in {f.name for f in fields(entry.config)}]


def check_options(values: Mapping[str, Any]) -> None:
    """Validate `values` against every registered config (each with the fields it has)."""
    for entry in _REGISTRY.values():
        names = {f.name for f in fields(entry.config)}
        entry.config(**{key: value for key, value in values.items() if key in names})


def _check_noise(x: Tensor, noise: Tensor, cfg: CommonConfig) -> None:
    if noise.shape != (x.shape[0], cfg.k, *x.shape[1:]):
        raise ValueError(
            f"noise must have shape [B, k, *x.shape[1:]] = "
            f"{[x.shape[0], cfg.k, *x.shape[1:]]}, got {list(noise.shape)}"
        )


def _logits(model: nn.Module, x: Tensor, noise: Tensor, cfg: CommonConfig) -> Tensor:
    """The model's logits [B, k, C] at every x_i + noise_ij, after checking the noise's shape."""
    _check_noise(x, noise, cfg)
    return noisy_logits(model, x, noise)


def _noisy_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(dim=-1) == y.unsqueeze(1)).float().mean()


def _loss_at(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: Tensor,
    cfg: CommonConfig,
    lam: float,
    single_draw: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """adre_loss on the model's logits at x + noise, plus the noisy accuracy."""
    logits = _logits(model, x, noise, cfg)
    loss, terms = adre_loss(
        logits, y, lam, single_draw=single_draw, label_smoothing=cfg.label_smoothing,
        floor=cfg.adre_floor,
    )
    terms["acc"] = _noisy_accuracy(logits, y)
    return loss, terms


@register_objective("gaussian", config=CommonConfig)
def gaussian(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: CommonConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gaussian augmentation (Cohen 2019); with k > 1 the mean CE over the k draws (Salman 2019)."""
    return _loss_at(model, x, y, noise, cfg, 0.0, False)


@register_objective("adre", config=AdreConfig)
def adre(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: AdreConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADREREG (Feng 2020, Algorithm 1)."""
    return _loss_at(model, x, y, noise, cfg, cfg.lam, cfg.single_draw)


@register_objective("smoothadv", config=AttackConfig)
def smoothadv(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: AttackConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """SmoothAdv (Salman 2019): Gaussian augmentation at the smoothed classifier's PGD point."""
    x_adv = smooth_pgd_l2(model, x, y, noise, cfg.eps, cfg.steps)
    return _loss_at(model, x_adv, y, noise, cfg, 0.0, False)


@register_objective("adreadv", config=AdreAdvConfig)
def adreadv(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: AdreAdvConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADREADV (Feng 2020): ADREREG at the PGD point of the ADRE-regularised attack."""
    x_adv = smooth_pgd_l2(model, x, y, noise, cfg.eps, cfg.steps, lam=cfg.lam)
    return _loss_at(model, x_adv, y, noise, cfg, cfg.lam, cfg.single_draw)


@register_objective("macer", config=MacerConfig)
def macer(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: MacerConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """MACER (Zhai 2020): see macer_loss; k noisy copies per example."""
    logits = _logits(model, x, noise, cfg)
    loss, terms = macer_loss(
        logits, y, cfg.sigma, cfg.macer_lam, cfg.macer_beta, cfg.macer_gamma
    )
    terms["acc"] = _noisy_accuracy(logits, y)
    return loss, terms


@register_objective("consistency", config=ConsistencyConfig)
def consistency(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: ConsistencyConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Consistency regularisation (Jeong & Shin 2020) over k = m noisy copies; with lam > 0 plus
    ADRE's regulariser −lam·l_adre (see consistency_loss)."""
    logits = _logits(model, x, noise, cfg)
    loss, terms = consistency_loss(
        logits, y, cfg.consistency_lam, cfg.consistency_eta, adre_lam=cfg.lam,
        label_smoothing=cfg.label_smoothing, adre_floor=cfg.adre_floor,
    )
    terms["acc"] = _noisy_accuracy(logits, y)
    return loss, terms


@register_objective("smoothmix", config=SmoothMixConfig)
def smoothmix(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: SmoothMixConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """SmoothMix (Jeong 2021): mixup between x and its adversary on the soft smoothed classifier.

    The adversary x^(T) takes T = steps L2 steps of length α = smoothmix_step along the
    normalised gradient of CE(F̂(x'), y), with the step's k noise draws fixed and no norm
    bound (smooth_pgd_l2 with eps = T·α, a ball the steps cannot leave). The clean end is x,
    or with smoothmix_mix_step = s > 0 the adversary after s steps kept within warmup·s·α of x
    (the paper's "one-step adversary" for s = 1). mix ~ U[0, 1/2] per example, from torch's
    global generator (the Trainer seeds it every epoch); η is scaled by cfg.warmup.
    """
    _check_noise(x, noise, cfg)
    alpha, steps = cfg.smoothmix_step, cfg.steps
    x_adv = smooth_pgd_l2(model, x, y, noise, steps * alpha, steps, step_size=alpha)
    s = cfg.smoothmix_mix_step
    x_clean = x if s == 0 else smooth_pgd_l2(
        model, x, y, noise, cfg.warmup * s * alpha, s, step_size=alpha
    )
    mix = torch.rand(x.shape[0], device=x.device) / 2
    x_mix = x_clean + mix.view(-1, *(1,) * (x.dim() - 1)) * (x_adv - x_clean)
    # One forward pass for both ends, so DDP sees one forward per backward.
    both = noisy_logits(model, torch.cat([x_clean, x_mix]), torch.cat([noise, noise]))
    logits, logits_mix = both.split(x.shape[0])
    loss, terms = smoothmix_loss(
        logits, logits_mix, y, mix, cfg.smoothmix_eta * cfg.warmup, cfg.label_smoothing
    )
    terms["acc"] = _noisy_accuracy(logits, y)
    return loss, terms


# Every built-in objective's settings in one dataclass, accepted by each of them (tests,
# benchmarks and scripts written before the objectives had configs of their own).
ObjectiveConfig = make_dataclass(
    "ObjectiveConfig",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in option_fields()],
    frozen=True,
    namespace={"__post_init__": lambda self: check_options(vars(self)),
               "__module__": __name__},
)
