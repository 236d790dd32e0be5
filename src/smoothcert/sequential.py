"""Sequential certification at given radii, and input-specific n: numpy/scipy only, no torch.

Two ways to spend fewer forward passes than a fixed n per input, both with CERTIFY's
guarantee (docs/sequential.md gives the proofs):

- `RadiiProcedure`: is x certified at each of the radii r_1 < ... < r_m? Samples arrive in
  looks; an anytime-valid confidence sequence for pA (and, for T-CERTIFY, for the runner-up)
  certifies a radius as soon as its lower bound passes Phi(r / sigma) and drops it as soon as
  it is provably out of reach; the input stops when every radius is decided.
- `choose_n`: the radius-maximising protocol with n chosen per input from the n0 selection
  counts alone, so that CERTIFY / T-CERTIFY then run unchanged on n fresh samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import bdtr, bdtrc, betaincc, betaln, expit, gammaln, logit, ndtr, ndtri

from . import stats
from .stats import ABSTAIN

CONFIDENCE_SEQUENCES = ("mixture", "bonferroni")
TABLE1_RADII = np.arange(0, 3.0 + 1e-9, 0.25)  # the radii of the paper's Table 1
SEQUENTIAL_METHODS = ("certify", "tcertify")
_SMALLEST = 1e-12  # lower bounds below this are reported as 0
_XTOL = 1e-8  # root-finding tolerance on the log-odds scale
# A log test statistic must clear log(1/alpha) by _rounding_bound: _ROUNDING_UNITS machine
# epsilons per unit of the log-gamma and log-power terms whose difference it is (measured: at
# most 0.55), plus a floor for betaincc's relative error and the sums (docs/sequential.md).
_ROUNDING_FLOOR = 1e-9
_ROUNDING_UNITS = 8.0


# --- confidence sequences --------------------------------------------------------------------


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


# --- the at-radius decision procedure --------------------------------------------------------


@dataclass(frozen=True)
class RadiiCertificate:
    """Per radius, whether x is certified for `label` (ABSTAIN, -1, when at no radius).

    samples_used counts every forward pass (selection included); n and count_a are the
    estimation samples and the label's count among them; decided_at[i] is the number of
    estimation samples after which radius i was decided (0: before any, out of reach).
    When the class counts were given: selection_counts, estimation_counts (per class, at the
    stop) and certifying_counts (per class, at the look that certified the largest radius;
    empty when none is), from which the certificate can be recomputed.
    """

    label: int
    radii: tuple[float, ...]
    certified: tuple[bool, ...]
    samples_used: int
    n: int
    count_a: int
    decided_at: tuple[int, ...]
    selection_counts: tuple[int, ...] = ()
    estimation_counts: tuple[int, ...] = ()
    certifying_counts: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


def check_radii(radii) -> np.ndarray:
    """The radii as a float array: non-empty, finite, >= 0 and strictly increasing."""
    try:
        arr = np.asarray(radii, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("radii must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"radii must be finite and >= 0, got {arr.tolist()}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"radii must be strictly increasing, got {arr.tolist()}")
    return arr


UNDECIDED, CERTIFIED, DROPPED = 0, 1, -1


class RadiiProcedure:
    """The sequential at-radius decision as a state machine driven by counts.

    Loop: `size = next_batch()`; stop at 0; else draw `size` more estimation samples and call
    `update(count_a, n_total[, other_counts])` with the cumulative counts. Radius r is
    certified once the lower bound(s) give a radius >= r, dropped once the upper bound on pA
    (and lower bound on the runner-up) say the true radius is below r, or once even all
    remaining max_n samples voting for the label could not certify it (at max_n: whatever is
    not certified). Only the certifying bounds spend alpha: dropping is always sound.

    method "certify": pA alone (pB = 1 - pA_lower), the whole alpha on pA's sequence.
    method "tcertify": T-CERTIFY's two bounds, alpha * pa_share on pA's sequence and the rest
    on the union-bound sequence of the other num_classes - 1 classes.
    """

    def __init__(
        self,
        radii,
        sigma: float,
        alpha: float,
        max_n: int,
        method: str = "certify",
        num_classes: int | None = None,
        confidence_sequence: str = "mixture",
        first_look: int = 100,
        batch_size: int = 1000,
        pa_share: float = 0.5,
    ):
        self.radii = check_radii(radii)
        self.sigma = stats.check_sigma(sigma)
        self.thresholds = ndtr(self.radii / self.sigma)  # certified at r iff pA >= Phi(r/sigma)
        self.alpha = stats.check_alpha(alpha)
        if method not in SEQUENTIAL_METHODS:
            raise ValueError(
                f"method must be one of {', '.join(SEQUENTIAL_METHODS)}, got {method!r}"
            )
        self.method = method
        max_n = stats.check_sample_count(max_n, "max_n")
        batch_size = stats.check_positive_int(batch_size, "batch_size")
        if batch_size > max_n:
            raise ValueError(f"max_n must be >= batch_size ({batch_size}), got {max_n}")
        self.cs = make_confidence_sequence(confidence_sequence, max_n, first_look, batch_size)
        if method == "tcertify":
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
                    or num_classes < 2:
                raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
            share = stats.check_alpha(pa_share, "pa_share")
            self.alpha_a, self.alpha_b = self.alpha * share, self.alpha * (1.0 - share)
        else:
            self.alpha_a, self.alpha_b = self.alpha, 0.0
        self._check_levels()
        self.num_classes = num_classes
        self.max_n = max_n
        self.n = 0
        self.count_a = 0
        self.others = np.zeros(max((num_classes or 2) - 1, 1), dtype=np.int64)
        self._given_others = False  # whether update() was given the other classes' counts
        self._certifying: tuple[int, np.ndarray] | None = None  # (count_a, others) at the
        # look that certified the largest radius so far
        self.status = np.full(self.radii.size, UNDECIDED, dtype=np.int8)
        self.decided_at = np.full(self.radii.size, -1, dtype=np.int64)
        self._look = 0
        self._drop(~self.certifiable(self.max_n, self.max_n))  # out of reach of max_n

    def _check_levels(self) -> None:
        """Refuse, before any sample is drawn, an alpha too small for its share and looks."""
        smallest = min(level for level in (self.alpha_a, self.alpha_b) if level > 0)
        needed = self.cs.smallest_alpha() * self.alpha / smallest
        if self.alpha < needed:
            spent = "(each bound's share of alpha)" if self.method == "tcertify" else "alpha"
            looks = len(self.cs.looks)
            raise ValueError(
                f"alpha must be >= {needed:.3g} for {self.method} with the {self.cs.name} "
                f"confidence sequence, got {self.alpha!r}: it bounds at level {spent} / {looks} "
                f"at each of its {looks} looks up to max_n {self.cs.max_n}, and bounds below "
                f"level {stats.ALPHA_FLOOR:g} cannot be trusted (raise alpha, lower max_n or "
                "use the mixture sequence)"
            )

    @property
    def done(self) -> bool:
        return not np.any(self.status == UNDECIDED)

    @property
    def certified(self) -> np.ndarray:
        return self.status == CERTIFIED

    def next_batch(self) -> int:
        """How many more estimation samples to draw before the next look (0: stop)."""
        return 0 if self.done else int(self.cs.looks[self._look]) - self.n

    def update(self, count_a: int, n_total: int, other_counts=None) -> None:
        """Take the cumulative counts at the look that next_batch() asked for; decide radii."""
        expected = self.n + self.next_batch()
        if self.done or n_total != expected:
            raise ValueError(f"n_total must be the next look's sample count {expected} "
                             f"(done: {self.done}), got {n_total!r}")
        new = int(count_a) - self.count_a
        if not (0 <= new <= n_total - self.n and count_a == int(count_a)):
            raise ValueError(f"count_a must grow by 0..{n_total - self.n} from {self.count_a}, "
                             f"got {count_a!r}")
        if self.method == "tcertify" or other_counts is not None:
            others = np.asarray(other_counts, dtype=np.int64)
            if others.shape != self.others.shape or np.any(others < self.others) \
                    or others.sum() + count_a != n_total:
                raise ValueError(
                    f"other_counts must be the {self.others.size} other classes' cumulative "
                    f"counts, summing with count_a to n_total {n_total}"
                )
            self.others, self._given_others = others, True
        self.n, self.count_a = int(n_total), int(count_a)
        self._look += 1
        before = int(self.certified.sum())
        self._certify(self.certifiable(self.count_a, self.n))
        if self.certified.sum() > before:
            self._certifying = (self.count_a, self.others.copy())
        if not self.done:
            self._drop(~self._possible())
        if not self.done:  # at max_n this drops every radius not certified above
            self._drop(~self.certifiable(self.count_a + self.max_n - self.n, self.max_n))

    def certificate(self, label: int, selection_n: int = 0,
                    selection_counts=None) -> RadiiCertificate:
        """The decisions so far as a certificate for `label`, selection samples counted (and
        recorded, when given as per-class counts)."""
        certified = self.certified

        def per_class(count_a: int, others: np.ndarray) -> tuple[int, ...]:
            if not self._given_others:
                return ()
            return tuple(int(c) for c in np.insert(others, int(label), count_a))

        if selection_counts is not None:
            selection_n = int(np.sum(selection_counts))
        return RadiiCertificate(
            label=int(label) if certified.any() else ABSTAIN,
            radii=tuple(float(r) for r in self.radii),
            certified=tuple(bool(c) for c in certified),
            samples_used=int(selection_n) + self.n,
            n=self.n,
            count_a=self.count_a,
            decided_at=tuple(int(d) for d in self.decided_at),
            selection_counts=() if selection_counts is None else tuple(
                int(c) for c in selection_counts),
            estimation_counts=per_class(self.count_a, self.others),
            certifying_counts=() if self._certifying is None else per_class(*self._certifying),
        )

    def certifiable(self, count_a: int, n: int, other_counts=None) -> np.ndarray:
        """The radii certified by the lower bound on pA (and T-CERTIFY's union bound on pB)
        at a look with these cumulative counts (other_counts: those update() last took)."""
        others = self.others if other_counts is None else np.asarray(other_counts)
        certified = self.cs.reaches(count_a, n, self.thresholds, self.alpha_a)  # pB = 1 - pA
        if self.method == "tcertify" and not certified.all():
            pa = float(self.cs.lower(count_a, n, self.alpha_a)[0])
            if pa > 0.5:  # pB <= s gives T-CERTIFY's radius sigma/2 (z - Phi^-1(s)) = r
                s = ndtr(ndtri(pa) - 2.0 * self.radii / self.sigma)
                certified |= self.cs.union_below(others, n, s, self.alpha_b)
        return certified

    def _possible(self) -> np.ndarray:
        """The radii the true (pA, pB) may reach: false only where an upper bound on pA (with
        a lower bound on the top other class) rules them out."""
        failures = self.n - self.count_a
        if self.method == "certify":  # pA <= upper <= Phi(r / sigma)
            return ~self.cs.reaches(failures, self.n, 1.0 - self.thresholds, self.alpha)
        pa = 1.0 - float(self.cs.lower(failures, self.n, self.alpha)[0])
        if pa <= 0.5:
            return np.zeros(self.radii.size, dtype=bool)
        pb = float(self.cs.lower(self.others.max(), self.n, self.alpha)[0])
        z = ndtri(pa)
        return self.radii <= self.sigma * max(z, 0.5 * (z - ndtri(pb)))

    def _certify(self, mask: np.ndarray) -> None:
        if mask.any():  # a certificate at r covers every smaller radius
            self._set(self.radii <= self.radii[mask].max(), CERTIFIED)

    def _drop(self, mask: np.ndarray) -> None:
        self._set(mask & (self.status == UNDECIDED), DROPPED)

    def _set(self, mask: np.ndarray, outcome: int) -> None:
        fresh = mask & (self.status != outcome)
        self.status[fresh] = outcome
        self.decided_at[fresh] = self.n


def reachable_radii(radii, sigma: float, alpha: float, max_n: int, **options) -> np.ndarray:
    """The radii that at most max_n estimation samples can certify at all (RadiiProcedure's
    options); the procedure drops the others before drawing any sample."""
    procedure = RadiiProcedure(radii, sigma, alpha, max_n, **options)
    return procedure.radii[procedure.status == UNDECIDED]


# --- input-specific n ------------------------------------------------------------------------


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
