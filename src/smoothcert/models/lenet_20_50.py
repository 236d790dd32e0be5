"""The LeNet of PyTorch's MNIST example, as used by smoothing-consistency and MACER.

conv 5x5 (20) -> ReLU -> max-pool 2 -> conv 5x5 (50) -> ReLU -> max-pool 2 -> fc 800 -> 500
-> ReLU -> fc 10. Parameter names (conv1, conv2, fc1, fc2) are those of the published code, so
its state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from smoothcert.models.registry import register_model


class LeNet2050(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        # Equal to max_pool2d(2) on the 8x8 maps of 28x28 inputs; adaptive so other sizes fit fc1.
        x = F.adaptive_max_pool2d(F.relu(self.conv2(x)), 4)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@register_model("lenet_20_50")
def lenet_20_50(num_classes: int = 10, in_channels: int = 1) -> LeNet2050:
    return LeNet2050(num_classes, in_channels)
