"""Channel-wise standardisation as the model's first layer, so inputs stay in [0,1] pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Standardize(nn.Module):
    """`(x - mean) / std` per channel; mean and std are buffers, so checkpoints carry them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(
                f"mean and std must have the same positive length, got {len(mean)} and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        mean = tuple(round(v, 6) for v in self.mean.tolist())
        std = tuple(round(v, 6) for v in self.std.tolist())
        return f"mean={mean}, std={std}"
