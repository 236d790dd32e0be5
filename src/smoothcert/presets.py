"""The paper's training recipes as named presets; every value can be overridden."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Literal, get_args

from torch import nn

from .data import DATASETS, USER_DATASETS, dataset_info
from .models import build_model, list_models
from .models.spec import USER_RECORD, build_recorded, parse_model_kwargs
from .objectives import (
    CommonConfig,
    check_options,
    list_objectives,
    objective_config_class,
    option_fields,
    readers,
)
from .perf import AMP, Amp

Schedule = Literal["step", "cosine", "constant"]
SCHEDULES = get_args(Schedule)
# Keys of config.json and checkpoints written by earlier releases, under their current names.
RENAMED_KEYS = {"method": "objective"}


# The objectives' settings (every registered config's fields but the per-epoch warm-up) are
# TrainConfig fields, so config.json keeps one flat key per option. Objectives registered after
# this module is imported train with their config's defaults for the options it lacks.
_ObjectiveOptions = make_dataclass(
    "_ObjectiveOptions",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata))
     for f in option_fields() if f.name != "warmup"],
)


@dataclass
class TrainConfig(_ObjectiveOptions):
    """Everything a training run depends on; saved as config.json and inside each checkpoint."""

    dataset: str = "mnist"
    model: str = "lenet"
    objective: str = "gaussian"
    eps_warmup: int = 10
    epochs: int = 10
    batch: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Schedule = "step"
    lr_step: int = 30
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    train_subset: int = 0
    eval_subset: int = 1000
    data_dir: str | None = None
    data_file: str | None = field(default=None, metadata={"help": "--dataset npz: arrays "
                                  "x_train, y_train, x_test, y_test"})
    image_size: int | None = field(default=None, metadata={"help": "imagefolder/npz: the "
                                   "images' size (default the first image's shorter side)"})
    mean: str | None = field(default=None, metadata={"help": "imagefolder/npz: per-channel "
                             "mean (comma list) or auto (from the training split); none: the "
                             "model reads [0, 1] pixels"})
    std: str | None = field(default=None, metadata={"help": "per-channel std, with --mean"})
    model_kwargs: str | None = field(default=None, metadata={"help": "keyword arguments of "
                                     "--model's builder, a JSON object"})
    init: str | None = field(default=None, metadata={"help": "start from the weights of this "
                             "checkpoint of `smoothcert train` (fine-tuning): the same --model, "
                             "--model-kwargs and --dataset; optimizer and schedule start anew"})
    download: bool = False
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: Amp | None = None
    channels_last: bool = False
    out: str = "runs/train"
    preset: str | None = None

    def objective_config(self, epoch: int | None = None) -> CommonConfig:
        """The objective's config from the fields of the same name, in `epoch` with its
        warm-ups applied, or without warm-up."""
        config_class = objective_config_class(self.objective)
        config = config_class(**{f.name: getattr(self, f.name) for f in fields(config_class)
                                 if f.name != "warmup" and hasattr(self, f.name)})
        return config if epoch is None else config.at_epoch(epoch, warmup_factor(self, epoch))

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field and its accepted range."""
        for f in fields(self):  # inf or NaN passes every range check below (lr=inf trained)
            value = getattr(self, f.name)
            if f.type == "float" and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        for name, accepted in choices().items():
            value = getattr(self, name)
            if not (name == "amp" and value is None):
                _one_of(name, value, accepted)
        if ":" not in self.model:  # torchvision:, timm:, a factory: checked when built
            _one_of("model", self.model, list_models())
        given = [n for n in ("data_file", "image_size", "mean", "std") if getattr(self, n)]
        if given and self.dataset not in USER_DATASETS:
            raise ValueError(f"{given[0]} applies to dataset imagefolder or npz only (their "
                             f"models' input), got dataset {self.dataset}")
        self._check_ranges()
        check_options(asdict(self))  # every objective option's range: lam, eps, macer_*, ...
        _check_objective_options(self)
        self.objective_config().check_training(self.objective)
        return self

    def _check_ranges(self) -> None:
        """The ranges of the fields every objective reads."""
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        for name in ("k", "steps", "epochs", "batch", "lr_step"):
            _at_least(name, getattr(self, name), 1)
        _at_least("smoothmix_mix_step", self.smoothmix_mix_step, 0)
        _at_least("macer_defer", self.macer_defer, 0)
        for name in ("eps_warmup", "warmup_epochs", "train_subset", "eval_subset", "workers"):
            _at_least(name, getattr(self, name), 0)
        for name in ("lr", "lr_gamma"):
            if not (getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def _check_objective_options(cfg: TrainConfig) -> None:
    """Refuse an option set away from its default for an objective that ignores it: it would be
    recorded in config.json without any effect."""
    for option in option_fields():
        value, named = getattr(cfg, option.name, option.default), readers(option.name)
        if cfg.objective not in named and value != option.default:
            named = f"{', '.join(named[:-1])} and {named[-1]}" if named[1:] else named[0]
            raise ValueError(
                f"{option.name} is read by objective {named} only, and objective "
                f"{cfg.objective} would ignore {option.name}={value}; leave {option.name} out or "
                "choose one of those objectives"
            )


def choices() -> dict[str, tuple[str, ...]]:
    """The accepted values of TrainConfig's categorical fields (amp may also be None)."""
    return {"dataset": (*DATASETS, *USER_DATASETS), "objective": tuple(list_objectives()),
            "schedule": SCHEDULES, "amp": AMP}


def upgrade_config(saved: dict) -> dict:
    """A config.json or checkpoint config of any release, with today's key names."""
    return {RENAMED_KEYS.get(key, key): value for key, value in saved.items()}


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(sorted(accepted))}; got {value!r}")


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# What `smoothcert presets` shows of each preset.
PRESET_SUMMARY = ("dataset", "model", "objective", "epochs", "batch", "lr", "schedule", "k")
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
    # The baselines on CIFAR-10 (ResNet-110), each paper's recipe; the sigma-dependent values
    # (MACER's lambda, Consistency's lambda, SmoothMix's step) are set per run, see
    # experiments/gpu/cifar10_baselines.sh. The code bases of Consistency and SmoothMix split
    # every loader batch of 256 into m chunks, one update each: a step sees 256 / m examples.
    # MACER (Zhai et al. 2020): 440 epochs, batch 64, lr 0.01 / 10 at epochs 200 and 400,
    # weight decay 5e-4 (the authors' script), k = 16, beta 16, gamma 8, lambda 12 (4 at sigma 1).
    "cifar10-resnet110-macer": dict(
        dataset="cifar10", model="cifar_resnet110", objective="macer", epochs=440, batch=64,
        lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step", lr_step=200, lr_gamma=0.1,
        k=16, macer_lam=12.0, macer_beta=16.0, macer_gamma=8.0,
    ),
    # Consistency (Jeong & Shin 2020): Cohen's 150 epochs, lr 0.1 / 10 every 50, weight decay
    # 1e-4 (their SGD is Nesterov, ours plain momentum), m = 2, eta 0.5, lambda 10 (20 at 0.25).
    "cifar10-resnet110-consistency": dict(
        dataset="cifar10", model="cifar_resnet110", objective="consistency", epochs=150,
        batch=128, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", lr_step=50,
        lr_gamma=0.1, k=2, consistency_lam=10.0, consistency_eta=0.5,
    ),
    # SmoothMix (Jeong et al. 2021): the same schedule, m = 2, T = 4 steps of alpha 1.0 (0.5 at
    # sigma 0.25, 2.0 at 1.0), eta 5 warmed up over 10 epochs.
    "cifar10-resnet110-smoothmix": dict(
        dataset="cifar10", model="cifar_resnet110", objective="smoothmix", epochs=150,
        batch=128, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", lr_step=50,
        lr_gamma=0.1, k=2, steps=4, smoothmix_step=1.0, smoothmix_eta=5.0, eps_warmup=10,
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
        named = (f"{key} (now {RENAMED_KEYS[key]})" if key in RENAMED_KEYS else key
                 for key in sorted(unknown))
        raise ValueError(f"unknown training option(s): {', '.join(named)}")
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


def warmup_factor(cfg: TrainConfig, epoch: int) -> float:
    """The adversarial warm-up of `epoch` (0-based): linear over the first eps_warmup epochs."""
    if cfg.eps_warmup <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / cfg.eps_warmup)


