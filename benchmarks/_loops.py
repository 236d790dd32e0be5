"""The workloads the benchmarks compare: models, the raw forward loop, the reference loop."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from smoothcert import Smooth, stats
from smoothcert.models import build_model
from smoothcert.sampling import NoiseSampler
from smoothcert.sampling import autocast as smooth_autocast

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "imagenet": (3, 224, 224)}
CLASSES = {"mnist": 10, "cifar10": 10, "imagenet": 1000}
LABELS = {
    "lenet": "LeNet (MNIST)",
    "cifar_resnet20": "ResNet-20 (CIFAR)",
    "cifar_resnet110": "ResNet-110 (CIFAR)",
    "resnet50": "ResNet-50 (224²)",
}
# name -> (channels_last model, channels_last noise buffer, amp). "cl" draws the noise into a
# channels_last buffer (an alternative smoothcert rejected: ChannelsLastNoiseSmooth below);
# "cl+cnoise" is what Smooth does: a contiguous buffer that the first convolution converts.
CONFIGS = {
    "fp32": (False, False, None),
    "cl": (True, True, None),
    "cl+cnoise": (True, False, None),
    "bf16": (False, False, "bf16"),
    "cl+bf16": (True, True, "bf16"),
    "cl+cnoise+bf16": (True, False, "bf16"),
}
SIGMA = 0.25
ALPHA = 0.001


def make_model(name: str, dataset: str, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, dataset).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_input(dataset: str) -> torch.Tensor:
    return torch.rand(SHAPES[dataset], generator=torch.Generator().manual_seed(0))


def autocast(amp: str | None):
    return smooth_autocast(torch.device("cpu"), amp)


class ChannelsLastNoiseSampler(NoiseSampler):
    """A sampler drawing its noise into a channels_last buffer: measured, not shipped."""

    @staticmethod
    def _noise_buffer(x: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
        buffer = NoiseSampler._noise_buffer(x, size, device)
        return buffer.contiguous(memory_format=torch.channels_last) if x.dim() == 3 else buffer


def smooth_for(model: nn.Module, num_classes: int, buffer_cl: bool, amp: str | None) -> Smooth:
    smooth = Smooth(model, num_classes, SIGMA, amp=amp)
    if buffer_cl:
        smooth.sampler = ChannelsLastNoiseSampler(model, num_classes, SIGMA, amp=amp)
    return smooth


def make_smooth(model: nn.Module, dataset: str, config: str) -> Smooth:
    _, buffer_cl, amp = CONFIGS[config]
    return smooth_for(model, CLASSES[dataset], buffer_cl, amp)


def make_config(name: str, dataset: str, config: str) -> tuple[nn.Module, Smooth]:
    """The model and the smoothed classifier of a configuration of CONFIGS."""
    model = make_model(name, dataset, CONFIGS[config][0])
    return model, make_smooth(model, dataset, config)


def fixed_noise(x: torch.Tensor, batch: int, channels_last: bool) -> torch.Tensor:
    """One batch of noise drawn up front, laid out as Smooth lays out its buffer."""
    noise = torch.randn((batch, *x.shape), generator=torch.Generator().manual_seed(1)) * SIGMA
    if channels_last and x.dim() == 3:
        noise = noise.contiguous(memory_format=torch.channels_last)
    return noise


def raw_noise_loop(model: nn.Module, x: torch.Tensor, buffer: torch.Tensor, nums, batch: int,
                   amp: str | None, generator: torch.Generator) -> None:
    """The limit of any loop that must draw its noise: raw_loop plus normal_ into a buffer."""
    with torch.inference_mode(), autocast(amp):
        for num in nums:
            remaining = num
            while remaining > 0:
                size = min(batch, remaining)
                model(buffer[:size].normal_(0.0, SIGMA, generator=generator).add_(x))
                remaining -= size


def raw_loop(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, nums, batch: int,
             amp: str | None) -> None:
    """The physical limit: `model(x + noise)` over the same batches, noise drawn beforehand."""
    with torch.inference_mode(), autocast(amp):
        for num in nums:
            remaining = num
            while remaining > 0:
                size = min(batch, remaining)
                model(x + noise[:size])
                remaining -= size


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    # Cohen et al.'s core.py, verbatim in substance: a Python loop over the predictions.
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def reference_sample_noise(model: nn.Module, x: torch.Tensor, num: int, batch_size: int,
                           sigma: float, num_classes: int, amp: str | None) -> np.ndarray:
    """Cohen et al.'s `Smooth._sample_noise`: repeat the input, randn_like, argmax, count on
    the host in numpy (the loop the original randomized-smoothing code runs)."""
    with torch.no_grad(), autocast(amp):
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, *([1] * x.dim())))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), num_classes)
        return counts


def reference_certify(model: nn.Module, x: torch.Tensor, n0: int, n: int, batch: int,
                      num_classes: int, amp: str | None) -> stats.Certificate:
    """Cohen's CERTIFY on the reference loop, with the same bound computation as Smooth."""
    selection = reference_sample_noise(model, x, n0, batch, SIGMA, num_classes, amp)
    estimation = reference_sample_noise(model, x, n, batch, SIGMA, num_classes, amp)
    return stats.certify_from_counts(selection, estimation, SIGMA, ALPHA, "certify")
