"""Anytime-valid confidence sequences for binomial proportions: numpy/scipy only.

`BonferroniCP` spends alpha / J at each of J doubling looks (Clopper-Pearson); `BetaMixture`
is a Robbins-style mixture martingale valid at every n, computed in logs with a rounding
margin (docs/sequential.md gives the proofs).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import bdtr, bdtrc, betaincc, betaln, expit, gammaln, logit

from .. import stats

CONFIDENCE_SEQUENCES = ("mixture", "bonferroni")
_SMALLEST = 1e-12  # lower bounds below this are reported as 0
_XTOL = 1e-8  # root-finding tolerance on the log-odds scale
# A log test statistic must clear log(1/alpha) by _rounding_bound: _ROUNDING_UNITS machine
# epsilons per unit of the log-gamma and log-power terms whose difference it is (measured: at
# most 0.55), plus a floor for betaincc's relative error and the sums (docs/sequential.md).
_ROUNDING_FLOOR = 1e-9
_ROUNDING_UNITS = 8.0


class ConfidenceSequence:
    """Anytime-valid one-sided bounds on binomial proportions, looked at on a fixed schedule.

    For the true p and any stopping rule, P(exists look n: lower(k_n, n, alpha) >= p) <= alpha
    (upper: the same for the complement), and with p_B the largest probability among the
    other classes, P(exists look n: union_below(counts_n, n, p_B, alpha)) <= alpha.
    """

    name = ""

    def __init__(self, max_n: int, first_look: int):
        self.max_n = stats.check_positive_int(max_n, "max_n")
        self.first_look = stats.check_positive_int(first_look, "first_look")
        if self.first_look > self.max_n:
            raise ValueError(f"first_look must be <= max_n ({max_n}), got {first_look}")
        self.looks = self._schedule()

    def _schedule(self) -> np.ndarray:
        raise NotImplementedError

    def lower(self, k, n: int, alpha: float) -> np.ndarray:
        """Lower bounds on p from k (an array) successes in n trials."""
        raise NotImplementedError

    def reaches(self, k, n: int, t, alpha: float) -> np.ndarray:
        """lower(k, n, alpha) >= t, elementwise, without computing the bound."""
        raise NotImplementedError

    def union_below(self, other_counts, n: int, s, alpha: float) -> np.ndarray:
        """Per threshold s: is T-CERTIFY's union bound on max_c p_c (over the other classes'
        counts, zeros included) at most s?"""
        raise NotImplementedError

    def upper(self, k, n: int, alpha: float) -> np.ndarray:
        return 1.0 - self.lower(n - np.asarray(k), n, alpha)

    def smallest_alpha(self) -> float:
        """The smallest alpha one bound may be given (0: the mixture's statistic is computed
        in logs, at any alpha stats.check_alpha accepts)."""
        return 0.0


class BonferroniCP(ConfidenceSequence):
    """Clopper-Pearson at alpha / J at each of J looks n_j = first_look * 2^(j-1), the last at
    max_n: a union bound over the looks (Bonferroni), valid only at those looks."""

    name = "bonferroni"

    def _schedule(self) -> np.ndarray:
        looks = []
        n = self.first_look
        while n < self.max_n:
            looks.append(n)
            n *= 2
        return np.array([*looks, self.max_n], dtype=np.int64)

    def smallest_alpha(self) -> float:
        """Each look's binomial tails need its level alpha / J to be >= stats.ALPHA_FLOOR."""
        return stats.ALPHA_FLOOR * len(self.looks)

    def _level(self, n: int, alpha: float) -> float:
        if n not in self.looks:
            raise ValueError(f"n: the Bonferroni sequence only looks at {self.looks.tolist()}")
        return alpha / len(self.looks)

    def lower(self, k, n: int, alpha: float) -> np.ndarray:
        return np.atleast_1d(stats.clopper_pearson_lower(k, n, self._level(n, alpha)))

    def reaches(self, k, n: int, t, alpha: float) -> np.ndarray:
        # P(Bin(n, t) >= k) grows with t and equals the level at the Clopper-Pearson bound.
        k = np.asarray(k)
        return (k > 0) & (bdtrc(k - 1, n, t) <= self._level(n, alpha))

    def union_below(self, other_counts, n: int, s, alpha: float) -> np.ndarray:
        # The union tail decreases in p, so the bound is <= s exactly when the tail at s is.
        values, weights = np.unique(np.asarray(other_counts, dtype=np.int64), return_counts=True)
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        tail = (bdtr(values, n, s[:, None]) * weights).sum(axis=1)
        return tail <= self._level(n, alpha)


def _log_mixture(t, k, n: int, weights: tuple[float, float, float]):
    """log M_n(t): the mixture martingale testing H0: p <= t from k successes in n trials.

    M_n(t) = sum_i w_i * integral of (q/t)^k ((1-q)/(1-t))^(n-k) over prior i on q in [t, 1]:
    uniform on [t, 1], log-uniform (density 1/(q log(1/t))) on [t, 1], a point mass at q = 1.
    For every fixed t each term is a martingale with mean 1 under p = t and a supermartingale
    under p < t; each decreases in t on (0, (k-1)/n] (docs/sequential.md), the only region
    where it is used (far above it the tail integral underflows; k = 0 gives the log-uniform
    term 0, an underestimate where no test can reject anyway).
    """
    t, k = np.asarray(t, dtype=np.float64), np.asarray(k, dtype=np.float64)
    failures = n - k
    total = -np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        log_1mt = np.log1p(-t)
        log_power = k * np.log(t) + failures * log_1mt
        if weights[0]:
            uniform = (betaln(k + 1, failures + 1) + np.log(betaincc(k + 1, failures + 1, t))
                       - log_1mt)
            total = np.logaddexp(total, np.log(weights[0]) + uniform)
        if weights[1]:
            log_uniform = (betaln(k, failures + 1) + np.log(betaincc(k, failures + 1, t))
                           - np.log(-np.log(t)))
            total = np.logaddexp(total, np.where(k > 0, np.log(weights[1]) + log_uniform, -np.inf))
        if weights[2]:
            total = np.logaddexp(total, np.where(failures == 0, np.log(weights[2]), -np.inf))
    return total - log_power


