"""ResNet-50 for ImageNet from torchvision, randomly initialised (weights are never downloaded)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet50 as tv_resnet50

from smoothcert.models.registry import register_model


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    model = tv_resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model
