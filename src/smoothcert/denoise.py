"""Denoised smoothing: a denoiser in front of an off-the-shelf classifier.

`Denoised(denoiser, classifier)` is a base classifier like any other: `Smooth` adds the noise
before it, so the certificate is of denoiser-then-classifier as it runs (Salman et al.,
NeurIPS 2020, "Denoised smoothing"). The denoiser is either trained (`--model dncnn` with the
`denoiser-mse` / `denoiser-stability` objectives) or an off-the-shelf DDPM used for one-shot
denoising (`DiffusionDenoiser`; Carlini, Tramèr et al., ICLR 2023, "(Certified!!) Adversarial
robustness for free!").

One-shot denoising with a DDPM whose inputs live in [-1, 1] and whose forward process is
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (a_t the cumulative product of the alphas): an image
x + delta in [0, 1] with delta ~ N(0, sigma^2 I) becomes 2(x + delta) - 1 = x_0 + 2 delta, noise of
standard deviation 2 sigma; scaled by sqrt(a_t) it is a sample x_t of the forward process at the
timestep t* where sqrt((1 - a_t) / a_t) = 2 sigma. One evaluation of the noise predictor eps_hat
then gives x0_hat = (x_t - sqrt(1 - a_t) eps_hat(x_t, t*)) / sqrt(a_t), mapped back to [0, 1].
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .extras import import_extra, missing_extra_message
from .io import first_line, weights_digest

EXTRA_MESSAGE = missing_extra_message("diffusers", "diffusion", "DiffusionDenoiser")


class Denoised(nn.Module):
    """classifier(denoiser(x)): the base classifier of denoised smoothing. The noise is added
    by `Smooth` before the denoiser, so this module adds none. train()/eval(), `.to()` (also
    channels_last) and autocast reach both parts, as for any submodule."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.denoiser(x))


def diffusion_timestep(alphas_cumprod: Tensor | Any, sigma: float) -> int:
    """t*: the first timestep t (0-based, as the DDPM's scheduler counts) at which the noise
    level sqrt((1 - a_t) / a_t) of `alphas_cumprod` reaches 2 sigma, i.e. is >= 2 sigma.

    Carlini et al. (Algorithm 1) take the t with sqrt((1 - a_t) / a_t) = 2 sigma; on a discrete
    schedule it lies between two timesteps, and the first one at or above it tells the DDPM at
    least the noise the input carries (never less). The factor 2: the DDPM's inputs live in
    [-1, 1], twice the range of smoothcert's [0, 1] pixels, so delta becomes 2 delta.
    Raises ValueError for a sigma beyond the schedule's largest noise level.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
    if alphas.dim() != 1 or len(alphas) == 0 or not bool(((alphas > 0) & (alphas <= 1)).all()):
        raise ValueError(
            "alphas_cumprod must be a non-empty 1-D sequence of values in (0, 1], got "
            f"shape {tuple(alphas.shape)}"
        )
    levels = ((1 - alphas) / alphas).sqrt()
    reached = (levels >= 2 * sigma).nonzero()
    if len(reached) == 0:
        raise ValueError(
            f"sigma: {sigma} is beyond the diffusion schedule: its largest noise level "
            f"sqrt((1 - a_t)/a_t) = {levels.max().item():.4g} (at t = {int(levels.argmax())}) is "
            f"below 2 sigma = {2 * sigma:.4g}; sigma must be at most {levels.max().item() / 2:.4g}"
        )
    return int(reached[0])


class DiffusionDenoiser(nn.Module):
    """One-shot DDPM denoising of [0, 1] images at noise level `sigma` (see the module's notes).

    `unet(x_t, t)` predicts the noise (a tensor or diffusers' output with `.sample`); a UNet
    with a learned variance returns 2C channels for C input channels, of which the first C are
    the noise prediction (the rest parametrise the variance, which one-shot denoising does not
    use). x0_hat is clamped to [-1, 1] before it is mapped back, so the classifier sees [0, 1]
    images, as a DDPM sampler clips its x0 prediction.

    With `image_size` (the DDPM's resolution, an int or (height, width)) an input of another
    size is resized to it before denoising and the result back to the input's size, both with
    bilinear interpolation (antialiased when shrinking). Resizing a noisy image changes its
    noise (interpolation averages neighbouring pixels), so the DDPM at t* is then told a
    noise level that is only approximately the one its input carries; the certificate is
    unaffected (it is of what runs), its accuracy may be.
    """

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: Tensor | Any,
        sigma: float,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.sigma = float(sigma)
        self.timestep = diffusion_timestep(alphas_cumprod, sigma)
        alpha = float(torch.as_tensor(alphas_cumprod, dtype=torch.float64)[self.timestep])
        self.scale_in = math.sqrt(alpha)  # sqrt(a_t*)
        self.noise_scale = math.sqrt(1 - alpha)  # sqrt(1 - a_t*)
        self.image_size = _size_pair(image_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [B, C, H, W], got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        resize = self.image_size is not None and self.image_size != size
        if resize:
            x = _resize(x, self.image_size)
        x_t = self.scale_in * (2 * x - 1)
        eps = self._noise_prediction(x_t)
        x0 = ((x_t - self.noise_scale * eps) / self.scale_in).clamp(-1, 1)
        out = (x0 + 1) / 2
        return _resize(out, size) if resize else out

    def _noise_prediction(self, x_t: Tensor) -> Tensor:
        t = torch.full((len(x_t),), self.timestep, dtype=torch.long, device=x_t.device)
        out = self.unet(x_t, t)
        eps = getattr(out, "sample", out)
        channels = x_t.shape[1]
        if not isinstance(eps, Tensor) or eps.shape[0] != len(x_t) or eps.shape[1] not in (
                channels, 2 * channels) or eps.shape[2:] != x_t.shape[2:]:
            shape = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
            raise ValueError(
                f"unet must predict the noise of its input {tuple(x_t.shape)}: {channels} "
                f"channels (or {2 * channels} with a learned variance), got {shape}"
            )
        return eps[:, :channels]

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma}, timestep={self.timestep}, "
                f"image_size={self.image_size}")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, sigma: float) -> DiffusionDenoiser:
        """A local diffusers `UNet2DModel` + `DDPMScheduler`, in eval mode, at its own
        resolution (config `sample_size`). `folder` is either flat (config.json,
        scheduler_config.json and the weights, as the hub's google/ddpm-cifar10-32) or a
        pipeline folder (unet/ and scheduler/ subfolders). Nothing is ever downloaded."""
        diffusers = import_extra("diffusers", "diffusion", "DiffusionDenoiser")
        unet_dir, scheduler_dir = _diffusers_layout(Path(folder))
        try:
            # low_cpu_mem_usage=False: the default asks for `accelerate`, and warns without it.
            unet = diffusers.UNet2DModel.from_pretrained(
                unet_dir, local_files_only=True, low_cpu_mem_usage=False
            )
            scheduler = diffusers.DDPMScheduler.from_pretrained(
                scheduler_dir, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"denoiser: '{folder}' does not hold a loadable diffusers UNet2DModel and "
                f"DDPMScheduler ({type(err).__name__}: {first_line(err)})"
            ) from None
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"denoiser: '{folder}' predicts {prediction!r}; one-shot denoising reads a "
                "noise prediction (prediction_type 'epsilon')"
            )
        return cls(unet, scheduler.alphas_cumprod, sigma, unet.config.sample_size).eval()


def _diffusers_layout(folder: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler folder) of a flat or a pipeline folder."""
    if not folder.is_dir():
        raise ValueError(f"denoiser: '{folder}' is not a folder (a diffusers model folder)")
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet", folder / "scheduler"
    if (folder / "config.json").is_file():
        return folder, folder
    raise ValueError(
        f"denoiser: '{folder}' holds neither config.json and scheduler_config.json (a flat "
        "diffusers folder) nor unet/ and scheduler/ (a pipeline folder)"
    )


def _size_pair(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise ValueError(f"image_size must be an integer >= 1 or (height, width), got {size!r}")
    return pair


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


DIFFUSERS_PREFIX = "diffusers:"


def outputs_images(model: nn.Module) -> bool:
    """Whether `model` (a smoothcert model: standardisation, then the network) is a denoiser."""
    body = model[-1] if isinstance(model, nn.Sequential) and len(model) else model
    return bool(getattr(body, "outputs_images", False))


def load_denoiser(spec: str, sigma: float, channels: int) -> tuple[nn.Module, str]:
    """The denoiser named by `spec` (on the CPU, eval mode) and the sha256 of what it computes.

    `spec` is a smoothcert checkpoint of a denoiser (the file's sha256) or `diffusers:FOLDER`
    (a DiffusionDenoiser at `sigma`: the sha256 of its UNet's weights and of its timestep, which
    the scheduler and sigma decide). `channels`: the classifier's input channels.
    """
    if spec.startswith(DIFFUSERS_PREFIX):
        denoiser = DiffusionDenoiser.from_pretrained(spec[len(DIFFUSERS_PREFIX):], sigma)
        weights = weights_digest(denoiser.unet.state_dict())
        digest = hashlib.sha256(f"{weights}|timestep={denoiser.timestep}".encode()).hexdigest()
        got = denoiser.unet.config.in_channels
    else:
        denoiser, digest, got = _checkpoint_denoiser(spec)
    if got != channels:
        raise ValueError(f"denoiser: '{spec}' denoises {got}-channel images, but the classifier "
                         f"reads {channels}-channel ones")
    return denoiser, digest


def _checkpoint_denoiser(path: str) -> tuple[nn.Module, str, int]:
    from .checkpoints import load_native
    from .data import dataset_info
    from .sidecar import file_sha256

    if not os.path.isfile(path):
        raise ValueError(f"denoiser: '{path}' is not a file: give a denoiser checkpoint of "
                         f"`smoothcert train` or {DIFFUSERS_PREFIX}FOLDER")
    digest = file_sha256(path)  # before loading, as the classifier's
    try:
        model, config = load_native(path)
    except ValueError as err:
        raise ValueError(f"denoiser: {err}") from None
    if not outputs_images(model):
        raise ValueError(f"denoiser: '{path}' is a classifier ({config['model']}), not a "
                         "denoiser: give it as the CLASSIFIER, or a denoiser trained with "
                         "--objective denoiser-mse or denoiser-stability as --denoiser")
    return model, digest, dataset_info(config["dataset"]).channels
