"""The sequential and adaptive variants of `Smooth`: samples drawn by a `NoiseSampler`, decided
by `smoothcert.sequential` (docs/sequential.md).

Every argument after x is keyword-only: `certify_radii` takes alpha before max_n and
`certify_adaptive` max_n before alpha, so a positional call could silently swap them.
"""

from __future__ import annotations

import numpy as np
import torch

from . import sequential, stats
from .sampling import NoiseSampler, estimation_stream
from .sequential import RadiiCertificate
from .stats import CertifyAllResult


def certify_radii(
    sampler: NoiseSampler,
    x: torch.Tensor,
    *,
    radii,
    alpha: float,
    max_n: int,
    batch_size: int,
    n0: int = 100,
    method: str = "certify",
    confidence_sequence: str = "mixture",
    final_share: float = sequential.FINAL_SHARE,
    precision: float | None = None,
    futility: float | None = sequential.FUTILITY,
    generator: torch.Generator | None = None,
    estimation_generator: torch.Generator | None = None,
) -> RadiiCertificate:
    """Is x certified at each of `radii`? Samples in growing looks and stops each input as
    soon as every radius is decided (sequential.RadiiProcedure), at most n0 + max_n passes.

    method "certify" bounds pA alone, "tcertify" also the runner-up (T-CERTIFY's two
    bounds, alpha split evenly); the guarantee is CERTIFY's: a certified radius is wrong
    with probability <= alpha, whatever the stopping time. final_share of alpha goes to a
    final look at max_n (Clopper-Pearson on all max_n samples); precision stops an input once
    its undecided radii lie within it of the largest certified one, and futility gives up a
    radius that only luck could still certify by max_n (RadiiProcedure). The
    generators are used as in `Smooth.certify`; the certificate records the class counts.
    """
    procedure = sequential.RadiiProcedure(
        radii, sampler.sigma, alpha, max_n, method=method, num_classes=sampler.num_classes,
        confidence_sequence=confidence_sequence, batch_size=batch_size,
        final_share=final_share, precision=precision, futility=futility,
    )
    selection = sampler.counts(x, n0, batch_size, generator, name="n0")
    label = int(np.argmax(selection))
    estimation_generator = estimation_stream(generator, estimation_generator)
    counts = np.zeros(sampler.num_classes, dtype=np.int64)
    while (size := procedure.next_batch()) > 0:
        counts += sampler.counts(x, size, batch_size, estimation_generator)
        procedure.update(counts[label], int(counts.sum()), np.delete(counts, label))
    return procedure.certificate(label, selection_counts=selection)


def certify_adaptive(
    sampler: NoiseSampler,
    x: torch.Tensor,
    *,
    n0: int,
    max_n: int,
    alpha: float,
    batch_size: int,
    tolerance: float = 0.02,
    grid: int = 10,
    generator: torch.Generator | None = None,
    estimation_generator: torch.Generator | None = None,
) -> CertifyAllResult:
    """certify_all with each input's n chosen from its n0 selection counts alone
    (sequential.choose_n: expected radius loss against max_n <= tolerance), then drawn fresh
    (generators as in `Smooth.certify`); the estimation counts record the n used."""
    stats.check_alpha_grid(alpha, grid)
    stats.check_sample_count(max_n, "max_n")
    sequential.check_tolerance(tolerance)
    selection = sampler.counts(x, n0, batch_size, generator, name="n0")
    n = sequential.choose_n(selection, max_n, sampler.sigma, alpha, tolerance)
    estimation = sampler.counts(
        x, n, batch_size, estimation_stream(generator, estimation_generator), name="n")
    return CertifyAllResult.from_counts(selection, estimation, sampler.sigma, alpha, grid)
