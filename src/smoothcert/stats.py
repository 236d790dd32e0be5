"""Confidence bounds and certificates from class counts: plain numpy/scipy, no torch.

Samples -> counts -> bounds -> certificate. Every bound here is rounded conservatively: a
lower bound is never above, and an upper bound never below, the exact Clopper-Pearson value
because of floating-point error: each is checked against the binomial tail it inverts, with
a relative margin (_MARGIN) far above the tails' own rounding error (~3e-15 against 50-digit
arithmetic). Levels below ALPHA_FLOOR are refused: double-precision tails underflow near
1e-265, and the check would be blind. docs/statistics.md states what each method guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy import special
from scipy.stats import binomtest

ABSTAIN = -1
# The certification methods (how a certificate is computed from counts); training has objectives.
CertificationMethod = Literal["certify", "tcertify", "tcertify-strict"]
METHODS = get_args(CertificationMethod)
ALPHA_FLOOR = 1e-100
# T-CERTIFY computes one bound per alpha' of the grid for every example; the paper's has 10.
MAX_GRID = 10_000
# The most samples (n0, n, max_n) one input may draw: the statistics are validated up to here
# (the sequential mixture's rounding margin, sequential._LOG_MARGIN, up to n = 10^7).
MAX_SAMPLES = 10_000_000
_MARGIN = 1 - 1e-12  # a bound is accepted where its computed tail is <= alpha * _MARGIN
_ROOT_STEPS = 200  # a safety cap: the root finder needs about 10 steps
_ROOT_TOLERANCE = 1e-11  # relative width of the final bracket of the pB root (its tightness)


@dataclass(frozen=True)
class Certificate:
    """The outcome of one certification: `label` is ABSTAIN (-1) with radius 0 on abstention."""

    label: int
    radius: float
    pa_lower: float
    pb_upper: float
    alpha_prime: float


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """`alpha` as a float; ValueError unless ALPHA_FLOOR <= alpha < 1."""
    if not (isinstance(alpha, (int, float, np.floating)) and ALPHA_FLOOR <= alpha < 1.0):
        raise ValueError(
            f"{name} must be a number in [{ALPHA_FLOOR:g}, 1), got {alpha!r} (below "
            f"{ALPHA_FLOOR:g} double-precision binomial tails cannot be trusted)"
        )
    return float(alpha)


def check_grid_size(grid: int) -> int:
    """`grid` as an int in [1, MAX_GRID]: T-CERTIFY bounds every alpha' of the grid per example."""
    grid = check_positive_int(grid, "grid")
    if grid > MAX_GRID:
        raise ValueError(f"grid must be an integer in [1, {MAX_GRID}], got {grid}")
    return grid


def check_alpha_grid(alpha: float, grid: int) -> int:
    """`grid` as an int; ValueError unless every alpha' = alpha j / grid is >= ALPHA_FLOOR."""
    alpha, grid = check_alpha(alpha), check_grid_size(grid)
    if alpha / grid < ALPHA_FLOOR:
        raise ValueError(
            f"alpha / grid (the smallest alpha' of the T-CERTIFY grid) must be >= "
            f"{ALPHA_FLOOR:g}, got {alpha!r} / {grid}"
        )
    return grid


