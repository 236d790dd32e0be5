"""Shared fixtures: base classifiers whose smoothed classifier is known exactly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

# The shared data and specs: $SMOOTHCERT_SHARED, else the documented ../shared beside the repo.
SHARED = Path(os.environ.get("SMOOTHCERT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SHARED_DATA = SHARED / "data"
INTEROP = SHARED / "interop"
CIFAR_SUBSET = SHARED_DATA / "cifar10-subset"
CIFAR_NPZ = CIFAR_SUBSET / "cifar10_subset.npz"
needs_interop = pytest.mark.skipif(not INTEROP.is_dir(), reason=f"{INTEROP} is absent")
needs_cifar = pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason=f"{CIFAR_NPZ} is absent")


class ThresholdClassifier(nn.Module):
    """Class = number of thresholds below the first input coordinate (one-hot logits)."""

    def __init__(self, thresholds: list[float]):
        super().__init__()
        self.register_buffer("thresholds", torch.tensor(sorted(thresholds)))

    @property
    def num_classes(self) -> int:
        return len(self.thresholds) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x.reshape(len(x), -1)[:, :1] > self.thresholds).sum(dim=1)
        return nn.functional.one_hot(cls, self.num_classes).float()

    def class_probabilities(self, x0: float, sigma: float) -> np.ndarray:
        """Exact P(f(x + delta) = c) for x whose first coordinate is x0."""
        edges = np.concatenate([[-np.inf], self.thresholds.numpy(), [np.inf]])
        return np.diff(norm.cdf((edges - x0) / sigma))


class LinearTwoClass(nn.Module):
    """Logits [0, w.x + b]: the smoothed classifier's radius is exactly |w.x + b| / ||w||."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.linear = nn.Linear(len(w), 1)
        with torch.no_grad():
            self.linear.weight.copy_(w[None])
            self.linear.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.linear(x.reshape(len(x), -1))
        return torch.cat([torch.zeros_like(score), score], dim=1)


class InputRecorder(nn.Module):
    """Wraps a model and keeps a copy of every batch it is given."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return self.model(x)


def true_radius(probs: np.ndarray, sigma: float) -> tuple[int, float]:
    """The exact certified radius of the smoothed classifier from its class probabilities."""
    order = np.argsort(-probs)
    p_a, p_b = probs[order[0]], probs[order[1]]
    return int(order[0]), float(sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b)))


@pytest.fixture
def cifar_npz() -> Path:
    """The shared CIFAR-10 subset; the test is skipped, saying where it looked, without it."""
    if not CIFAR_NPZ.is_file():
        pytest.skip(f"the CIFAR-10 subset is absent: expected {CIFAR_NPZ} (set SMOOTHCERT_SHARED)")
    return CIFAR_NPZ


@pytest.fixture
def threshold_classifier() -> ThresholdClassifier:
    return ThresholdClassifier([-0.4, 0.5, 1.2])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A LeNet trained for 2 epochs on 512 MNIST images (Gaussian, sigma 0.5, k 2), CPU.

    Shared by the runner and CLI tests; treat it as read-only.
    """
    from smoothcert.presets import resolve_config
    from smoothcert.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = resolve_config(
        "mnist-lenet", sigma=0.5, k=2, epochs=2, batch=64, train_subset=512, eval_subset=0,
        device="cpu", out=str(out),
    )
    return train(cfg, progress=False)
