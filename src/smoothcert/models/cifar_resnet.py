"""He et al. (2016) CIFAR ResNets: depth 6n+2, basic blocks, stages of 16/32/64 channels."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from smoothcert.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        # Projection shortcut where the shape changes, as in the code Cohen et al. and
        # Salman et al. trained with (He et al.'s option B).
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # Average over the whole map in one window: on CIFAR's 8x8 maps this is the published
        # code's AvgPool2d(8) bit for bit (adaptive pooling sums in another order).
        x = nn.functional.avg_pool2d(x, x.shape[-2:])
        return self.fc(torch.flatten(x, 1))


@register_model("cifar_resnet20")
def cifar_resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


@register_model("cifar_resnet56")
def cifar_resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


@register_model("cifar_resnet110")
def cifar_resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes, in_channels)


def rename_published_keys(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the published CIFAR ResNet code, renamed to this module's names.

    Cohen et al.'s `archs/cifar_resnet.py` (also used by SmoothAdv, Consistency, SmoothMix and
    MACER) has the same layers in the same order; it only calls the projection shortcut
    `downsample` (`layerI.J.downsample.0` conv, `.1` BatchNorm) where this module says `shortcut`.
    """
    return {key.replace(".downsample.", ".shortcut."): value for key, value in weights.items()}
