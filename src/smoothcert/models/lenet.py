"""A small LeNet-style CNN for MNIST (about 99% clean accuracy, cheap on a CPU)."""

from __future__ import annotations

from torch import nn

from smoothcert.models.registry import register_model


@register_model("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5),
        nn.ReLU(inplace=True),
        # Equal to MaxPool2d(2) on 28x28 inputs; adaptive so other image sizes also fit the fc.
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )
