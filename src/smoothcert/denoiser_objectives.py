"""The objectives that train a denoiser for denoised smoothing (Salman et al., NeurIPS 2020,
"Denoised smoothing: a provable defense for pretrained classifiers"): `denoiser-mse` and
`denoiser-stability`, with a frozen classifier. `smoothcert.objectives` imports this module, so
they are registered with the others (import `smoothcert.objectives` first: this module imported
before it leaves `objectives.ObjectiveConfig` without their `classifier` option)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from smoothcert.losses import denoiser_mse_loss, denoiser_stability_loss
from smoothcert.objectives import (
    CommonConfig,
    _check_noise,
    _help,
    _noisy_accuracy,
    register_objective,
)
from smoothcert.sampling import check_logits


@dataclass(frozen=True)
class DenoiserConfig(CommonConfig):
    """The objectives that train a denoiser (Salman et al., NeurIPS 2020): a model that returns
    an image of its input's shape, e.g. `--model dncnn`, trained on k noisy copies per image."""

    trains_denoiser: ClassVar[bool] = True


@dataclass(frozen=True)
class StabilityConfig(DenoiserConfig):
    """denoiser-stability: the frozen classifier the denoiser is trained for."""

    classifier: str | None = _help(
        "checkpoint of the frozen classifier the denoiser is trained for (denoiser-stability)",
        None,
    )

    def check_training(self, objective: str) -> None:
        super().check_training(objective)
        if not self.classifier:
            raise ValueError(
                f"classifier: objective {objective} needs --classifier CKPT, the checkpoint of "
                "the classifier the denoiser is trained for"
            )
        frozen_classifier(self.classifier, "cpu")  # a missing or bad file, before any work


def frozen_classifier(path: str | os.PathLike, device: torch.device | str) -> nn.Module:
    """The classifier of checkpoint `path` on `device`, in eval mode, with requires_grad off:
    loaded once per file content (path, size and modification time), not once per batch."""
    try:
        stat = Path(path).resolve().stat()
    except OSError as err:
        raise ValueError(f"classifier: cannot read '{path}': {err.strerror or err}") from None
    model = _load_frozen(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    return model.to(device).eval()


@functools.lru_cache(maxsize=4)
def _load_frozen(path: str, size: int, mtime_ns: int) -> nn.Module:
    from smoothcert.checkpoints import load_checkpoint

    try:
        model = load_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"classifier: {err}") from None
    return model.requires_grad_(False).eval()


def _denoised(model: nn.Module, x: Tensor, noise: Tensor, cfg: CommonConfig) -> Tensor:
    """The denoiser's outputs D(x_i + noise_ij), [B, k, *x.shape[1:]]."""
    _check_noise(x, noise, cfg)
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)
    out = model(noisy)
    if not isinstance(out, Tensor) or out.shape != noisy.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"a denoiser objective trains a model that returns images of its input's shape "
            f"{tuple(noisy.shape)} (e.g. --model dncnn), got {got}"
        )
    return out.unflatten(0, noise.shape[:2])


@register_objective("denoiser-mse", config=DenoiserConfig)
def denoiser_mse(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: DenoiserConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Denoiser, MSE (Salman 2020): mean over pixels of (D(x + delta) - x)^2; `y` is unused."""
    loss = denoiser_mse_loss(_denoised(model, x, noise, cfg), x)
    return loss, {"mse": loss.detach()}


@register_objective("denoiser-stability", config=StabilityConfig)
def denoiser_stability(
    model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, cfg: StabilityConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Denoiser, stability (Salman 2020): CE of the frozen --classifier on D(x + delta) against
    its prediction on x; logs the MSE and the classifier's noisy accuracy behind the denoiser."""
    classifier = frozen_classifier(cfg.classifier, x.device)
    with torch.no_grad():
        target = classifier(x).argmax(dim=1)
    denoised = _denoised(model, x, noise, cfg)
    b, k = noise.shape[:2]
    logits = check_logits(classifier(denoised.flatten(0, 1)), b * k).unflatten(0, (b, k))
    loss = denoiser_stability_loss(logits, target, cfg.label_smoothing)
    terms = {"mse": denoiser_mse_loss(denoised.detach(), x), "acc": _noisy_accuracy(logits, y)}
    return loss, terms
