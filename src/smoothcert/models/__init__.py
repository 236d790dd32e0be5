"""Base classifiers: `build_model(name, dataset)` = Standardize(dataset mean/std) -> network.

A new architecture is one factory `(num_classes, in_channels) -> nn.Module` decorated with
`@register_model(name)` in a module imported below."""

from __future__ import annotations

from torch import nn

from smoothcert.data import DATASETS
from smoothcert.models.normalize import Standardize
from smoothcert.models.registry import MODELS, list_models, register_model

# Importing an architecture's module registers it; this order is `smoothcert models`' order.
# isort: split
from smoothcert.models import lenet, lenet_20_50  # noqa: F401

# isort: split
from smoothcert.models import cifar_resnet, imagenet  # noqa: F401

# isort: split
from smoothcert.models import dncnn  # noqa: F401

# (x - 0) / 1 is exact: an image-to-image model (a denoiser) reads and returns [0, 1] pixels.
_NO_STANDARDISATION = ((0.0,), (1.0,))


def build_model(name: str, dataset: str) -> nn.Sequential:
    """`name` built for `dataset`'s classes and channels, behind that dataset's standardisation
    (an identity one for a model with `outputs_images`, a denoiser: its output is an image)."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    info = DATASETS[dataset]
    body = MODELS[name](num_classes=info.num_classes, in_channels=info.channels)
    mean, std = _NO_STANDARDISATION if getattr(body, "outputs_images", False) else (
        info.mean, info.std)
    return nn.Sequential(Standardize(mean, std), body)


__all__ = ["MODELS", "Standardize", "build_model", "list_models", "register_model"]
