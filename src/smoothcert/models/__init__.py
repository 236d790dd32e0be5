"""Base classifiers: `build_model(name, dataset)` = Standardize(dataset mean/std) -> network."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from smoothcert.data import DATASETS
from smoothcert.models.cifar_resnet import cifar_resnet20, cifar_resnet56, cifar_resnet110
from smoothcert.models.imagenet import resnet50
from smoothcert.models.lenet import lenet
from smoothcert.models.lenet_20_50 import lenet_20_50
from smoothcert.models.normalize import Standardize

# Each factory takes (num_classes, in_channels); build_model puts the dataset's standardisation
# in front, so the whole model reads [0,1] pixels and sigma and radii are in pixel units.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": lenet,
    "lenet_20_50": lenet_20_50,
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet56": cifar_resnet56,
    "cifar_resnet110": cifar_resnet110,
    "resnet50": resnet50,
}


def build_model(name: str, dataset: str) -> nn.Sequential:
    """`name` built for `dataset`'s classes and channels, behind that dataset's standardisation."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    info = DATASETS[dataset]
    body = MODELS[name](num_classes=info.num_classes, in_channels=info.channels)
    return nn.Sequential(Standardize(info.mean, info.std), body)


__all__ = ["MODELS", "Standardize", "build_model"]