def eps_at(cfg: TrainConfig, epoch: int) -> float:
    """The attack radius of `epoch`: linear warm-up over the first eps_warmup epochs."""
    return cfg.eps * warmup_factor(cfg, epoch)


def build_network(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The model to train and, for a spec or a user's data, what config.json records of it
    (classes, channels, image size, normalisation) so that certify rebuilds it."""
    if cfg.dataset in DATASETS and ":" not in cfg.model and cfg.model_kwargs is None:
        return build_model(cfg.model, cfg.dataset), {}
    info = dataset_info(cfg.dataset, cfg.data_dir, data_file=cfg.data_file,
                        image_size=cfg.image_size, mean=_stats(cfg.mean), std=_stats(cfg.std))
    record = {USER_RECORD: {
        "num_classes": info.num_classes, "channels": info.channels,
        "image_size": info.image_size, "classes": list(info.classes) if info.classes else None,
        "normalization": None if info.mean is None else {"mean": list(info.mean),
                                                         "std": list(info.std)}}}
    network = build_recorded(cfg.model, parse_model_kwargs(cfg.model_kwargs), record[USER_RECORD])
    return network, record


def _stats(text: str | None) -> str | list[str] | None:
    """--mean/--std: "auto", or one value per channel, comma-separated."""
    return text if text in (None, "auto") else text.split(",")
