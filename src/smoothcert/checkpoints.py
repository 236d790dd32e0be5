"""Load smoothcert's checkpoints and the field's published ones as models of [0, 1] pixels.

Formats:
- ``smoothcert``: ``{'model', 'config', ...}`` written by ``smoothcert train``.
- ``cohen``: ``{'arch', 'state_dict', ...}`` written by Cohen et al.'s locuslab/smoothing and
  the forks that kept its training script (Salman et al.'s smoothing-adversarial, Jeong & Shin's
  smoothing-consistency, SmoothMix). The network is ``Sequential(NormalizeLayer, net)``, so the
  keys start with ``1.`` (``1.module.`` where ``net`` is wrapped in DataParallel, as for
  ImageNet); NormalizeLayer holds no state, so mean and std come from the architecture's dataset.
- ``macer``: ``{'net': state_dict, 'epoch'}`` written by RuntianZ/macer: the bare network, no
  normalisation, no architecture name.

A user's own files (a plain state_dict, TorchScript, a trusted pickle) are read by
`smoothcert.loading.load`, on top of these.

Every model comes back as ``Sequential(Standardize(mean, std), network)`` in eval mode on the
CPU, like smoothcert's own, so ``Smooth`` adds the noise in pixel space as the published code
did. Files are read with ``weights_only=True``: nothing in them is executed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import dataset_info
from .io import (
    CheckpointError,
    first_line,
    read_checkpoint,
    read_checkpoint_state,
    verified_state,
)
from .models import MODELS, Standardize, build_model
from .models.cifar_resnet import rename_published_keys
from .models.spec import USER_RECORD, build_recorded, parse_model_kwargs

FORMATS = ("smoothcert", "cohen", "macer")
_FORMAT_KEYS = {
    "smoothcert": "keys 'model' and 'config', written by smoothcert train",
    "cohen": "keys 'arch' and 'state_dict': Cohen et al., SmoothAdv, Consistency, SmoothMix",
    "macer": "key 'net': MACER",
}


@dataclass(frozen=True)
class Architecture:
    """A published architecture: smoothcert's model of it, its dataset, its standardisation."""

    model: str
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rename: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = dict


# Cohen's CIFAR-10 values (smoothcert's own CIFAR-10 std, 0.2470/0.2435/0.2616, differs).
_COHEN_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# No normalisation: (x - 0) / 1 is exact, and broadcasts over any number of channels.
_IDENTITY = ((0.0,), (1.0,))

ARCHITECTURES: dict[str, dict[str, Architecture]] = {
    "cohen": {
        "cifar_resnet20": Architecture("cifar_resnet20", "cifar10", *_COHEN_CIFAR10,
                                       rename_published_keys),
        "cifar_resnet110": Architecture("cifar_resnet110", "cifar10", *_COHEN_CIFAR10,
                                        rename_published_keys),
        "resnet50": Architecture("resnet50", "imagenet", *_IMAGENET),  # torchvision's
        "lenet": Architecture("lenet_20_50", "mnist", *_IDENTITY),  # Consistency's MNIST LeNet
    },
    "macer": {
        "resnet110": Architecture("cifar_resnet110", "cifar10", *_IDENTITY, rename_published_keys),
        "lenet": Architecture("lenet_20_50", "mnist", *_IDENTITY),
    },
}


def load_checkpoint(
    path: str | os.PathLike,
    format: str = "auto",
    arch: str | None = None,
    dataset: str | None = None,
) -> nn.Module:
    """The model of checkpoint `path`, in eval mode on the CPU, reading [0, 1] pixels.

    `format` is "auto" (recognised from the file's keys) or one of FORMATS. `arch` names a
    MACER checkpoint's architecture (the file does not); elsewhere it may be left out and must
    agree with the file. `dataset` may be left out (the architecture's) and must agree with it.
    """
    return _load(path, format, arch, dataset, dataset_override=False)[0]


