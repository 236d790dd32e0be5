"""`smoothcert.load`: a model and what certifying it needs, from any checkpoint file.

Besides smoothcert's own and the field's published formats (`checkpoints`), a user's own files:
a plain state_dict, or one under a common key (`WEIGHTS_KEYS` or ``state_dict_key``) of the
architecture ``model`` names (`smoothcert.models.spec`); a TorchScript archive; a whole pickled
model only with ``trust_pickle=True``, which runs the file's code.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .checkpoints import FORMATS, _describe, _load_state, _sigma, detect_format, load_weights
from .data import DATASETS
from .denoise import outputs_images
from .io import (
    CheckpointError,
    UnsafeCheckpointError,
    first_line,
    read_checkpoint,
)
from .models.spec import (
    build_from_spec,
    normalization_of,
    probe_num_classes,
    spec_forms,
    with_input_convention,
)

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


def _refuse_denoiser(model: nn.Module, path: str | os.PathLike) -> None:
    if outputs_images(model):
        raise ValueError(f"checkpoint: '{path}' is a denoiser, not a classifier: give a "
                         "classifier, and this file as --denoiser in front of it")


def _check_format(format: str) -> None:
    accepted = FILE_KINDS[:-1]  # a pickled model is recognised, with trust_pickle, not named
    if format != "auto" and format not in accepted:
        raise ValueError(f"format must be auto or one of {', '.join(accepted)}, got {format!r}")


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
    _check_format(format)
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
    _refuse_denoiser(full, path)
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
        raise CheckpointError(f"checkpoint: {name} cannot read '{path}': "
                              f"{type(err).__name__}: {first_line(err)}") from None


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
    load_weights(network, weights, path, f"model {spec!r} with {num_classes} classes")
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
