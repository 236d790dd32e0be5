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
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from smoothcert.attacks import noisy_logits, smooth_pgd_l2

from .losses import (
    adre_loss,
    check_label_smoothing,
    check_lam,
    check_positive,
    consistency_loss,
    macer_loss,
    smoothmix_loss,
)
from .losses import gaussian_ce as gaussian_ce  # the losses are objectives' API too


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
    # Whether the objective trains a denoiser (a model that outputs images), not a classifier.
    trains_denoiser: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k}")
        check_label_smoothing(self.label_smoothing)
        if not (math.isfinite(self.adre_floor) and 0 <= self.adre_floor < 1):
            raise ValueError(f"adre_floor must be in [0, 1), got {self.adre_floor}")
        check_positive(self.sigma, "sigma")
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
        check_lam(self.lam)


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
        check_lam(self.macer_lam, "macer_lam")
        check_positive(self.macer_beta, "macer_beta")
        check_positive(self.macer_gamma, "macer_gamma")

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
        check_lam(self.consistency_lam, "consistency_lam")
        check_lam(self.consistency_eta, "consistency_eta")


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
        check_lam(self.smoothmix_eta, "smoothmix_eta")
        check_positive(self.smoothmix_step, "smoothmix_step")
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


def trains_denoiser(name: str) -> bool:
    """Whether objective `name` trains a denoiser (a model that outputs images)."""
    return objective_config_class(name).trains_denoiser


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
    if not lam:  # not trained: logged, it would read as part of the objective
        del terms["l_adre"]
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


# The objectives that train a denoiser are a module of their own, registered here, before
# ObjectiveConfig collects every objective's options.
from smoothcert import denoiser_objectives  # noqa: E402, F401

# Every built-in objective's settings in one dataclass, accepted by each of them (tests,
# benchmarks and scripts written before the objectives had configs of their own).
ObjectiveConfig = make_dataclass(
    "ObjectiveConfig",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in option_fields()],
    frozen=True,
    namespace={"__post_init__": lambda self: check_options(vars(self)),
               "__module__": __name__},
)
