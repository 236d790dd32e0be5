"""A DnCNN-style denoiser (Zhang et al., IEEE TIP 2017), as Salman et al. (NeurIPS 2020) train
for denoised smoothing: conv 3x3 + ReLU, depth - 2 blocks of conv 3x3 + BatchNorm + ReLU, and a
conv 3x3 back to the image's channels, which predicts the noise; the output is the input less
it (residual learning). Input and output are [0, 1] pixels of the dataset's channels (1 for
MNIST, 3 for CIFAR-10 and ImageNet); build_model puts no standardisation in front of it.
"""

from __future__ import annotations

import torch
from torch import nn

from smoothcert.models.registry import register_model


class DnCNN(nn.Module):
    # build_model standardises classifiers' inputs, never an image-to-image model's.
    outputs_images = True

    def __init__(self, channels: int, depth: int = 17, width: int = 64) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be an integer >= 2, got {depth}")
        if width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.noise = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.noise(x)


@register_model("dncnn")
def dncnn(num_classes: int = 10, in_channels: int = 1) -> DnCNN:
    """Salman et al.'s denoiser: depth 17, width 64 (num_classes is unused: it outputs images)."""
    return DnCNN(in_channels)


@register_model("dncnn_small")
def dncnn_small(num_classes: int = 10, in_channels: int = 1) -> DnCNN:
    """A depth-7, width-32 DnCNN for CPU-scale runs (about 1/20 of dncnn's compute)."""
    return DnCNN(in_channels, depth=7, width=32)
