"""The paper's training recipes as named presets; every value can be overridden."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .data import DATASETS
from .models import MODELS
from .objectives import METHODS, MethodConfig

SCHEDULES = ("step", "cosine", "constant")
AMP_CHOICES = ("bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as config.json and inside each checkpoint."""

    dataset: str = "mnist"
    model: str = "lenet"
    method: str = "gaussian"
    sigma: float = 0.25
    lam: float = 0.0
    k: int = 1
    single_draw: bool = False
    eps: float = 0.0
    steps: int = 1
    eps_warmup: int = 10
    label_smoothing: float = 0.0
    adre_floor: float = 1e-6
    epochs: int = 10
    batch: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    lr_step: int = 30
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    train_subset: int = 0
    eval_subset: int = 1000
    data_dir: str | None = None
    download: bool = False
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    out: str = "runs/train"
    preset: str | None = None

    def method_config(self, eps: float | None = None) -> MethodConfig:
        return MethodConfig(
            lam=self.lam,
            k=self.k,
            eps=self.eps if eps is None else eps,
            steps=self.steps,
            single_draw=self.single_draw,
            label_smoothing=self.label_smoothing,
            adre_floor=self.adre_floor,
        )

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field and its accepted range."""
        for f in fields(self):  # inf or NaN passes every range check below (lr=inf trained)
            value = getattr(self, f.name)
            if f.type == "float" and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("model", self.model, MODELS)
        _one_of("method", self.method, METHODS)
        _one_of("schedule", self.schedule, SCHEDULES)
        if self.amp is not None:
            _one_of("amp", self.amp, AMP_CHOICES)
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        if self.method in ("smoothadv", "adreadv") and self.eps <= 0:
            raise ValueError(f"eps must be > 0 for method {self.method}, got {self.eps}")
        for name in ("k", "steps", "epochs", "batch", "lr_step"):
            _at_least(name, getattr(self, name), 1)
        for name in ("eps_warmup", "warmup_epochs", "train_subset", "eval_subset", "workers"):
            _at_least(name, getattr(self, name), 0)
        for name in ("lr", "lr_gamma"):
            if not (getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.method_config()  # lam, k, eps, steps, label_smoothing ranges
        _check_objective_options(self)
        return self


# Options only some methods read, with the value that leaves them unused: a value set for a
# method that ignores it would be recorded in config.json without any effect, so it is refused.
OBJECTIVE_OPTIONS = {
    "lam": (0.0, ("adre", "adreadv")),
    "single_draw": (False, ("adre", "adreadv")),
    "eps": (0.0, ("smoothadv", "adreadv")),
    "steps": (1, ("smoothadv", "adreadv")),
}


def _check_objective_options(cfg: TrainConfig) -> None:
    for name, (unused, methods) in OBJECTIVE_OPTIONS.items():
        value = getattr(cfg, name)
        if cfg.method not in methods and value != unused:
            raise ValueError(
                f"{name} is read by method {' and '.join(methods)} only, and method "
                f"{cfg.method} would ignore {name}={value}; leave {name} out or choose one of "
                "those methods"
            )


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(sorted(accepted))}; got {value!r}")


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


PRESETS: dict[str, dict] = {
    # A fast MNIST recipe for CPUs: LeNet, SGD with momentum, lr / 10 after 2/3 of the epochs.
    "mnist-lenet": dict(
        dataset="mnist", model="lenet", epochs=12, batch=128, lr=0.05, momentum=0.9,
        weight_decay=1e-4, schedule="step", lr_step=8, lr_gamma=0.1, eps_warmup=3,
    ),
    # Feng et al. (and Cohen et al.) on CIFAR-10: ResNet-110, 150 epochs, lr 0.1 / 10 every 50.
    "cifar10-resnet110": dict(
        dataset="cifar10", model="cifar_resnet110", epochs=150, batch=400, lr=0.1,
        momentum=0.9, weight_decay=1e-4, schedule="step", lr_step=50, lr_gamma=0.1, k=8,
        eps_warmup=10,
    ),
    # Feng et al. on ImageNet: ResNet-50, 8 warm-up epochs then cosine to 50, label smoothing.
    # The batch is 256 for k = 1 and 64 for k = 4 (256 // k) unless given explicitly.
    "imagenet-resnet50": dict(
        dataset="imagenet", model="resnet50", epochs=50, lr=0.1, momentum=0.875,
        weight_decay=1 / 32768, label_smoothing=0.1, schedule="cosine", warmup_epochs=8, k=1,
        eps_warmup=10,
    ),
}


def resolve_config(preset: str | None = None, **overrides) -> TrainConfig:
    """A validated TrainConfig: defaults, then the preset, then the explicit overrides."""
    values: dict = {}
    if preset is not None:
        _one_of("preset", preset, PRESETS)
        values.update(PRESETS[preset], preset=preset)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    values.update({key: value for key, value in overrides.items() if value is not None})
    k = values.get("k", 1)
    if preset == "imagenet-resnet50" and "batch" not in values and isinstance(k, int) and k >= 1:
        values["batch"] = max(1, 256 // k)  # a bad k is left to validate(), which names it
    return TrainConfig(**values).validate()


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier of `epoch` (0-based) for the configured schedule."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "step":
        return cfg.lr_gamma ** (epoch // cfg.lr_step)
    if cfg.schedule == "cosine":
        span = max(1, cfg.epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    return 1.0


def eps_at(cfg: TrainConfig, epoch: int) -> float:
    """The attack radius of `epoch`: linear warm-up over the first eps_warmup epochs."""
    if cfg.eps_warmup <= 0:
        return cfg.eps
    return cfg.eps * min(1.0, (epoch + 1) / cfg.eps_warmup)
