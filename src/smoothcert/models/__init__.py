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


def build_model(name: str, dataset: str) -> nn.Sequential:
    """`name` built for `dataset`'s classes and channels, behind that dataset's standardisation."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    info = DATASETS[dataset]
    body = MODELS[name](num_classes=info.num_classes, in_channels=info.channels)
    return nn.Sequential(Standardize(info.mean, info.std), body)


__all__ = ["MODELS", "Standardize", "build_model", "list_models", "register_model"]
