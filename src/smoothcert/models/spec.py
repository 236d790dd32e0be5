"""Model specs: one string naming any architecture a user may bring, and its input convention.

- a smoothcert registry name (`smoothcert models`), e.g. ``cifar_resnet20``;
- ``torchvision:NAME``: a ``torchvision.models`` builder, randomly initialised (never downloads);
- ``timm:NAME``: a timm model, randomly initialised (the optional extra ``smoothcert[timm]``);
- ``module:callable`` or ``path/to/file.py:callable``: the user's own factory. Importing it runs
  the user's code, which is what the user asked for by naming it.

Every builder is called with ``num_classes`` and the keyword arguments of ``--model-kwargs``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothcert.extras import import_extra
from smoothcert.models.normalize import Standardize
from smoothcert.models.registry import MODELS

SPEC_FORMS = ("a smoothcert model ({names}), torchvision:NAME, timm:NAME, module:callable or "
              "path/to/file.py:callable")
_PREFIXES = ("torchvision", "timm")


def spec_forms() -> str:
    """What a model spec may be, in words, for error messages and help."""
    return SPEC_FORMS.format(names=", ".join(MODELS))


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """The builder's keyword arguments from `--model-kwargs` JSON (None: none)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"model_kwargs must be a JSON object, e.g. '{{\"dropout\": 0.1}}'; "
                         f"{text!r} is not JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"model_kwargs must be a JSON object, e.g. '{{\"dropout\": 0.1}}', "
                         f"got {type(value).__name__} {text!r}")
    return value


def build_from_spec(
    spec: str, num_classes: int, kwargs: Mapping[str, Any] | None = None, in_channels: int = 3
) -> nn.Module:
    """The network `spec` names, built for `num_classes` outputs with `kwargs`, in eval mode.

    `in_channels` reaches smoothcert's own models only; other builders take theirs from
    `kwargs` (e.g. timm's ``in_chans``). The network reads whatever its own code expects: put
    `with_input_convention` in front of it.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    kwargs = dict(kwargs or {})
    if "num_classes" in kwargs:
        raise ValueError("model_kwargs must not hold num_classes: it comes from the data or "
                         "--num-classes")
    factory, extra = _factory(spec)
    try:
        network = factory(num_classes=num_classes, **extra, **kwargs)
    except TypeError as err:  # an argument the builder does not take
        raise ValueError(f"model: {spec!r} cannot be built with num_classes={num_classes} and "
                         f"model_kwargs {kwargs}: {err}") from None
    if not isinstance(network, nn.Module):
        raise ValueError(f"model: {spec!r} returned a {type(network).__name__}, not a "
                         "torch.nn.Module")
    return network.eval()


def _factory(spec: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The builder `spec` names and the arguments smoothcert adds to the user's."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be {spec_forms()}; got {spec!r}")
    if spec in MODELS:
        return MODELS[spec], {}
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision":
        return _torchvision_builder(name), {"weights": None}
    if prefix == "timm":
        return _timm_builder(name), {"pretrained": False}
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model must be {spec_forms()}; got {spec!r}{hint}")
    return _user_factory(spec), {}


def _torchvision_builder(name: str) -> Callable[..., Any]:
    from torchvision import models

    names = models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(f"model: torchvision has no model {name!r} (torchvision.models."
                         f"list_models() names the {len(names)} it has{hint})")
    return models.get_model_builder(name)


def _timm_builder(name: str) -> Callable[..., Any]:
    timm = import_extra("timm", "timm", f"model: 'timm:{name}'")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(f"model: timm has no model {name!r} (timm.list_models() names "
                         f"those it has{hint})")
    return lambda **kwargs: timm.create_model(name, **kwargs)


def _user_factory(spec: str) -> Callable[..., Any]:
    """`module:callable` or `file.py:callable`, imported (running the user's code)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"model: {spec!r} must be module:callable or path/to/file.py:callable")
    module = _import_file(where, spec) if where.endswith(".py") else _import_module(where, spec)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model: {where} has no callable {attr!r} (from {spec!r})")
    return factory


def _import_file(where: str, spec: str) -> Any:
    path = Path(where).expanduser()
    if not path.is_file():
        raise ValueError(f"model: no such file '{path}' (from {spec!r})")
    name = f"smoothcert_user_model_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # the user's code: its failure on one line
        del sys.modules[name]
        raise ValueError(f"model: importing '{path}' failed (from {spec!r}): "
                         f"{type(err).__name__}: {err}") from None
    return module


def _import_module(where: str, spec: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        raise ValueError(f"model: cannot import module {where!r} (from {spec!r}): {err}; give "
                         "a module on PYTHONPATH or path/to/file.py:callable") from None


# The input convention ------------------------------------------------------------------------


def normalization_of(
    mean: Sequence[float] | None, std: Sequence[float] | None, normalize: bool
) -> dict[str, list[float]] | None:
    """The standardisation a user's model expects: {'mean', 'std'}, or None for [0, 1] pixels."""
    if not normalize:
        if mean is not None or std is not None:
            raise ValueError("mean/std: give them or normalize=False (--no-normalize), not both")
        return None
    if mean is None or std is None:
        raise ValueError("mean/std: the model's expected input is unknown; give mean and std "
                         "(--mean/--std, one value per channel) for a model of standardised "
                         "input, or normalize=False (--no-normalize) for one of [0, 1] pixels")
    values = {"mean": _floats(mean, "mean"), "std": _floats(std, "std")}
    if len(values["mean"]) != len(values["std"]):
        raise ValueError(f"mean/std must have one value per channel each, got "
                         f"{len(values['mean'])} and {len(values['std'])} values")
    if any(s <= 0 for s in values["std"]):
        raise ValueError(f"std must be positive, got {values['std']}")
    return values


def _floats(values: Sequence[float], name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be one or more finite numbers, got {values!r}")
    return out


def with_input_convention(
    network: nn.Module, normalization: dict[str, list[float]] | None, channels: int
) -> nn.Sequential:
    """Standardize -> `network`, reading [0, 1] pixels like smoothcert's own models."""
    if normalization is None:
        return nn.Sequential(Standardize((0.0,), (1.0,)), network).eval()
    if len(normalization["mean"]) not in (1, channels):
        raise ValueError(f"mean/std: {len(normalization['mean'])} values for {channels}-channel "
                         f"input; give 1 or {channels}")
    return nn.Sequential(Standardize(normalization["mean"], normalization["std"]), network).eval()


def probe_num_classes(model: nn.Module, channels: int, image_size: int) -> int:
    """The number of outputs `model` gives one [0, 1] image of `channels`x`image_size`^2."""
    shape = (1, channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.full(shape, 0.5))
    except Exception as err:  # the user's forward: any failure is reported on one line
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"model: fails on a probe input of shape {list(shape)} "
                         f"(image_size={image_size}): {first.strip()}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        what = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: must return logits of shape [batch, classes]; on a probe "
                         f"input of shape {list(shape)} it returns {what}")
    return int(out.shape[1])


# The config.json / checkpoint config key of a run built by spec or for a user's data.
USER_RECORD = "built_for"


def build_recorded(spec: str, kwargs: Mapping[str, Any] | None, record: Mapping[str, Any]
                   ) -> nn.Sequential:
    """`spec` for a user's data as a training run records it (`num_classes`, `channels`,
    `normalization`), behind its input convention."""
    network = build_from_spec(spec, record["num_classes"], kwargs, record["channels"])
    return with_input_convention(network.train(), record["normalization"], record["channels"])