def _rounding_bound(t, k, n: int):
    """An upper bound on |computed - exact| of _log_mixture(t, k, n): epsilon times the
    magnitude of the terms whose difference it is (betaln's log-gammas, the log power)."""
    t, k = np.asarray(t, dtype=np.float64), np.asarray(k, dtype=np.float64)
    failures = n - k
    with np.errstate(divide="ignore", invalid="ignore"):
        power = np.abs(k * np.log(t)) + np.abs(np.where(failures > 0, failures * np.log1p(-t), 0))
    magnitude = gammaln(n + 2.0) + gammaln(k + 1) + gammaln(failures + 1) + power
    return _ROUNDING_FLOOR + _ROUNDING_UNITS * np.finfo(np.float64).eps * magnitude


class BetaMixture(ConfidenceSequence):
    """Robbins-style mixture confidence sequence, valid at every n (prior weights: uniform,
    log-uniform, point mass at 1): looks double from first_look until they are `step` apart."""

    name = "mixture"

    def __init__(self, max_n: int, first_look: int, step: int,
                 weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)):
        self.step = stats.check_positive_int(step, "step")
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (3,) or np.any(w < 0) or not np.isclose(w.sum(), 1.0) or w[:2].sum() == 0:
            raise ValueError(f"weights must be 3 numbers >= 0 summing to 1, not all on the "
                             f"point mass, got {weights!r}")
        self.weights = tuple(float(v) for v in w)
        super().__init__(max_n, first_look)

    def _schedule(self) -> np.ndarray:
        looks, n = [], 0
        while n < self.max_n:
            n = min(n + min(max(n, self.first_look), self.step), self.max_n)
            looks.append(n)
        return np.array(looks, dtype=np.int64)

    def _margin(self, t, k, n: int, alpha: float):
        """log M_n(t) - log(1/alpha) less its rounding bound: >= 0 where H0: p <= t is
        rejected."""
        statistic = _log_mixture(t, k, n, self.weights) - np.log(1.0 / alpha)
        return statistic - _rounding_bound(t, k, n)

    def reaches(self, k, n: int, t, alpha: float) -> np.ndarray:
        # The statistic decreases in t on (0, (k-1)/n]: rejecting t there rejects every t' < t.
        t = np.asarray(t, dtype=np.float64)
        inside = t <= (np.asarray(k) - 1) / n
        return inside & (self._margin(np.where(inside, t, 0.5), k, n, alpha) >= 0)

    def lower(self, k, n: int, alpha: float) -> np.ndarray:
        """sup{t <= (k-1)/n: t rejected} (rejections above (k-1)/n are ignored, safely)."""
        return np.array([self._lower_one(float(one), n, alpha) for one in np.atleast_1d(k)])

    def _lower_one(self, k: float, n: int, alpha: float) -> float:
        top = (k - 1) / n
        if top <= _SMALLEST or self._margin(_SMALLEST, k, n, alpha) < 0:
            return 0.0
        if self._margin(top, k, n, alpha) >= 0:
            return top

        def margin(u: float) -> float:  # on the log-odds scale, where bounds near 1 resolve
            return float(self._margin(expit(u), k, n, alpha))

        u = brentq(margin, logit(_SMALLEST), logit(top), xtol=_XTOL)
        step = _XTOL
        while margin(u) < 0:  # the root may sit a hair above the boundary: step back inside
            u -= step
            step *= 2
        return float(expit(u))

    def union_below(self, other_counts, n: int, s, alpha: float) -> np.ndarray:
        """sum_c 1 / M_c(s) <= alpha, M_c the mirrored mixture testing p_c >= s. Above
        (max_c N_c + 1) / n every term decreases in s (see reaches); below, the test is off."""
        values, weights = np.unique(np.asarray(other_counts, dtype=np.int64), return_counts=True)
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        usable = (s >= (values.max() + 1) / n) & (s < 1.0)
        mirrored = 1.0 - np.where(usable, s, 0.5)[:, None]
        log_m = _log_mixture(mirrored, n - values, n, self.weights)
        total = (weights * np.exp(-log_m)).sum(axis=1)
        # each term's relative error is at most its own rounding bound, so the sum's is the largest
        rounding = _rounding_bound(mirrored, n - values, n).max(axis=1)
        return usable & (total * np.exp(rounding) <= alpha)


def make_confidence_sequence(
    name: str, max_n: int, first_look: int = 100, step: int = 1000, **options
) -> ConfidenceSequence:
    """The named confidence sequence ("mixture" or "bonferroni") over looks up to max_n."""
    if name == "mixture":
        return BetaMixture(max_n, first_look, step, **options)
    if name == "bonferroni":
        return BonferroniCP(max_n, first_look, **options)
    raise ValueError(
        f"confidence_sequence must be one of {', '.join(CONFIDENCE_SEQUENCES)}, got {name!r}"
    )

