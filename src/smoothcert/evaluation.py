"""The training log's test metrics: a classifier's accuracy and a denoiser's squared error, on
clean inputs and under one Gaussian draw per example."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


@torch.inference_mode()
def _clean_and_noisy(
    model: nn.Module, dataset: Dataset, sigma: float, device: torch.device, batch: int,
    seed: int, score: Score,
) -> tuple[float, float]:
    """The mean of `score(output, x, y)` (a sum and its count) on clean inputs and under one
    Gaussian draw per example."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(2, device=device)
    total = 0
    for x, y in DataLoader(dataset, batch_size=batch):
        x, y = x.to(device), y.to(device)
        noisy = x + sigma * torch.randn(x.shape, generator=generator, device=device)
        (clean_sum, count), (noisy_sum, _) = score(model(x), x, y), score(model(noisy), x, y)
        sums += torch.stack([clean_sum, noisy_sum])
        total += count
    clean, noisy = (sums / max(total, 1)).tolist()
    return clean, noisy


def evaluate(
    model: nn.Module, dataset: Dataset, sigma: float, device: torch.device, batch: int, seed: int
) -> dict[str, float]:
    """Clean accuracy and accuracy under one Gaussian draw per example."""
    clean, noisy = _clean_and_noisy(model, dataset, sigma, device, batch, seed,
                                    lambda out, x, y: ((out.argmax(1) == y).sum(), len(y)))
    return {"test_clean_acc": clean, "test_noisy_acc": noisy}


def evaluate_denoiser(
    model: nn.Module, dataset: Dataset, sigma: float, device: torch.device, batch: int, seed: int
) -> dict[str, float]:
    """A denoiser's mean squared error per pixel (it has no accuracy), on clean inputs and under
    one Gaussian draw per example."""
    clean, noisy = _clean_and_noisy(model, dataset, sigma, device, batch, seed,
                                    lambda out, x, y: ((out - x).square().sum(), x.numel()))
    return {"test_clean_mse": clean, "test_noisy_mse": noisy}
