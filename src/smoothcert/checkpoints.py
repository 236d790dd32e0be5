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

A user's own files (`load`): a plain state_dict, or one under a common key (`WEIGHTS_KEYS` or
``state_dict_key``) of the architecture ``model`` names (`smoothcert.models.spec`); a TorchScript
archive; a whole pickled model only with ``trust_pickle=True``, which runs the file's code.

Every model comes back as ``Sequential(Standardize(mean, std), network)`` in eval mode on the
CPU, like smoothcert's own, so ``Smooth`` adds the noise in pixel space as the published code
did. Files are read with ``weights_only=True``: nothing in them is executed.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .data import DATASETS, dataset_info
from .io import (
    CheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
    read_checkpoint_state,
    verified_state,
)
from .models import MODELS, Standardize, build_model
from .models.cifar_resnet import rename_published_keys
from .models.spec import (
    USER_RECORD,
    build_from_spec,
    build_recorded,
    normalization_of,
    parse_model_kwargs,
    probe_num_classes,
    spec_forms,
    with_input_convention,
)

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
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint: '{path}' is not a smoothcert checkpoint: its config and weights "
            f"do not describe a smoothcert model ({type(err).__name__}: {first_line})"
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
    _load_weights(network, spec.rename(weights), path, f"{format} architecture '{name}'")
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


