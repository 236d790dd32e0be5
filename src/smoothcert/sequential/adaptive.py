"""Input-specific n: the number of estimation samples chosen per input from its selection
counts alone, so that CERTIFY / T-CERTIFY then run unchanged on n fresh samples. numpy/scipy
only.
"""

from __future__ import annotations

import numpy as np

from .. import stats


def check_tolerance(tolerance: float) -> float:
    ok = isinstance(tolerance, (int, float, np.floating)) and not isinstance(tolerance, bool)
    if not (ok and np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    return float(tolerance)


def choose_n(
    selection_counts,
    max_n: int,
    sigma: float,
    alpha: float,
    tolerance: float = 0.02,
    min_n: int = 100,
    confidence: float = 0.05,
    grid_points: int = 64,
) -> int:
    """Each input's n from its selection counts alone (Chen et al. 2022, input-specific
    sampling): the smallest n on the grid max_n * 2^(-j/4) (and min_n) whose CERTIFY radius
    loss against max_n is <= tolerance for every pA in the selection counts' two-sided
    (1 - confidence) Clopper-Pearson interval, radii taken at the typical count round(pA n).

    Only the independent selection samples are used, so CERTIFY / T-CERTIFY on n fresh samples
    keep their exact guarantee; the loss bound is an approximation (typical counts), measured
    in benchmarks/bench_sequential.py.
    """
    counts = np.asarray(selection_counts)
    if counts.ndim != 1 or counts.size < 2 or np.any(counts < 0) or counts.sum() < 1:
        raise ValueError("selection_counts must be a 1-D array of class counts (sum >= 1)")
    max_n = stats.check_positive_int(max_n, "max_n")
    min_n = min(stats.check_positive_int(min_n, "min_n"), max_n)
    sigma, alpha = stats.check_sigma(sigma), stats.check_alpha(alpha)
    confidence = stats.check_alpha(confidence, "confidence")
    check_tolerance(tolerance)
    top, n0 = int(counts.max()), int(counts.sum())
    low = stats.clopper_pearson_lower(top, n0, confidence / 2)
    high = stats.clopper_pearson_upper(top, n0, confidence / 2)
    pa = np.linspace(low, high, grid_points)
    steps = int(np.floor(4 * np.log2(max_n / min_n))) + 1
    grid = np.rint(max_n * 2.0 ** (-np.arange(steps) / 4))
    grid = np.unique(np.concatenate([grid, [min_n, max_n]])).astype(np.int64)  # ascending
    k = np.rint(pa[:, None] * grid[None, :])
    pa_lower = stats.clopper_pearson_lower(k, np.broadcast_to(grid, k.shape), alpha)
    radius = stats.certified_radius(pa_lower, 1.0 - pa_lower, sigma)
    loss = (radius[:, -1:] - radius).max(axis=0)
    return int(grid[np.argmax(loss <= tolerance)])
