"""Sequential certification at given radii: the decision procedure, driven by counts.

Is x certified at each of the radii r_1 < ... < r_m? Samples arrive in looks; an anytime-valid
confidence sequence for pA (and, for T-CERTIFY, for the runner-up) certifies a radius as soon
as its lower bound passes Phi(r / sigma) and drops it as soon as it is provably out of reach;
the input stops when every radius is decided. numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from .. import stats
from ..stats import ABSTAIN
from .confidence import BonferroniCP, make_confidence_sequence

TABLE1_RADII = np.arange(0, 3.0 + 1e-9, 0.25)  # the radii of the paper's Table 1
SEQUENTIAL_METHODS = ("certify", "tcertify")
# The share of alpha kept for the final look at max_n (Clopper-Pearson on all max_n samples);
# the confidence sequence spends the rest. Chosen by benchmarks/bench_oracle.py.
FINAL_SHARE = 0.5
# The level of the optimistic upper bound on pA behind the futility rule (None: no rule; see
# RadiiProcedure). A stopping rule, so it spends no alpha. Chosen by benchmarks/bench_oracle.py.
FUTILITY = 0.05


def check_final_share(final_share: float) -> float:
    """final_share as a float; ValueError unless 0 <= final_share < 1."""
    ok = isinstance(final_share, (int, float, np.floating)) and not isinstance(final_share, bool)
    if not (ok and 0.0 <= final_share < 1.0):
        raise ValueError(f"final_share must be a number in [0, 1), got {final_share!r}")
    return float(final_share)


def check_futility(futility: float | None) -> float | None:
    """futility as a float (None: no futility rule); ValueError unless 0 < futility < 1."""
    if futility is None:
        return None
    ok = isinstance(futility, (int, float, np.floating)) and not isinstance(futility, bool)
    if not (ok and 0.0 < futility < 1.0):
        raise ValueError(f"futility must be a number in (0, 1) (or None), got {futility!r}")
    return float(futility)


def check_precision(precision: float | None) -> float | None:
    """precision as a float (None: decide every radius); ValueError unless finite and > 0."""
    if precision is None:
        return None
    ok = isinstance(precision, (int, float, np.floating)) and not isinstance(precision, bool)
    if not (ok and np.isfinite(precision) and precision > 0):
        raise ValueError(f"precision must be a finite number > 0 (or None), got {precision!r}")
    return float(precision)


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
    (and lower bound on the runner-up) say the true radius is below r, or once the remaining
    samples up to max_n could not certify it even voting for the label at an optimistic rate
    (at max_n: whatever is not certified). Only the certifying bounds spend alpha: dropping is
    always sound.

    method "certify": pA alone (pB = 1 - pA_lower), the whole alpha on pA's sequence.
    method "tcertify": T-CERTIFY's two bounds, alpha * pa_share on pA's sequence and the rest
    on the union-bound sequence of the other num_classes - 1 classes.

    final_share: the share of alpha (fixed in advance) kept for a final look at max_n, which
    certifies with Clopper-Pearson (T-CERTIFY: and the union bound) on all max_n samples; the
    sequence spends the rest, so the total stays alpha (a union bound; 0: no final look).
    precision: stop as soon as some radius is certified and every undecided radius lies
    within `precision` of the largest certified one (they are reported not certified); None
    decides every radius. A stopping rule: it never changes what is certified at a look.
    futility: the optimistic rate is the level-`futility` Clopper-Pearson upper bound on pA
    from the counts so far (stochastic curtailment: a radius that only luck could still
    certify is given up); None: rate 1, every remaining sample for the label. A stopping rule
    too: it spends no alpha and can only leave radii uncertified.
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
        final_share: float = FINAL_SHARE,
        precision: float | None = None,
        futility: float | None = FUTILITY,
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
        self.final_share = check_final_share(final_share)
        self.precision = check_precision(precision)
        self.futility = check_futility(futility)
        self.final = BonferroniCP(max_n, max_n)  # one look, at max_n: Clopper-Pearson
        if method == "tcertify":
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
                    or num_classes < 2:
                raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
            share = stats.check_alpha(pa_share, "pa_share")
        else:
            share = 1.0
        sequence_alpha = self.alpha * (1.0 - self.final_share)
        final_alpha = self.alpha * self.final_share
        # (pA's level, the runner-up's level) for the sequence and for the final look
        self.levels = (sequence_alpha * share, sequence_alpha * (1.0 - share))
        self.final_levels = (final_alpha * share, final_alpha * (1.0 - share))
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
        """Refuse, before any sample is drawn, an alpha too small for its shares and looks."""
        needed = 0.0
        for cs, levels in ((self.cs, self.levels), (self.final, self.final_levels)):
            used = [level for level in levels if level > 0]
            if used:
                needed = max(needed, cs.smallest_alpha() * self.alpha / min(used))
        if self.alpha < needed:
            spent = "(each bound's share of alpha)" if self.method == "tcertify" else "alpha"
            looks = len(self.cs.looks)
            raise ValueError(
                f"alpha must be >= {needed:.3g} for {self.method} with the {self.cs.name} "
                f"confidence sequence and final share {self.final_share:g}, got "
                f"{self.alpha!r}: it bounds at level {spent} / {looks} at each of its {looks} "
                f"looks up to max_n {self.cs.max_n}, and bounds below level "
                f"{stats.ALPHA_FLOOR:g} cannot be trusted (raise alpha, lower max_n or "
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
            self._drop(~self.certifiable(self._projected_count(), self.max_n))
        if not self.done and self._precise():
            self._drop(self.status == UNDECIDED)

    def _projected_count(self) -> int:
        """count_a at max_n if the remaining samples vote for the label at the optimistic
        rate: 1 without futility, else the level-futility upper bound on pA."""
        remaining = self.max_n - self.n
        if self.futility is None or remaining == 0:
            return self.count_a + remaining
        rate = float(stats.clopper_pearson_upper(self.count_a, self.n, self.futility))
        return self.count_a + int(np.floor(rate * remaining))

    def _precise(self) -> bool:
        """Whether every undecided radius lies within `precision` of the largest certified."""
        if self.precision is None or not self.certified.any():
            return False
        undecided = self.radii[self.status == UNDECIDED]
        return bool(undecided.max() - self.radii[self.certified].max() <= self.precision)

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
        at a look with these cumulative counts (other_counts: those update() last took): by
        the confidence sequence, and at max_n also by the final look."""
        others = self.others if other_counts is None else np.asarray(other_counts)
        certified = self._certified_by(self.cs, self.levels, count_a, n, others)
        if n == self.max_n and self.final_share > 0:
            certified |= self._certified_by(self.final, self.final_levels, count_a, n, others)
        return certified

    def _certified_by(self, cs, levels: tuple[float, float], count_a: int, n: int,
                      others: np.ndarray) -> np.ndarray:
        alpha_a, alpha_b = levels
        certified = cs.reaches(count_a, n, self.thresholds, alpha_a)  # pB = 1 - pA
        if self.method == "tcertify" and not certified.all():
            pa = float(cs.lower(count_a, n, alpha_a)[0])
            if pa > 0.5:  # pB <= s gives T-CERTIFY's radius sigma/2 (z - Phi^-1(s)) = r
                s = ndtr(ndtri(pa) - 2.0 * self.radii / self.sigma)
                certified |= cs.union_below(others, n, s, alpha_b)
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