def _load_weights(
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
        problems = [str(err).strip().splitlines()[0]]
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


# A user's own files --------------------------------------------------------------------------

# Where training scripts commonly keep the state_dict inside a dict.
WEIGHTS_KEYS = ("state_dict", "model", "net", "model_state_dict")
USER_FILE_KINDS = ("state_dict", "torchscript", "pickle")  # files of a user's own model
FILE_KINDS = (*FORMATS, *USER_FILE_KINDS)


@dataclass(frozen=True)
class Loaded:
    """A checkpoint's model (eval mode, reading [0, 1] pixels) and what certifying it needs.

    `normalization` is the standardisation in front of the network ({'mean', 'std'}; None: it
    reads [0, 1] pixels); `config` is a smoothcert checkpoint's training config, else how the
    file was read; `format` is one of FILE_KINDS.
    """

    model: nn.Module
    sigma: float
    num_classes: int
    dataset: str | None
    normalization: dict[str, list[float]] | None
    config: dict[str, Any]
    format: str


@dataclass(frozen=True)
class _Network:
    """A network read from a file, before the probe: what the file says and what it leaves open."""

    model: nn.Module
    format: str
    num_classes: int | None
    dataset: str | None
    sigma: float | None
    config: dict[str, Any]


def load(
    path: str | os.PathLike,
    *,
    sigma: float | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    state_dict_key: str | None = None,
    trust_pickle: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalize: bool = True,
    format: str = "auto",
    arch: str | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Loaded:
    """The model of any checkpoint file smoothcert reads, with its sigma and number of classes.

    smoothcert's checkpoints supply sigma, dataset and classes (`sigma`/`dataset` override
    them); the published formats (Cohen et al.'s, MACER's: `format`, `arch`) their dataset. A
    user's file needs what it does not record: `model` (a spec, see `smoothcert.models.spec`)
    and `model_kwargs` for a state_dict, `num_classes` (or a `dataset` that has them) unless the
    file is a TorchScript archive or pickled model, `sigma`, and its input convention: `mean`
    and `std` per channel, or `normalize=False` for a model of [0, 1] pixels. `trust_pickle`
    allows a whole pickled model: loading it runs code stored in the file. The number of
    classes is checked on one probe input of `channels`x`image_size`^2 (default: the dataset's,
    else 3x32x32).
    """
    accepted = FILE_KINDS[:-1]  # a pickled model is recognised, with trust_pickle, not named
    if format != "auto" and format not in accepted:
        raise ValueError(f"format must be auto or one of {', '.join(accepted)}, got {format!r}")
    given = DATASETS.get(dataset)
    wanted = num_classes or (given.num_classes if given else None)
    read = _read_network(path, format, arch, dataset, model, model_kwargs, state_dict_key,
                         trust_pickle, wanted, channels or (given.channels if given else 3))
    dataset = dataset or read.dataset
    known = DATASETS.get(dataset)
    channels = channels or (known.channels if known else 3)
    if read.format in USER_FILE_KINDS:
        normalization = normalization_of(mean, std, normalize)
        full = with_input_convention(read.model, normalization, channels)
    else:
        _refuse_convention(path, read.format, mean, std, normalize)
        full, normalization = read.model, _standardisation(read.model)
    outputs = probe_num_classes(full, channels, image_size or (known.image_size if known else 32))
    _check_classes(path, outputs, num_classes, read.num_classes, dataset, known)
    return Loaded(full.to(device).eval(), _sigma(sigma, read.sigma, path), outputs, dataset,
                  normalization, read.config, read.format)


def _read_network(
    path: str | os.PathLike, format: str, arch: str | None, dataset: str | None,
    spec: str | None, model_kwargs: Mapping[str, Any] | None, state_dict_key: str | None,
    trust_pickle: bool, num_classes: int | None, channels: int,
) -> _Network:
    if format in ("auto", "torchscript") and is_torchscript(path):
        _refuse_spec(spec, path, "a TorchScript archive")
        network = _unsafe_read(torch.jit.load, path, "torch.jit.load")
        return _Network(network.eval(), "torchscript", None, dataset, None,
                        {"format": "torchscript"})
    if format == "torchscript":
        raise CheckpointError(f"checkpoint: '{path}' is not a TorchScript archive "
                              "(a zip with code/ and constants.pkl, written by torch.jit.save)")
    state = _read_state(path, trust_pickle)
    pickled = _pickled_model(state)
    if pickled is not None:
        _refuse_spec(spec, path, "a pickled model")
        return _Network(pickled.eval(), "pickle", None, dataset, None, {"format": "pickle"})
    if format == "auto":
        format = _own_format(state, path, spec, state_dict_key)
    if format == "state_dict":
        return _state_dict_network(state, path, spec, model_kwargs, state_dict_key, num_classes,
                                   channels, dataset)
    if spec is not None and format == "smoothcert":
        arch = arch or spec  # a smoothcert checkpoint names its model: the spec must agree
    model, dataset_name, trained_sigma, config = _load_state(state, path, format, arch, dataset,
                                                             dataset_override=True)
    return _Network(model, format, None, dataset_name, trained_sigma, config)


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive: a zip holding code/ and constants.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read_state(path: str | os.PathLike, trust_pickle: bool) -> Any:
    """The file's objects, weights only; with `trust_pickle`, whatever it holds (running it)."""
    try:
        return read_checkpoint(path)
    except UnsafeCheckpointError as err:
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{err}. If it is a whole pickled model from a source you trust, pass "
                "trust_pickle=True (--trust-pickle), which runs the code stored in the file"
            ) from None
    return _unsafe_read(partial(torch.load, weights_only=False), path, "torch.load")


def _unsafe_read(reader: Callable[..., Any], path: str | os.PathLike, name: str) -> Any:
    """`reader(path)` (which may run the file's code), its failure on one line."""
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return reader(str(path), map_location="cpu")
    except Exception as err:  # whatever the file's code or archive raises
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise CheckpointError(f"checkpoint: {name} cannot read '{path}': "
                              f"{type(err).__name__}: {first}") from None


def _pickled_model(state: Any) -> nn.Module | None:
    """A whole model (only a trusted pickle holds one): the state, or under a WEIGHTS_KEYS key."""
    if isinstance(state, nn.Module):
        return state
    return next((state[key] for key in WEIGHTS_KEYS if isinstance(_get(state, key), nn.Module)),
                None)


def _own_format(
    state: Any, path: str | os.PathLike, spec: str | None, state_dict_key: str | None
) -> str:
    """A smoothcert checkpoint, else a user's state_dict where the user names its model or the
    published formats do not fit; else the published format `detect_format` sees."""
    if isinstance(state, dict) and "model" in state and "config" in state:
        return "smoothcert"
    if spec is not None or state_dict_key is not None:
        return "state_dict"
    try:
        return detect_format(state, path)
    except CheckpointError:
        if _weights_key(state, None) is None:
            raise
        return "state_dict"


def _weights_key(state: Any, state_dict_key: str | None) -> str | None:
    """Where `state` keeps its weights: "" (it is a state_dict), a key, or None (nowhere)."""
    if state_dict_key is not None:
        return state_dict_key if _is_weights(_get(state, state_dict_key)) else None
    if _is_weights(state):
        return ""
    return next((key for key in WEIGHTS_KEYS if _is_weights(_get(state, key))), None)


def _get(state: Any, key: str) -> Any:
    return state.get(key) if isinstance(state, Mapping) else None


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _state_dict_network(
    state: Any, path: str | os.PathLike, spec: str | None, model_kwargs: Mapping[str, Any] | None,
    state_dict_key: str | None, num_classes: int | None, channels: int, dataset: str | None,
) -> _Network:
    key = _weights_key(state, state_dict_key)
    if key is None:
        where = (f"under {state_dict_key!r}" if state_dict_key is not None else
                 f"at the top or under any of {', '.join(map(repr, WEIGHTS_KEYS))}")
        raise CheckpointError(f"checkpoint: '{path}' holds no state_dict (names -> tensors) "
                              f"{where}: it holds {_describe(state)}; name the key with "
                              "state_dict_key (--state-dict-key)")
    if spec is None:
        raise ValueError(f"model: '{path}' holds a state_dict, which does not say its "
                         f"architecture; give model (--model), one of: {spec_forms()}")
    if num_classes is None:
        raise ValueError(f"num_classes: '{path}' holds a state_dict, which does not say how many "
                         "classes its model has; give num_classes (--num-classes) or a dataset")
    weights = dict(state[key]) if key else dict(state)
    if all(k.startswith("module.") for k in weights):  # saved from DataParallel or DDP
        weights = {k[len("module."):]: v for k, v in weights.items()}
    network = build_from_spec(spec, num_classes, model_kwargs, channels)
    _load_weights(network, weights, path, f"model {spec!r} with {num_classes} classes")
    config = {"format": "state_dict", "model": spec, "model_kwargs": dict(model_kwargs or {}),
              "state_dict_key": key}
    return _Network(network.eval(), "state_dict", num_classes, dataset, None, config)


def _refuse_spec(spec: str | None, path: str | os.PathLike, what: str) -> None:
    if spec is not None:
        raise ValueError(f"model: '{path}' is {what}, which holds its architecture; leave "
                         f"model (--model) out, got {spec!r}")


def _refuse_convention(
    path: str | os.PathLike, format: str, mean: Any, std: Any, normalize: bool
) -> None:
    if mean is not None or std is not None or not normalize:
        raise ValueError(f"mean/std: '{path}' is a {format} checkpoint, whose model carries "
                         "its standardisation; leave mean, std and normalize out")


def _standardisation(model: nn.Module) -> dict[str, list[float]] | None:
    """The {'mean', 'std'} of the Standardize in front of `model`, None where it is identity."""
    first = model[0]
    mean, std = first.mean.tolist(), first.std.tolist()
    identity = all(m == 0 for m in mean) and all(s == 1 for s in std)
    return None if identity else {"mean": mean, "std": std}


def _check_classes(
    path: str | os.PathLike, outputs: int, given: int | None, built: int | None,
    dataset: str | None, known: Any,
) -> None:
    """The probe's class count against the one given, the one built and the dataset's."""
    expected = [(given, "num_classes"), (built, "num_classes"),
                (known.num_classes if known else None, f"dataset {dataset!r}")]
    for count, source in expected:
        if count is not None and count != outputs:
            raise ValueError(f"num_classes: the model in '{path}' outputs {outputs} classes on "
                             f"a probe input, but {source} has {count}")