def load_native(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """A smoothcert checkpoint's model (eval mode, on `device`) and its training config."""
    model, config = _native_model(read_checkpoint_state(path), path)
    return model.to(device), config


def load_for_run(
    path: str | os.PathLike,
    format: str = "auto",
    arch: str | None = None,
    dataset: str | None = None,
    sigma: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, str, float]:
    """A certify/predict run's model (on `device`), dataset name and noise level sigma.

    A smoothcert checkpoint supplies its dataset and sigma (`dataset`/`sigma` override them);
    the published formats record no sigma, so it must be given.
    """
    model, dataset_name, trained_sigma = _load(path, format, arch, dataset, dataset_override=True)
    return model.to(device), dataset_name, _sigma(sigma, trained_sigma, path)


def _sigma(given: float | None, recorded: float | None, path: str | os.PathLike) -> float:
    """The run's noise level: `given`, else the one the checkpoint records."""
    if given is None:
        if recorded is None:
            raise ValueError(
                f"sigma: '{path}' does not record the noise level its model was trained with "
                "(only smoothcert checkpoints do); give --sigma, e.g. 0.25, 0.5 or 1.0 for "
                "Cohen et al.'s released models"
            )
        given = recorded
    if not (math.isfinite(given) and given > 0):
        raise ValueError(f"sigma must be a positive finite number, got {given}")
    return float(given)


def detect_format(state: Any, path: str | os.PathLike) -> str:
    """The format of a loaded checkpoint, recognised from its top-level keys."""
    if isinstance(state, dict):
        if "model" in state and "config" in state:
            return "smoothcert"
        if "arch" in state and "state_dict" in state:
            return "cohen"
        if isinstance(state.get("net"), dict):
            return "macer"
    formats = "; ".join(f"{name} ({keys})" for name, keys in _FORMAT_KEYS.items())
    raise CheckpointError(
        f"checkpoint: '{path}' is not a smoothcert checkpoint nor in another format smoothcert "
        f"reads: it holds {_describe(state)}. Formats: {formats}. If it is a Cohen-format file "
        "without 'arch', give --checkpoint-format cohen --model ARCH; if it holds the state_dict "
        "of another architecture, name it with --model SPEC"
    )


def _load(
    path: str | os.PathLike, format: str, arch: str | None, dataset: str | None,
    dataset_override: bool,
) -> tuple[nn.Module, str, float | None]:
    """(model, dataset name, the sigma a smoothcert checkpoint records, else None)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be auto or one of {', '.join(FORMATS)}, got {format!r}")
    return _load_state(read_checkpoint(path), path, format, arch, dataset, dataset_override)[:3]


def _load_state(
    state: Any, path: str | os.PathLike, format: str, arch: str | None, dataset: str | None,
    dataset_override: bool,
) -> tuple[nn.Module, str, float | None, dict]:
    """`_load`'s result and the config: smoothcert's training config, else {'format'}."""
    if format == "auto":
        format = detect_format(state, path)
    if format != "smoothcert":
        return (*_foreign_model(state, format, path, arch, dataset), None, {"format": format})
    model, config = _native_model(verified_state(state, path), path)
    _check_agrees("arch", arch, config["model"], path)
    if not dataset_override:
        _check_agrees("dataset", dataset, config["dataset"], path)
    return model, dataset or config["dataset"], float(config["sigma"]), config


def _native_model(state: dict, path: str | os.PathLike) -> tuple[nn.Module, dict]:
    config = state["config"]
    try:  # {"model": ..., "config": ...} is a common layout: check that it is ours
        model = build_recorded(config["model"], parse_model_kwargs(config.get(
            "model_kwargs")), config[USER_RECORD]) if USER_RECORD in config else build_model(
            config["model"], config["dataset"])
        model.load_state_dict(state["model"])
        float(config["sigma"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint: '{path}' is not a smoothcert checkpoint: its config and weights "
            f"do not describe a smoothcert model ({type(err).__name__}: {first_line(err)})"
        ) from None
    return model.eval(), config


def _foreign_model(
    state: Any, format: str, path: str | os.PathLike, arch: str | None, dataset: str | None
) -> tuple[nn.Module, str]:
    weights_key = "state_dict" if format == "cohen" else "net"
    if not isinstance(state, dict) or not isinstance(state.get(weights_key), Mapping):
        raise CheckpointError(
            f"checkpoint: '{path}' is not a {format}-format checkpoint ({_FORMAT_KEYS[format]}, "
            f"with the weights under '{weights_key}'): it holds {_describe(state)}"
        )
    name = _architecture_name(state, format, path, arch)
    spec = ARCHITECTURES[format][name]
    _check_agrees("dataset", dataset, spec.dataset, path)
    weights = dict(state[weights_key])
    if format == "cohen":  # Sequential(NormalizeLayer, net): the network is module 1
        weights = {k[2:] if k.startswith("1.") else k: v for k, v in weights.items()}
    if weights and all(k.startswith("module.") for k in weights):  # saved from DataParallel
        weights = {k[len("module."):]: v for k, v in weights.items()}
    info = dataset_info(spec.dataset)
    network = MODELS[spec.model](num_classes=info.num_classes, in_channels=info.channels)
    load_weights(network, spec.rename(weights), path, f"{format} architecture '{name}'")
    return nn.Sequential(Standardize(spec.mean, spec.std), network).eval(), spec.dataset


def _architecture_name(state: dict, format: str, path: str | os.PathLike, arch: str | None) -> str:
    table = ARCHITECTURES[format]
    named = state.get("arch")
    if format == "cohen" and named is not None:
        if arch is not None and arch != named:
            raise ValueError(
                f"arch: '{path}' names its architecture {named!r}; leave --model out or give "
                f"{named!r}, got {arch!r}"
            )
        arch = named
    if arch is None:
        raise ValueError(
            f"arch: {format}-format checkpoints such as '{path}' do not name their architecture; "
            f"give --model, one of {', '.join(table)}"
        )
    if arch not in table:
        raise ValueError(
            f"arch: smoothcert reads {format}-format architectures {', '.join(table)}; "
            f"got {arch!r} for '{path}'"
        )
    return arch


def load_weights(
    network: nn.Module, weights: dict[str, Any], path: str | os.PathLike, what: str
) -> None:
    """Strictly load `weights`, or say which keys are missing, unexpected or of another shape."""
    expected = network.state_dict()
    # Files from PyTorch < 0.4.1 have no BatchNorm counters; load_state_dict fills them in.
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"'{k}' {tuple(v.shape)} instead of {tuple(expected[k].shape)}"
        for k, v in weights.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    problems = [f"{label} {_some(keys)}" for label, keys in (
        ("missing", [repr(k) for k in missing]), ("unexpected", [repr(k) for k in unexpected]),
        ("wrong shape", shapes)) if keys]
    try:
        if not problems:
            network.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        problems = [first_line(err)]
    if problems:
        raise CheckpointError(
            f"checkpoint: the weights in '{path}' do not fit {what}: {'; '.join(problems)}"
        )


def _check_agrees(name: str, given: str | None, recorded: str, path: str | os.PathLike) -> None:
    if given is not None and given != recorded:
        raise ValueError(
            f"{name}: '{path}' holds a {recorded!r} model; leave --{name} out or give "
            f"{recorded!r}, got {given!r}"
        )


def _some(items: list[str], shown: int = 3) -> str:
    listed = ", ".join(items[:shown])
    return f"{listed} (and {len(items) - shown} more)" if len(items) > shown else listed


def _describe(state: Any) -> str:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    if not state:
        return "an empty dict"
    return f"a dict with keys {_some([repr(k) for k in state], shown=6)}"
