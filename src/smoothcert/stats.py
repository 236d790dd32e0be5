"""Confidence bounds and certificates from class counts: plain numpy/scipy, no torch.

Samples -> counts -> bounds -> certificate. Every bound here is rounded conservatively: a
lower bound is never above, and an upper bound never below, the exact Clopper-Pearson value
because of floating-point error (each is checked against the binomial tail it inverts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.stats import beta, binom, binomtest, norm

ABSTAIN = -1
METHODS = ("certify", "tcertify", "tcertify-strict")
Method = Literal["certify", "tcertify", "tcertify-strict"]
_BISECTION_STEPS = 64


@dataclass(frozen=True)
class Certificate:
    """The outcome of one certification: `label` is ABSTAIN (-1) with radius 0 on abstention."""

    label: int
    radius: float
    pa_lower: float
    pb_upper: float
    alpha_prime: float

    def as_dict(self) -> dict:
        return asdict(self)


def check_alpha(alpha: float, name: str = "alpha") -> float:
    if not (isinstance(alpha, (int, float, np.floating)) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def check_sigma(sigma: float) -> float:
    if not (isinstance(sigma, (int, float, np.floating)) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_counts(counts: np.ndarray | list, name: str) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be a 1-D array with one count per class (>= 2 classes)")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold non-negative integer counts")
    if np.any(arr < 0):
        raise ValueError(f"{name} must hold non-negative integer counts")
    if arr.sum() < 1:
        raise ValueError(f"{name} must hold at least one sample (sum >= 1)")
    return arr.astype(np.int64)


def _nudge_until_valid(p: np.ndarray, violates, direction: float) -> np.ndarray:
    """Move `p` by growing relative steps (down for direction -1, up for +1) until valid."""
    p = p.copy()
    step = 1e-15
    bad = violates(p)
    while np.any(bad):
        p[bad] = np.clip(p[bad] * (1.0 + direction * step), 0.0, 1.0)
        step *= 4.0
        bad = violates(p)
    return p


def _broadcast(k, n, alpha) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    scalar = all(np.ndim(v) == 0 for v in (k, n, alpha))
    k, n, alpha = (np.atleast_1d(v).astype(np.float64) for v in np.broadcast_arrays(k, n, alpha))
    return scalar, k, n, alpha


def clopper_pearson_lower(k, n, alpha) -> np.ndarray | float:
    """One-sided level-`alpha` lower confidence bound on p from k successes in n trials."""
    scalar, k, n, alpha = _broadcast(k, n, alpha)
    inside = k > 0
    p = np.zeros_like(k)
    p[inside] = beta.ppf(alpha[inside], k[inside], n[inside] - k[inside] + 1)
    # P(Bin(n, p) >= k) must not exceed alpha at the bound; enforce it against rounding.
    p = _nudge_until_valid(p, lambda q: inside & (binom.sf(k - 1, n, q) > alpha), -1.0)
    return float(p[0]) if scalar else p


def clopper_pearson_upper(k, n, alpha) -> np.ndarray | float:
    """One-sided level-`alpha` upper confidence bound on p from k successes in n trials."""
    scalar, k, n, alpha = _broadcast(k, n, alpha)
    inside = k < n
    p = np.ones_like(k)
    p[inside] = beta.isf(alpha[inside], k[inside] + 1, n[inside] - k[inside])
    # P(Bin(n, p) <= k) must not exceed alpha at the bound.
    p = _nudge_until_valid(p, lambda q: inside & (binom.cdf(k, n, q) > alpha), +1.0)
    return float(p[0]) if scalar else p


def _union_tail(p: np.ndarray, values: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Sum over classes of P(Bin(n, p) <= N_c), classes grouped by equal count."""
    return (binom.cdf(values[None, :], n, p[:, None]) * weights[None, :]).sum(axis=1)