def check_sigma(sigma: float) -> float:
    if not (isinstance(sigma, (int, float, np.floating)) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_sample_count(value: int, name: str) -> int:
    """A number of samples as an int; ValueError unless 1 <= value <= MAX_SAMPLES."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= MAX_SAMPLES:
        raise ValueError(f"{name} must be an integer in [1, {MAX_SAMPLES}], got {value!r}")
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


def _check_levels(alpha) -> np.ndarray:
    levels = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
    if np.any(~((levels >= ALPHA_FLOOR) & (levels < 1))):
        raise ValueError(f"alpha must be in [{ALPHA_FLOOR:g}, 1), got {alpha!r}")
    return levels


def _nudge_until_valid(p: np.ndarray, violates, direction: float) -> np.ndarray:
    """Move `p` by growing relative steps (down for direction -1, up for +1) until valid."""
    p = p.copy()
    step = 1e-15
    bad = violates(p)
    while np.any(bad):
        p[bad] = np.clip(p[bad] + direction * step * np.maximum(p[bad], 1e-300), 0.0, 1.0)
        step *= 4.0
        bad = violates(p)
    return p


def _broadcast(k, n, alpha) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    scalar = all(np.ndim(v) == 0 for v in (k, n, alpha))
    _check_levels(alpha)
    k, n, alpha = (np.atleast_1d(v).astype(np.float64) for v in np.broadcast_arrays(k, n, alpha))
    return scalar, k, n, alpha


def _tail_at_least(k, n, p):
    """P(Bin(n, p) >= k) for 1 <= k <= n (the regularised incomplete beta function)."""
    return special.betainc(k, n - k + 1, p)


def _tail_at_most(k, n, p):
    """P(Bin(n, p) <= k) for 0 <= k < n."""
    return special.betaincc(k + 1, n - k, p)


def _cp_lower(k: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    inside = k > 0
    p = np.zeros_like(k)
    p[inside] = special.betaincinv(k[inside], n[inside] - k[inside] + 1, alpha[inside])
    # P(Bin(n, p) >= k) must not exceed alpha at the bound; enforce it against rounding.
    level = alpha * _MARGIN
    return _nudge_until_valid(p, lambda q: inside & (_tail_at_least(k, n, q) > level), -1.0)


def _cp_upper(k: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    inside = k < n
    p = np.ones_like(k)
    p[inside] = special.betainccinv(k[inside] + 1, n[inside] - k[inside], alpha[inside])
    # P(Bin(n, p) <= k) must not exceed alpha at the bound.
    level = alpha * _MARGIN
    return _nudge_until_valid(p, lambda q: inside & (_tail_at_most(k, n, q) > level), +1.0)


def clopper_pearson_lower(k, n, alpha) -> np.ndarray | float:
    """One-sided level-`alpha` lower confidence bound on p from k successes in n trials."""
    scalar, k, n, alpha = _broadcast(k, n, alpha)
    p = _cp_lower(k, n, alpha)
    return float(p[0]) if scalar else p


def clopper_pearson_upper(k, n, alpha) -> np.ndarray | float:
    """One-sided level-`alpha` upper confidence bound on p from k successes in n trials."""
    scalar, k, n, alpha = _broadcast(k, n, alpha)
    p = _cp_upper(k, n, alpha)
    return float(p[0]) if scalar else p


def pb_upper_bound(other_counts, n: int, alpha) -> np.ndarray | float:
    """T-CERTIFY's union bound: smallest p with sum_c P(Bin(n, p) <= N_c) <= alpha.

    `other_counts` holds the counts of all num_classes - 1 classes other than the top one,
    zeros included. `alpha` may be an array (one bound per level, e.g. a grid of alpha - alpha').
    """
    counts = np.asarray(other_counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 1:
        raise ValueError("other_counts must be a 1-D array of the num_classes - 1 other counts")
    result = _pb_upper(counts, int(n), _check_levels(alpha))
    return result if np.ndim(alpha) else float(result[0])


def _pb_upper(counts: np.ndarray, n: int, alphas: np.ndarray) -> np.ndarray:
    """pb_upper_bound for a level array, without argument checks.

    The root is bracketed by the single-class Clopper-Pearson bounds of the largest count at
    levels alpha (the sum is at least that term) and alpha / (num_classes - 1) (every term is
    at most it), then narrowed by Illinois regula falsi on (log p, log tail); the upper end,
    where the tail sum was evaluated to be <= alpha, is returned.
    """
    values, weights = np.unique(counts, return_counts=True)
    if values.max() >= n:
        return np.ones_like(alphas)
    top, size = np.full_like(alphas, values.max()), np.full_like(alphas, n)

    def excess(log_p: np.ndarray) -> np.ndarray:  # decreasing in log_p; <= 0 where p is valid
        tail = (_tail_at_most(values, n, np.exp(log_p)[:, None]) * weights).sum(axis=1)
        return np.log(tail) - np.log(alphas * _MARGIN)

    hi = _nudge_until_valid(
        _cp_upper(top, size, alphas / counts.size), lambda p: excess(np.log(p)) > 0, +1.0
    )
    x_lo, x_hi = np.log(np.minimum(_cp_upper(top, size, alphas), hi)), np.log(hi)
    f_lo, f_hi = excess(x_lo), excess(x_hi)
    x_hi, f_hi = np.where(f_lo <= 0, x_lo, x_hi), np.where(f_lo <= 0, f_lo, f_hi)  # lo is valid
    last = np.zeros(len(alphas))  # +1: the previous step moved x_hi, -1: x_lo
    for _ in range(_ROOT_STEPS):
        tolerance = _ROOT_TOLERANCE * np.maximum(1.0, np.abs(x_hi))
        open_ = x_hi - x_lo > tolerance
        if not np.any(open_):
            break
        secant = x_hi + f_hi * (x_hi - x_lo) / np.where(f_lo > f_hi, f_lo - f_hi, 1.0)
        x = np.where(f_lo > f_hi, secant, 0.5 * (x_lo + x_hi))
        # At least tolerance / 3 from either end: once the secant sits on the root (where the
        # tail's rounding is all it sees), the next step then closes the bracket.
        x = np.clip(x, x_lo + tolerance / 3, x_hi - tolerance / 3)
        f = excess(x)
        valid = open_ & (f <= 0)
        raise_lo = open_ & ~valid
        # Illinois: halve the stale end's value when the same end moves twice in a row.
        f_lo = np.where(valid & (last == 1), 0.5 * f_lo, f_lo)
        f_hi = np.where(raise_lo & (last == -1), 0.5 * f_hi, f_hi)
        x_hi, f_hi = np.where(valid, x, x_hi), np.where(valid, f, f_hi)
        x_lo, f_lo = np.where(raise_lo, x, x_lo), np.where(raise_lo, f, f_lo)
        last = np.where(valid, 1, np.where(raise_lo, -1, last))
    return np.exp(x_hi)


def certified_radius(pa_lower, pb_upper, sigma: float) -> np.ndarray | float:
    """sigma/2 (Phi^-1(pA) - Phi^-1(pB)) with pB capped at 1 - pA; 0 where pA <= 1/2.

    Written as max(sigma Phi^-1(pA), ...) so that the pB = 1 - pA case is CERTIFY's radius to
    the last bit (T-CERTIFY is then never below CERTIFY on the same counts).
    """
    pa, pb = np.asarray(pa_lower, dtype=np.float64), np.asarray(pb_upper, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        one_sided = sigma * special.ndtri(pa)
        two_sided = 0.5 * sigma * (special.ndtri(pa) - special.ndtri(pb))
        radius = np.where(pa > 0.5, np.maximum(one_sided, np.nan_to_num(two_sided, nan=0.0)), 0)
    return radius if radius.ndim else float(radius)


def alpha_grid(alpha: float, grid: int) -> np.ndarray:
    """The paper's grid of alpha' values: alpha * (1/grid, 2/grid, ..., 1), ending at alpha."""
    return alpha * (np.arange(1, grid + 1) / grid)


def _best_certificate(label: int, counts: np.ndarray, sigma: float, alpha: float,
                      alpha_primes: np.ndarray) -> Certificate:
    """The certificate of `label` from `counts` at whichever alpha' gives the largest radius.

    pA is bounded at level alpha' and pB at alpha - alpha' (the union bound), capped at
    1 - pA; at alpha' = alpha the union bound degenerates and pB = 1 - pA is CERTIFY's.
    Ties go to the largest alpha'.
    """
    n = int(counts.sum())
    pa = _cp_lower(np.full_like(alpha_primes, counts[label]), np.full_like(alpha_primes, n),
                   alpha_primes)
    pb = 1.0 - pa
    split = alpha_primes < alpha
    if np.any(split):
        rest = alpha - alpha_primes[split]
        pb[split] = np.minimum(pb[split], _pb_upper(np.delete(counts, label), n, rest))
    radii = certified_radius(pa, pb, sigma)
    best = len(radii) - 1 - int(np.argmax(radii[::-1]))
    radius = float(radii[best])
    return Certificate(
        label=label if radius > 0 else ABSTAIN,
        radius=radius,
        pa_lower=float(pa[best]),
        pb_upper=float(pb[best]),
        alpha_prime=float(alpha_primes[best]),
    )


def _certify(selection, estimation, sigma, alpha, grid) -> Certificate:
    """Cohen's CERTIFY: alpha' = alpha, pB = 1 - pA (`grid` is unused)."""
    label = int(np.argmax(selection))
    return _best_certificate(label, estimation, sigma, alpha, np.array([alpha]))


def _tcertify(selection, estimation, sigma, alpha, grid) -> Certificate:
    """The paper's T-CERTIFY: the best alpha' of the grid, chosen on the estimation counts."""
    label = int(np.argmax(selection))
    return _best_certificate(label, estimation, sigma, alpha, alpha_grid(alpha, grid))


def _tcertify_strict(selection, estimation, sigma, alpha, grid) -> Certificate:
    """T-CERTIFY whose alpha' is chosen before the estimation counts are seen.

    The alpha' that T-CERTIFY would pick on the plug-in counts n * selection / n0 is then
    evaluated alone on the estimation counts, so the level is exactly 1 - alpha.
    """
    label = int(np.argmax(selection))
    plug_in = np.rint(estimation.sum() * selection / selection.sum()).astype(np.int64)
    chosen = _best_certificate(label, plug_in, sigma, alpha, alpha_grid(alpha, grid))
    return _best_certificate(label, estimation, sigma, alpha, np.array([chosen.alpha_prime]))


_METHOD_FUNCTIONS = {
    "certify": _certify, "tcertify": _tcertify, "tcertify-strict": _tcertify_strict
}


def certify_from_counts(
    selection_counts,
    estimation_counts,
    sigma: float,
    alpha: float,
    method: CertificationMethod = "certify",
    grid: int = 10,
) -> Certificate:
    """Certify from n0 selection counts (which pick the class) and n fresh estimation counts.

    method "certify" is Cohen et al.'s CERTIFY; "tcertify" the paper's T-CERTIFY, maximising
    the radius over the alpha' grid on the estimation counts (level 1 - alpha only in
    practice: see docs/statistics.md); "tcertify-strict" picks alpha' from the selection
    counts alone and evaluates that single alpha' on the estimation counts (exactly 1 - alpha).
    """
    sigma = check_sigma(sigma)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    alpha = check_alpha(alpha)
    # CERTIFY has no grid; for T-CERTIFY every alpha' of the grid must be above the floor.
    grid = check_alpha_grid(alpha, grid) if method != "certify" else check_positive_int(
        grid, "grid"
    )
    selection = _check_counts(selection_counts, "selection_counts")
    estimation = _check_counts(estimation_counts, "estimation_counts")
    if selection.size != estimation.size:
        raise ValueError(
            "selection_counts and estimation_counts must have one entry per class each "
            f"(got {selection.size} and {estimation.size})"
        )
    return _METHOD_FUNCTIONS[method](selection, estimation, sigma, alpha, grid)


@dataclass(frozen=True)
class CertifyAllResult:
    """CERTIFY, T-CERTIFY and strict T-CERTIFY from one set of samples, with the counts."""

    certify: Certificate
    tcertify: Certificate
    strict: Certificate
    selection_counts: np.ndarray
    estimation_counts: np.ndarray

    @classmethod
    def from_counts(cls, selection: np.ndarray, estimation: np.ndarray, sigma: float,
                    alpha: float, grid: int) -> CertifyAllResult:
        """All three certificates from one set of selection and estimation counts."""
        certs = {method: certify_from_counts(selection, estimation, sigma, alpha, method, grid)
                 for method in METHODS}
        return cls(certify=certs["certify"], tcertify=certs["tcertify"],
                   strict=certs["tcertify-strict"], selection_counts=selection,
                   estimation_counts=estimation)


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
