"""The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I).

Method names and signatures follow Cohen et al.'s `core.Smooth`, so code written against it
runs unchanged; `tcertify` and `certify_all` add the paper's T-CERTIFY, `certify_radii` and
`certify_adaptive` the sequential variants (`smoothcert.sequential_sampling`). The samples are
drawn by a `sampling.NoiseSampler`; this module turns their counts into certificates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from . import sequential_sampling, stats
from .sampling import NoiseSampler, estimation_stream
from .sequential import RadiiCertificate
from .stats import ABSTAIN, Certificate, CertifyAllResult

__all__ = ["ABSTAIN", "CertifyAllResult", "Smooth"]


class Smooth:
    """Smoothed classifier over `base_classifier` (any nn.Module mapping [B, *shape] to logits).

    The noise is calibrated to inputs in `input_range` ([0, 1] pixels by default); inputs
    outside it are refused. Give the range a base classifier really takes, or None to accept
    any finite input. `sound=True` samples soundly on the 8-bit lattice (Voráček & Hein;
    `smoothcert.lattice`, docs/statistics.md): the certificates then hold against lattice
    perturbations even for a base classifier that reads the low bits of its inputs.
    Sampling (`self.sampler`, a NoiseSampler) runs the base classifier in
    eval mode and then gives every submodule its previous mode back, even when sampling fails.
    The base classifier is untrusted: each of its outputs must be finite logits, one row per
    input and num_classes columns, or sampling stops with a ValueError.

    Arguments: Cohen's `Smooth(base_classifier, num_classes, sigma)`, `predict(x, n, alpha,
    batch_size)` and `certify(x, n0, n, alpha, batch_size)` may be given by position, as code
    written against Cohen's `core.Smooth` does; `tcertify` and `certify_all` take the same ones
    in the same order. Every other argument is keyword-only (amp, input_range, compile, grid,
    strict, the generators, and everything after x of `certify_radii` and `certify_adaptive`,
    whose alpha and max_n come in opposite orders and would otherwise swap silently).
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float,
                 **sampler_options: Any):
        """sampler_options: `NoiseSampler`'s amp (None, "bf16" or "fp16"), input_range and
        sound (False; True or "exact": sound sampling on the 8-bit lattice, inputs off it
        refused; "round": rounded onto it) and compile (True: torch.compile with freezing and
        static shapes; "openvino": OpenVINO, the smoothcert[openvino] extra; eager, warned,
        where compilation fails)."""
        self.sampler = NoiseSampler(base_classifier, num_classes, sigma, **sampler_options)

    @property
    def base_classifier(self) -> nn.Module:
        return self.sampler.base_classifier

    @property
    def num_classes(self) -> int:
        return self.sampler.num_classes

    @property
    def sigma(self) -> float:
        return self.sampler.sigma

    @property
    def sound(self) -> str | None:
        """None (ordinary sampling), "exact" or "round" (sound sampling, `lattice`)."""
        return self.sampler.sound

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *,
                generator: torch.Generator | None = None) -> int:
        """Cohen's PREDICT: the top class, or ABSTAIN unless the top-two test rejects at alpha."""
        stats.check_alpha(alpha)
        counts = self.sampler.counts(x, n, batch_size, generator, name="n")
        return stats.predict_from_counts(counts, alpha)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                generator: torch.Generator | None = None,
                estimation_generator: torch.Generator | None = None) -> tuple[int, float]:
        """Cohen's CERTIFY of one example x: (label, radius), or (ABSTAIN, 0.0).

        The n0 selection samples are drawn from `generator`, the n estimation samples from
        `estimation_generator` (from where `generator` left off when it is None). For CERTIFY
        and T-CERTIFY on the same samples, use `certify_all`; for a dataset, `certify_dataset`.
        """
        cert = self._certify(x, n0, n, alpha, batch_size, "certify", 1,
                             (generator, estimation_generator))
        return cert.label, cert.radius

    def tcertify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                 grid: int = 10, strict: bool = False,
                 generator: torch.Generator | None = None,
                 estimation_generator: torch.Generator | None = None) -> tuple[int, float]:
        """The paper's T-CERTIFY (strict=True: alpha' chosen from the selection samples only).
        `certify_all` gives it with CERTIFY's certificate on the same samples."""
        method = "tcertify-strict" if strict else "tcertify"
        cert = self._certify(x, n0, n, alpha, batch_size, method, grid,
                             (generator, estimation_generator))
        return cert.label, cert.radius

    def certify_all(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                    grid: int = 10, generator: torch.Generator | None = None,
                    estimation_generator: torch.Generator | None = None) -> CertifyAllResult:
        """CERTIFY and T-CERTIFY (paper and strict) on the same selection and estimation samples."""
        selection, estimation = self._counts(x, n0, n, alpha, batch_size, grid,
                                             (generator, estimation_generator))
        return CertifyAllResult.from_counts(selection, estimation, self.sigma, alpha, grid)

    def certify_radii(self, x: torch.Tensor, **options: Any) -> RadiiCertificate:
        """Is x certified at each of `radii`? Sequential sampling at given radii: the keyword
        arguments and guarantee of `sequential_sampling.certify_radii`."""
        return sequential_sampling.certify_radii(self.sampler, x, **options)

    def certify_adaptive(self, x: torch.Tensor, **options: Any) -> CertifyAllResult:
        """certify_all with each input's n chosen from its selection counts: the keyword
        arguments of `sequential_sampling.certify_adaptive`."""
        return sequential_sampling.certify_adaptive(self.sampler, x, **options)

    def _certify(self, x, n0, n, alpha, batch_size, method, grid, generators) -> Certificate:
        selection, estimation = self._counts(x, n0, n, alpha, batch_size, grid, generators)
        return stats.certify_from_counts(selection, estimation, self.sigma, alpha, method, grid)

    def _counts(self, x, n0, n, alpha, batch_size, grid, generators
                ) -> tuple[np.ndarray, np.ndarray]:
        """The n0 selection and n estimation counts, after the checks that need no sample."""
        stats.check_alpha_grid(alpha, grid)
        stats.check_sample_count(n, "n")  # before the n0 selection samples are drawn
        _check_one_example(x)
        generator, estimation_generator = generators
        selection = self.sampler.counts(x, n0, batch_size, generator, name="n0")
        estimation = self.sampler.counts(
            x, n, batch_size, estimation_stream(generator, estimation_generator), name="n")
        return selection, estimation


def _check_one_example(x: Any) -> None:
    """Refuse a batch of images: a single image is [C, H, W] (a 1-channel one [1, H, W])."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        raise ValueError(f"x: Smooth certifies one example (an image [C, H, W], no batch axis), "
                         f"got a batch of shape {list(x.shape)}; certify a dataset with "
                         "smoothcert.certify_dataset(model, dataset, sigma=..., out=...)")