def pb_upper_bound(other_counts, n: int, alpha) -> np.ndarray | float:
    """T-CERTIFY's union bound: smallest p with sum_c P(Bin(n, p) <= N_c) <= alpha.

    `other_counts` holds the counts of all num_classes - 1 classes other than the top one,
    zeros included. `alpha` may be an array (one bound per level, e.g. a grid of alpha - alpha').
    The root is bracketed by the single-class Clopper-Pearson bounds at levels alpha and
    alpha / (num_classes - 1), then bisected on the log scale; the upper end of the bracket,
    where the tail sum is verified to be <= alpha, is returned.
    """
    counts = np.asarray(other_counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 1:
        raise ValueError("other_counts must be a 1-D array of the num_classes - 1 other counts")
    alphas = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
    if np.any(~((alphas > 0) & (alphas < 1))):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    values, weights = np.unique(counts, return_counts=True)
    top = values.max()
    if top >= n:
        result = np.ones_like(alphas)
    else:
        lo = clopper_pearson_upper(top, n, alphas)
        hi = clopper_pearson_upper(top, n, alphas / counts.size)
        lo, hi = np.atleast_1d(lo).astype(np.float64), np.atleast_1d(hi).astype(np.float64)
        # hi must satisfy the tail condition; rounding in the beta quantile may leave it short.
        step = 1e-15
        short = _union_tail(hi, values, weights, n) > alphas
        while np.any(short):
            hi[short] = np.minimum(hi[short] * (1.0 + step), 1.0)
            step *= 4.0
            short = (_union_tail(hi, values, weights, n) > alphas) & (hi < 1.0)
        lo = np.minimum(lo, hi)
        log_lo, log_hi = np.log(np.maximum(lo, 1e-300)), np.log(hi)
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (log_lo + log_hi)
            ok = _union_tail(np.exp(mid), values, weights, n) <= alphas
            log_hi = np.where(ok, mid, log_hi)
            log_lo = np.where(ok, log_lo, mid)
        result = np.exp(log_hi)
        # exp(log(hi)) may round below the verified point; take the verified one.
        result = np.where(_union_tail(result, values, weights, n) <= alphas, result, hi)
    return result if np.ndim(alpha) else float(result[0])


def certified_radius(pa_lower, pb_upper, sigma: float) -> np.ndarray | float:
    """sigma/2 (Phi^-1(pA) - Phi^-1(pB)) with pB capped at 1 - pA; 0 where pA <= 1/2.

    Written as max(sigma Phi^-1(pA), ...) so that the pB = 1 - pA case is CERTIFY's radius to
    the last bit (T-CERTIFY is then never below CERTIFY on the same counts).
    """
    pa, pb = np.asarray(pa_lower, dtype=np.float64), np.asarray(pb_upper, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        one_sided = sigma * norm.ppf(pa)
        two_sided = 0.5 * sigma * (norm.ppf(pa) - norm.ppf(pb))
        radius = np.where(pa > 0.5, np.maximum(one_sided, np.nan_to_num(two_sided, nan=0.0)), 0)
    return radius if radius.ndim else float(radius)


def alpha_grid(alpha: float, grid: int) -> np.ndarray:
    """The paper's grid of alpha' values: alpha * (1/grid, 2/grid, ..., 1)."""
    return alpha * np.arange(1, grid + 1) / grid


def _grid_bounds(top_count, other_counts, n, alpha: float, grid: int):
    """pA lower and pB upper (pB capped at 1 - pA) for every alpha' of the grid."""
    alphas = alpha_grid(alpha, grid)
    pa = np.atleast_1d(clopper_pearson_lower(top_count, n, alphas))
    pb = 1.0 - pa
    split = alphas < alpha  # at alpha' = alpha the union bound degenerates: CERTIFY's pB
    if np.any(split):
        rest = np.maximum(alpha - alphas[split], np.finfo(float).tiny)
        pb[split] = np.minimum(pb[split], pb_upper_bound(other_counts, n, rest))
    return alphas, pa, pb


def _best_alpha_index(top_count, other_counts, n, alpha, grid, sigma) -> int:
    """Index of the grid's alpha' with the largest radius (ties go to the largest alpha')."""
    _, pa, pb = _grid_bounds(top_count, other_counts, n, alpha, grid)
    radii = certified_radius(pa, pb, sigma)
    return int(len(radii) - 1 - np.argmax(radii[::-1]))


def certify_from_counts(
    selection_counts,
    estimation_counts,
    sigma: float,
    alpha: float,
    method: Method = "certify",
    grid: int = 10,
) -> Certificate:
    """Certify from n0 selection counts (which pick the class) and n fresh estimation counts.

    method "certify" is Cohen et al.'s CERTIFY; "tcertify" the paper's T-CERTIFY, maximising
    the radius over the alpha' grid on the estimation counts; "tcertify-strict" picks alpha'
    from the selection counts alone (plug-in n * count0 / n0) and evaluates that single alpha'
    on the estimation counts, so its 1 - alpha guarantee is exact.
    """
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    grid = check_positive_int(grid, "grid")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    selection = _check_counts(selection_counts, "selection_counts")
    estimation = _check_counts(estimation_counts, "estimation_counts")
    if selection.size != estimation.size:
        raise ValueError(
            "selection_counts and estimation_counts must have one entry per class each "
            f"(got {selection.size} and {estimation.size})"
        )
    label = int(np.argmax(selection))
    n = int(estimation.sum())
    top, others = estimation[label], np.delete(estimation, label)
    if method == "certify":
        grid_used, pick = 1, 0
    elif method == "tcertify":
        grid_used, pick = grid, None
    else:
        n0 = int(selection.sum())
        plug_in = np.rint(n * selection / n0).astype(np.int64)
        pick = _best_alpha_index(plug_in[label], np.delete(plug_in, label), n, alpha, grid, sigma)
        grid_used = grid
    alphas, pa, pb = _grid_bounds(top, others, n, alpha, grid_used)
    if pick is not None:  # evaluate only the one pre-chosen alpha'
        alphas, pa, pb = alphas[pick : pick + 1], pa[pick : pick + 1], pb[pick : pick + 1]
    radii = certified_radius(pa, pb, sigma)
    best = int(len(radii) - 1 - np.argmax(radii[::-1]))
    radius = float(radii[best])
    return Certificate(
        label=label if radius > 0 else ABSTAIN,
        radius=radius,
        pa_lower=float(pa[best]),
        pb_upper=float(pb[best]),
        alpha_prime=float(alphas[best]),
    )


def binomial_test_pvalue(k: int, n: int) -> float:
    """Two-sided exact binomial test of k successes in n trials against p = 1/2."""
    return float(binomtest(int(k), int(n), p=0.5, alternative="two-sided").pvalue)


def predict_from_counts(counts, alpha: float) -> int:
    """Cohen's PREDICT: the top class if the top-two binomial test rejects alpha, else ABSTAIN."""
    alpha = check_alpha(alpha)
    counts = _check_counts(counts, "counts")
    order = np.argsort(-counts, kind="stable")
    n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
    return int(order[0]) if binomial_test_pvalue(n_a, n_a + n_b) <= alpha else ABSTAIN
