"""Sequential certification: exact failure probabilities over every stopping time.

Ground truth is the binomial law of the count path across the looks, propagated exactly by
dynamic programming (no Monte Carlo), plus closed forms of the mixture martingale.
"""

import copy

import mpmath
import numpy as np
import pytest
import torch
from conftest import ThresholdClassifier
from scipy.integrate import quad
from scipy.signal import fftconvolve
from scipy.stats import binom, norm

from smoothcert import sequential, stats
from smoothcert.sequential import (
    BetaMixture,
    BonferroniCP,
    RadiiProcedure,
    choose_n,
    confidence,
    make_confidence_sequence,
)
from smoothcert.smooth import Smooth

LOOKS = dict(max_n=2000, first_look=20)  # Bonferroni: 8 looks; mixture: 23 looks


def mixture(**kwargs):
    return BetaMixture(step=100, **{**LOOKS, **kwargs})


def bonferroni(**kwargs):
    return BonferroniCP(**{**LOOKS, **kwargs})


class UncorrectedCP(BonferroniCP):
    """The mutant: every look spends the whole alpha (no Bonferroni correction)."""

    def _level(self, n, alpha):
        return alpha


TINY = 1e-30  # counts this unlikely are not evaluated; their mass is counted as a failure


def crossing_probability(cs, p: float, alpha: float) -> float:
    """Exact P(exists look n: lower(k_n, n, alpha) >= p), k_n ~ Bin(n, p) along the looks
    (up to the mass of counts below TINY, added as if each failed)."""
    mass, previous, crossed = np.array([1.0]), 0, 0.0
    for n in cs.looks:
        mass = np.convolve(mass, binom.pmf(np.arange(n - previous + 1), n - previous, p))
        (live,) = np.nonzero(mass >= TINY)
        hit = live[cs.reaches(live, int(n), p, alpha)]
        crossed += mass[hit].sum() + mass[mass < TINY].sum()
        mass[hit] = 0.0
        mass[mass < TINY] = 0.0
        previous = n
    return crossed


def atoms(cs, alpha: float, count: int, seed: int) -> np.ndarray:
    """Values of p where the crossing probability jumps (a lower bound at some look), where
    its supremum is attained, drawn at random within [0.3, 0.999]; plus a fixed grid."""
    rng = np.random.default_rng(seed)
    found = []
    while len(found) < count:
        n = int(rng.choice(cs.looks))
        k = int(rng.integers(1, n + 1))
        bound = float(cs.lower(k, n, alpha)[0])
        if 0.3 <= bound <= 0.999:
            found.append(bound)
    return np.concatenate([found, np.linspace(0.3, 0.999, 15)])


# --- the mixture martingale itself -----------------------------------------------------------


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (1 / 3, 1 / 3, 1 / 3)])
def test_mixture_matches_numerical_integration(weights):
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(1, n + 1))
        t = float(rng.uniform(0.05, 0.95))

        def ratio(q, k=k, n=n, t=t):
            return (q / t) ** k * ((1 - q) / (1 - t)) ** (n - k)

        uniform = quad(ratio, t, 1, epsabs=0, epsrel=1e-12)[0] / (1 - t)
        log_uniform = quad(lambda q, r=ratio: r(q) / q, t, 1, epsabs=0, epsrel=1e-12)[0]
        log_uniform /= np.log(1 / t)
        spike = ratio(1.0) if k == n else 0.0
        expected = weights[0] * uniform + weights[1] * log_uniform + weights[2] * spike
        got = np.exp(confidence._log_mixture(t, k, n, weights))
        assert got == pytest.approx(expected, rel=1e-9)


def test_mixture_is_a_martingale_with_mean_one():
    # M_n(t; k) = t M_{n+1}(t; k+1) + (1-t) M_{n+1}(t; k) under p = t, and M_1 averages to 1;
    # checked where the bounds use it, t <= (k-1)/n (far above, the tail integral underflows).
    weights = (1 / 3, 1 / 3, 1 / 3)
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(10, 5000))
        k = int(rng.integers(2, n + 1))
        t = float(rng.uniform(0.001, (k - 1) / (n + 1)))
        now = confidence._log_mixture(t, k, n, weights)
        up = confidence._log_mixture(t, k + 1, n + 1, weights)
        same = confidence._log_mixture(t, k, n + 1, weights)
        # on the log scale: M itself overflows (inf == inf would pass) for large k
        assert np.logaddexp(np.log(t) + up, np.log1p(-t) + same) == pytest.approx(now, abs=1e-9)
    for t in (0.1, 0.5, 0.97):  # one trial: success (k = 1) or failure (k = 0, log-uniform 0)
        success = np.exp(confidence._log_mixture(t, 1, 1, (0.5, 0, 0.5)))
        failure = np.exp(confidence._log_mixture(t, 0, 1, (0.5, 0, 0.5)))
        assert t * success + (1 - t) * failure == pytest.approx(1.0, rel=1e-12)


def test_mixture_decreases_in_t_below_k_minus_one_over_n():
    # The lemma that makes the rejected set an interval (0, lower].
    for n in (10, 100, 1000, 100_000):
        for k in np.unique(np.rint(np.array([2, 0.3 * n, 0.9 * n, n - 1, n]))).astype(int):
            t = np.linspace(1e-6, (k - 1) / n, 3000)
            for weights in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1 / 3, 1 / 3, 1 / 3)]:
                if weights[2] and k < n:
                    continue  # the point mass is zero unless every trial succeeded
                log_m = confidence._log_mixture(t, k, n, weights)
                assert np.all(np.diff(log_m) <= 1e-9 * np.abs(log_m[1:]) + 1e-12), (n, k)


def test_mixture_rejects_no_threshold_beyond_the_lemma_s_region():
    # The lemma holds for t <= (k - 1) / n only, so nothing above it may be rejected, even
    # where the statistic is large there (few trials, every one a success, a large alpha).
    cs = BetaMixture(max_n=1000, first_look=1, step=1)
    for n in (1, 2, 5, 50):
        for k in (1, n // 2 + 1, n):
            above = np.linspace((k - 1) / n, 1.0, 200)[1:-1]
            assert not cs.reaches(k, n, above, 0.5).any(), (n, k)
            assert cs.lower(k, n, 0.5)[0] <= (k - 1) / n
    assert confidence._log_mixture(0.1, 1, 1, cs.weights) > np.log(2)  # large there


def test_mixture_bounds_sit_below_clopper_pearson():
    # At one n the uniformly most powerful one-sided test is Clopper-Pearson's; an anytime
    # bound at the same level can only be looser.
    cs = BetaMixture(max_n=10**6, first_look=100, step=1000)
    for k, n in [(100, 100), (990, 1000), (5000, 5000), (60_000, 100_000), (3, 1000)]:
        low = cs.lower(k, n, 0.001)[0]
        assert 0 < low <= stats.clopper_pearson_lower(k, n, 0.001)
        assert cs.reaches(k, n, low, 0.001) and not cs.reaches(k, n, low * (1 + 1e-6), 0.001)
        assert cs.upper(k, n, 0.001)[0] >= stats.clopper_pearson_upper(k, n, 0.001)


def exact_log_mixture(t: float, k: int, n: int, weights=(1 / 3, 1 / 3, 1 / 3)) -> mpmath.mpf:
    """log M_n(t) by 40-digit quadrature of its defining integrals (no beta functions), the
    integrand divided by its peak and split around the mode k/n, where its mass lies."""
    with mpmath.workdps(40):
        t, m = mpmath.mpf(t), n - k

        def log_ratio(q):
            return k * mpmath.log(q / t) + (m * mpmath.log((1 - q) / (1 - t)) if m else 0)

        mode = max(mpmath.mpf(k) / n, t)
        width = mpmath.sqrt(mpmath.mpf(max(k, 1)) * max(m, 1) / mpmath.mpf(n) ** 3)
        cuts = {min(max(mode + j * width, t), 1) for j in (-60, -20, -5, 0, 5, 20, 60)}
        points = sorted(cuts | {t, mpmath.mpf(1)})
        peak = log_ratio(mode)

        def ratio(q):
            return mpmath.exp(log_ratio(q) - peak) if q < 1 or not m else mpmath.mpf(0)

        mixed = (weights[0] * mpmath.quad(ratio, points) / (1 - t)
                 + weights[1] * mpmath.quad(lambda q: ratio(q) / q, points) / -mpmath.log(t))
        if not m:  # the point mass at q = 1: t^(-n)
            mixed += weights[2] * mpmath.exp(-n * mpmath.log(t) - peak)
        return mpmath.log(mixed) + peak


def test_exact_log_mixture_matches_the_closed_form():
    # the reference's own check, at sizes where mpmath's incomplete beta is quick
    for k, n, t in [(900, 1000, 0.85), (50, 50, 0.9), (10, 300, 0.01)]:
        with mpmath.workdps(40):
            power = k * mpmath.log(t) + (n - k) * mpmath.log(1 - mpmath.mpf(t))
            uniform = mpmath.betainc(k + 1, n - k + 1, t, 1) / (1 - mpmath.mpf(t))
            log_uniform = mpmath.betainc(k, n - k + 1, t, 1) / -mpmath.log(t)
            spike = mpmath.exp(-n * mpmath.log(t) + power) if k == n else 0
            closed = mpmath.log(uniform + log_uniform + spike) - power
        assert abs(exact_log_mixture(t, k, n, (1, 1, 1)) - closed) < 1e-30


# (n, k, alpha): the case first (n = 1e7, k = 9.9e6, alpha = 1e-10: the 1e-9 margin
# left its bound 6e-9 short), then mid-range, nearly-all and all-agree counts.
LARGE_N_CASES = [(10**7, 9_900_000, 1e-10), (10**7, 5_000_000, 1e-3), (10**7, 10**7 - 3, 1e-3),
                 (10**7, 10**7, 1e-10), (10**7, 20_000, 0.1), (10**6, 990_000, 1e-10),
                 (10**6, 400_000, 1e-3), (10**6, 10**6, 1e-3)]


@pytest.mark.parametrize("n,k,alpha", LARGE_N_CASES)
def test_mixture_lower_bound_is_valid_and_tight_at_large_n(n, k, alpha):
    # At the returned bound the exact statistic clears log(1/alpha) (valid), by less than
    # 1e-3 (tight: rounding costs a shift in t of about 1e-13 here).
    cs = BetaMixture(max_n=n, first_look=100, step=1000)
    bound = float(cs.lower(k, n, alpha)[0])
    assert 0 < bound < k / n
    excess = exact_log_mixture(bound, k, n) - mpmath.log(1 / mpmath.mpf(alpha))
    assert 0 <= excess < 1e-3, (bound, float(excess))


def test_mixture_union_bound_is_valid_at_large_n():
    # The smallest s the union test accepts, found by bisection on the test itself: there the
    # exact sum of 1 / M_c(s) over the other classes is at most alpha.
    cs = BetaMixture(max_n=10**7, first_look=100, step=1000)
    n, others, alpha = 10**7, np.array([60_000, 59_000, 0, 0]), 1e-10
    low, high = 0.001, 0.2
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if cs.union_below(others, n, middle, alpha)[0] else (middle, high)
    total = mpmath.fsum(mpmath.exp(-exact_log_mixture(1 - high, n - int(c), n)) for c in others)
    assert total <= alpha
    assert total > alpha * (1 - 1e-3)  # and tight


def test_bonferroni_is_clopper_pearson_at_alpha_over_looks():
    cs = bonferroni()
    assert cs.looks.tolist() == [20, 40, 80, 160, 320, 640, 1280, 2000]
    for k, n in [(15, 20), (300, 320), (1999, 2000)]:
        expected = stats.clopper_pearson_lower(k, n, 0.01 / 8)
        assert cs.lower(k, n, 0.01)[0] == pytest.approx(expected, rel=1e-12)
        assert cs.reaches(k, n, expected * (1 - 1e-9), 0.01)
        assert not cs.reaches(k, n, expected * (1 + 1e-9), 0.01)
    with pytest.raises(ValueError, match="only looks at"):
        cs.lower(10, 30, 0.01)


def test_mixture_union_counts_every_class():
    # sum over all other classes of 1/M_c(s), each class on its own (no grouping by count)
    cs = mixture()
    others, n, alpha = np.array([5, 5, 0, 0, 0, 2, 0]), 1000, 0.01
    s = np.linspace(0.004, 0.05, 400)
    total = sum(np.exp(-confidence._log_mixture(1 - s, n - c, n, cs.weights)) for c in others)
    expected = (s >= (others.max() + 1) / n) & (total <= alpha)
    near = np.abs(np.log(total / alpha)) < 1e-6
    assert np.array_equal(cs.union_below(others, n, s, alpha)[~near], expected[~near])
    assert expected.any() and not expected.all()


def test_mixture_union_rejects_no_threshold_below_the_lemma_s_region():
    # Each term decreases in s only above (N_c + 1) / n, so the union test is off below
    # (max_c N_c + 1) / n, the largest count's region, even where its sum is small there.
    cs = BetaMixture(max_n=1000, first_look=1, step=1)
    for n, others in [(2, [1, 0]), (3, [2, 1]), (6, [5, 0]), (7, [6, 1, 0])]:
        below = np.linspace(0, (max(others) + 1) / n, 400, endpoint=False)[1:]
        assert not cs.union_below(others, n, below[below < 1], 0.5).any(), (n, others)
    small = sum(np.exp(-confidence._log_mixture(1 - 0.99875, 2 - c, 2, cs.weights)) for c in (1, 0))
    assert small < 0.02  # the runner-up's one vote of two, at s = 0.99875


def test_tcertify_decisions_use_each_bound_at_its_share_of_alpha():
    # At a Bonferroni look: certified exactly up to T-CERTIFY's radius from Clopper-Pearson at
    # alpha/2/J and the union bound at alpha/2/J (stats, tested on its own).
    rng = np.random.default_rng(8)
    sigma, alpha, n, radii = 1.0, 0.01, 1000, np.arange(0, 3.01, 0.05)
    for _ in range(20):
        counts = rng.multinomial(n, rng.dirichlet([30, 2, 1, 1]))
        label = int(np.argmax(counts))
        others = np.delete(counts, label)
        procedure = RadiiProcedure(radii, sigma, alpha, 8000, method="tcertify", num_classes=4,
                                   confidence_sequence="bonferroni", first_look=n,
                                   batch_size=n)
        # looks 1000, 2000, 4000, 8000; the final look's share of alpha is kept for n = 8000
        level = alpha * (1 - procedure.final_share) / 2 / len(procedure.cs.looks)
        pa = stats.clopper_pearson_lower(counts[label], n, level)
        pb = min(stats.pb_upper_bound(others, n, level), 1 - pa)
        radius = stats.certified_radius(pa, pb, sigma)
        procedure.update(counts[label], n, others)
        clear = np.abs(radii - radius) > 1e-6
        expected = (radii <= radius) & (radius > 0)
        assert np.array_equal(procedure.certified[clear], expected[clear])


# --- exact coverage of the confidence sequences over all stopping times ----------------------


@pytest.mark.parametrize("make", [mixture, bonferroni], ids=["mixture", "bonferroni"])
@pytest.mark.parametrize("alpha", [0.1, 0.001])
def test_lower_sequence_crosses_p_with_probability_at_most_alpha(make, alpha):
    cs = make()
    worst = max(crossing_probability(cs, p, alpha) for p in atoms(cs, alpha, 40, seed=5))
    assert worst <= alpha
    assert worst >= 0.05 * alpha  # the computation sees the tail at all


def test_a_look_spending_alpha_without_correction_fails():
    # The mutant of test_lower_sequence_crosses_p_with_probability_at_most_alpha: with the
    # whole alpha at each of 8 looks, the exact failure probability exceeds alpha.
    cs = UncorrectedCP(**LOOKS)
    worst = max(crossing_probability(cs, p, 0.1) for p in atoms(cs, 0.1, 40, seed=5))
    assert worst > 0.1


def union_crossing_probability(cs, probs: tuple[float, float], alpha: float) -> float:
    """Exact P(exists look: union bound over the two other classes <= max(probs)), three
    classes with the other two at `probs`; the pair of their counts is tracked exactly."""
    p_b, p_c = probs
    mass, previous, crossed = np.ones((1, 1)), 0, 0.0
    for n in cs.looks:
        step = n - previous
        i = np.arange(step + 1)
        increments = binom.pmf(i[:, None], step, p_b) * binom.pmf(
            i[None, :], step - i[:, None], p_c / (1 - p_b))
        mass = np.clip(fftconvolve(mass, increments), 0.0, None)
        crossed += mass[mass < TINY].sum()
        mass[mass < TINY] = 0.0
        b, c = np.nonzero(mass)
        hit = np.array([cs.union_below([x, y], int(n), max(probs), alpha)[0]
                        for x, y in zip(b, c, strict=True)], dtype=bool)
        crossed += mass[b[hit], c[hit]].sum()
        mass[b[hit], c[hit]] = 0.0
        previous = n
    return crossed


@pytest.mark.parametrize("make", [mixture, bonferroni], ids=["mixture", "bonferroni"])
def test_union_sequence_covers_the_runner_up(make):
    cs = make(max_n=120, first_look=10)
    for probs in [(0.05, 0.05), (0.2, 0.01), (0.1, 0.3)]:
        assert union_crossing_probability(cs, probs, 0.1) <= 0.1


# --- the decision procedure, exactly ---------------------------------------------------------


def procedure_certifies(make, p: float) -> tuple[np.ndarray, float]:
    """Exact P(radius i ends certified) for counts ~ Bin(n, p) (two classes), and the mass
    left out (counts with probability < 1e-15 at a look, bounded as if all failed).

    Paths are grouped by the decisions so far; within a group a real procedure object reached
    along a real path stands for every path at the same count (its next decisions depend on the
    decisions and the new count only).
    """
    first = make()
    groups = {tuple(first.status): (np.array([1.0]), {0: first})}
    certified, lost = np.zeros(first.radii.size), 0.0
    while groups:
        following = {}
        for mass, procs in groups.values():
            some = next(iter(procs.values()))
            if some.done:
                certified += mass.sum() * some.certified
                continue
            n, step = some.n + some.next_batch(), some.next_batch()
            mass = np.convolve(mass, binom.pmf(np.arange(step + 1), step, p))
            keep = mass >= 1e-15
            lost += mass[~keep].sum()
            counts = np.array(sorted(procs))
            for k in np.nonzero(keep)[0]:
                proc = copy.deepcopy(procs[counts[np.searchsorted(counts, k, "right") - 1]])
                proc.update(int(k), n, [n - int(k)])
                total, reps = following.setdefault(tuple(proc.status), (np.zeros(n + 1), {}))
                total[k] += mass[k]
                reps.setdefault(int(k), proc)
        groups = following
    return certified, lost


def wrong_radii(radii, sigma, p) -> np.ndarray:
    """The radii a certificate must not claim: Phi(r / sigma) > p, or r = 0 with p <= 1/2."""
    radii = np.asarray(radii)
    return np.where(radii == 0, p <= 0.5, norm.cdf(radii / sigma) > p)


PROCEDURE = dict(radii=[0.0, 0.25, 0.5], sigma=0.5, alpha=0.1, max_n=240)


def supremum_points(radii, sigma) -> list[float]:
    """Where P(a wrong radius is certified) attains its supremum: P(radius r certified) grows
    with p_A, and r is wrong for p_A < Phi(r / sigma) (r = 0: p_A <= 1/2), so the worst p_A
    sits just below each threshold (exactly 1/2 for r = 0)."""
    thresholds = norm.cdf(np.asarray(radii) / sigma)
    return [0.5 if r == 0 else float(t) - 1e-9 for r, t in zip(radii, thresholds, strict=True)]


def procedure_failure(method: str, cs_name: str, p: float,
                      **options) -> tuple[float, np.ndarray, float]:
    """Exact P(some radius certified wrongly) of PROCEDURE at p_A = p, the per-radius
    certification probabilities, and the mass left out (options: RadiiProcedure's)."""
    def make():
        return RadiiProcedure(**PROCEDURE, method=method, num_classes=2,
                              confidence_sequence=cs_name, first_look=15, batch_size=60,
                              **options)

    certified, lost = procedure_certifies(make, p)
    wrong = wrong_radii(PROCEDURE["radii"], PROCEDURE["sigma"], p)
    # certified radii are a prefix, so the smallest wrong radius's probability is the failure's
    return (float(certified[wrong].max()) if wrong.any() else 0.0), certified, lost


OPTIONS = {"no final look": dict(final_share=0.0), "final look": {},
           "precision": dict(precision=0.25), "no futility": dict(futility=None)}


def procedure_cases():
    """(method, sequence, options): T-CERTIFY's mixture, and T-CERTIFY's other variants than
    the default, are slow (the DP tracks more groups)."""
    for name, options in OPTIONS.items():
        for method, cs_name in [("certify", "mixture"), ("certify", "bonferroni"),
                                ("tcertify", "bonferroni"), ("tcertify", "mixture")]:
            slow = method == "tcertify" and (cs_name == "mixture" or name != "final look")
            yield pytest.param(method, cs_name, options, id=f"{name}-{method}-{cs_name}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("method,cs_name,options", list(procedure_cases()))
def test_procedure_fails_with_probability_at_most_alpha_at_every_radius(method, cs_name,
                                                                       options):
    # Every variant: the sequence alone, with the default final look at max_n (its share of
    # alpha), stopping on a precision of one radius step (a stopping rule), and without the
    # default futility rule (another stopping rule).
    alpha, radii = PROCEDURE["alpha"], PROCEDURE["radii"]
    worst = 0.0
    for p in [*supremum_points(radii, PROCEDURE["sigma"]), norm.cdf(1.0) - 0.03]:
        failure, certified, lost = procedure_failure(method, cs_name, p, **options)
        assert lost < 1e-9
        assert failure + lost <= alpha, (p, certified)
        worst = max(worst, failure)
        right = ~wrong_radii(radii, PROCEDURE["sigma"], p)
        if right.any():  # the radii below p are certified at all
            assert certified[right].max() > 0.01
    assert worst > 0.05 * alpha  # the supremum points see the failures


def final_look_failure(cs_name: str, level: float, spent=None) -> float:
    """Exact failure probability of the one radius whose threshold is the level-`level`
    Clopper-Pearson bound at max_n of 215 votes, just below it (alpha 0.1, final share 0.5);
    spent: the (pA, pB) levels the final look is given instead of its share. No futility
    rule: giving paths up early would hide a final look that spends too much."""
    alpha, max_n, sigma = PROCEDURE["alpha"], PROCEDURE["max_n"], PROCEDURE["sigma"]
    threshold = stats.clopper_pearson_lower(215, max_n, level)

    def make():
        procedure = RadiiProcedure([sigma * norm.ppf(threshold)], sigma, alpha, max_n,
                                   confidence_sequence=cs_name, first_look=15, batch_size=60,
                                   final_share=0.5, futility=None)
        if spent is not None:
            procedure.final_levels = spent
        return procedure

    certified, lost = procedure_certifies(make, threshold - 1e-9)
    assert lost < 1e-9
    return float(certified[0])


@pytest.mark.parametrize("cs_name", ["mixture", "bonferroni"])
def test_final_look_spends_only_its_share_of_alpha(cs_name):
    # At a threshold where Clopper-Pearson at the whole alpha is exact (its bound at 215 of
    # 240 votes), the final look at its share keeps the whole procedure within alpha; given
    # the whole alpha besides the sequence's share (the union bound broken), it exceeds it.
    alpha = PROCEDURE["alpha"]
    assert final_look_failure(cs_name, alpha) <= alpha
    assert final_look_failure(cs_name, alpha / 2) <= alpha
    assert final_look_failure(cs_name, alpha, spent=(alpha, 0.0)) > alpha


@pytest.mark.parametrize("method", ["certify", "tcertify"])
@pytest.mark.parametrize("share", [0.0, 0.3, sequential.FINAL_SHARE])
def test_alpha_is_split_in_advance_between_the_sequence_and_the_final_look(method, share):
    procedure = RadiiProcedure([0.5], 0.5, 0.01, 1000, method=method, num_classes=3,
                               batch_size=100, final_share=share)
    assert sum(procedure.final_levels) == pytest.approx(0.01 * share, rel=1e-12)
    assert sum(procedure.levels) + sum(procedure.final_levels) == pytest.approx(0.01, rel=1e-12)
    if method == "tcertify":  # each look splits its share between pA and pB as pa_share says
        assert procedure.levels[0] == pytest.approx(procedure.levels[1], rel=1e-12)


def test_final_look_is_clopper_pearson_on_all_max_n_samples():
    sigma, alpha, max_n, share = 1.0, 0.01, 2000, 0.5
    radii = np.arange(0.0, 2.0, 0.01)
    procedure = RadiiProcedure(radii, sigma, alpha, max_n, first_look=1000, batch_size=1000,
                               final_share=share)
    thresholds = norm.cdf(radii / sigma)
    gained = 0
    for k in range(1500, 2001, 25):
        sequence = procedure.cs.reaches(k, max_n, thresholds, alpha * (1 - share))
        final = stats.clopper_pearson_lower(k, max_n, alpha * share) >= thresholds
        clear = np.abs(stats.clopper_pearson_lower(k, max_n, alpha * share) - thresholds) > 1e-9
        expected = sequence | final
        assert np.array_equal(procedure.certifiable(k, max_n)[clear], expected[clear]), k
        # before max_n only the sequence certifies
        assert np.array_equal(procedure.certifiable(k // 2, 1000),
                              procedure.cs.reaches(k // 2, 1000, thresholds, alpha * (1 - share)))
        gained += int((final & ~sequence).sum())
    assert gained > 0  # the final look certifies radii the sequence cannot


def run_with_history(procedure: RadiiProcedure, pa: float, rng) -> list[tuple[int, np.ndarray]]:
    """Drive `procedure` on a Bin(n, pa) path; (n, status) after every look."""
    history, count = [], 0
    while (size := procedure.next_batch()) > 0:
        count += rng.binomial(size, pa)
        procedure.update(count, procedure.n + size)
        history.append((procedure.n, procedure.status.copy()))
    return history


@pytest.mark.parametrize("precision", [0.25, 0.5])
def test_precision_stops_at_the_first_look_where_the_undecided_radii_are_within_it(precision):
    # Coupled on one path: the procedure with a precision certifies exactly what the one
    # without it has certified at the same look, and stops at the first look where the latter's
    # undecided radii all lie within the precision of its largest certified radius.
    radii, sigma = TABLE1_RADII_BELOW(1.75), 0.5
    stopped_early = 0
    for seed, pa in enumerate([0.6, 0.8, 0.9, 0.97, 0.99, 0.995, 0.999, 0.9995, 1.0] * 3):
        options = dict(max_n=20_000, batch_size=500, first_look=100)
        full = run_with_history(RadiiProcedure(radii, sigma, 0.001, **options), pa,
                                np.random.default_rng(seed))
        short = RadiiProcedure(radii, sigma, 0.001, precision=precision, **options)
        run_with_history(short, pa, np.random.default_rng(seed))
        expected = full[-1][0]
        for n, status in full:
            certified = radii[status == 1]
            undecided = radii[status == 0]
            if certified.size and undecided.size and \
                    undecided.max() - certified.max() <= precision:
                expected = n
                break
        assert short.n == expected, (pa, seed)
        at_stop = dict(full)[short.n]
        assert np.array_equal(short.certified, at_stop == 1)
        assert np.all(short.decided_at[at_stop == 0] == short.n)  # reported not certified
        stopped_early += short.n < full[-1][0]
    assert stopped_early >= 5


def TABLE1_RADII_BELOW(top: float) -> np.ndarray:
    return sequential.TABLE1_RADII[sequential.TABLE1_RADII <= top]


def test_precision_never_certifies_more_than_the_sequence():
    # The mutant of the precision rule: certifying (not dropping) the undecided radii at the
    # stop fails far more often than alpha at the threshold just above a certified radius.
    class CertifiesTheRest(RadiiProcedure):
        def _drop(self, mask):
            if self._precise():
                self._certify(mask)
            super()._drop(mask)

    p = norm.cdf(1.0) - 1e-9  # radius 0.5 is wrong, 0.25 right
    certified, _ = procedure_certifies(
        lambda: CertifiesTheRest(**PROCEDURE, first_look=15, batch_size=60, precision=0.25), p)
    assert certified[2] > PROCEDURE["alpha"]


def test_futility_gives_up_what_the_optimistic_projection_cannot_certify():
    # After 650 of 1000 samples the level-0.05 upper bound on pA is 0.675: 9000 more samples
    # at that rate leave p_hat near 0.673 at max_n, short of Phi(0.5) = 0.69 (not yet ruled
    # out by the sequence's upper bound); at 700 the projection certifies 0.5. At 680 only
    # the more optimistic level-0.001 bound keeps it.
    options = dict(radii=[0.5], sigma=1.0, alpha=0.001, max_n=10_000, first_look=1000,
                   batch_size=1000)
    for count, futility, dropped in [(650, 0.05, True), (700, 0.05, False), (650, None, False),
                                     (680, 0.05, True), (680, 0.001, False)]:
        procedure = RadiiProcedure(**options, futility=futility)
        procedure.update(count, 1000)
        assert procedure.done is dropped, (count, futility)
        upper = stats.clopper_pearson_upper(count, 1000, futility) if futility else 1.0
        projected = count + int(np.floor(upper * 9000))
        assert procedure.certifiable(projected, 10_000)[0] is not dropped


def test_futility_certifies_a_subset_of_the_same_path_and_stops_no_later():
    # Coupled on one stream: futility only drops radii earlier, so what it certifies is
    # certified without it, and it stops no later; on near-threshold inputs it stops earlier.
    radii, sigma = TABLE1_RADII_BELOW(1.75), 0.5
    earlier = fewer = 0
    for seed, pa in enumerate([0.6, 0.8, 0.9, 0.97, 0.99, 0.995, 0.998, 0.999, 1.0] * 3):
        options = dict(max_n=20_000, batch_size=500, first_look=100)
        plain = RadiiProcedure(radii, sigma, 0.001, futility=None, **options)
        run_with_history(plain, pa, np.random.default_rng(seed))
        hasty = RadiiProcedure(radii, sigma, 0.001, futility=0.05, **options)
        run_with_history(hasty, pa, np.random.default_rng(seed))
        assert hasty.n <= plain.n and not np.any(hasty.certified & ~plain.certified), pa
        earlier += hasty.n < plain.n
        fewer += int(plain.certified.sum() - hasty.certified.sum())
    assert earlier >= 10
    assert fewer <= 3  # what futility gives up, luck rarely certifies


def test_procedure_failure_exceeds_alpha_when_dropping_is_replaced_by_certifying():
    # Sanity check of procedure_certifies: certifying on the point estimate fails often.
    class PointEstimate(RadiiProcedure):
        def certifiable(self, count_a, n, other_counts=None):
            return self.thresholds <= count_a / n

    radii, sigma, p = [0.0, 0.25, 0.5], 0.5, 0.835
    certified, _ = procedure_certifies(
        lambda: PointEstimate(radii, sigma, 0.1, 240, first_look=15, batch_size=60), p)
    assert certified[2] > 0.1


# --- Monte-Carlo coverage through Smooth -----------------------------------------------------


@pytest.mark.parametrize("method", ["certify", "tcertify"])
def test_smooth_certify_radii_coverage(method):
    # Class 3 is "first coordinate > 1.2": its smoothed radius at x0 is exactly x0 - 1.2.
    classifier = ThresholdClassifier([-0.4, 0.5, 1.2])
    sigma, alpha, true_radius = 0.5, 0.1, 0.49
    smooth = Smooth(classifier, 4, sigma, input_range=None)
    x = torch.tensor([1.2 + true_radius])
    radii = [0.25, 0.5, 0.75]
    runs, wrong, right = 150, 0, 0
    for seed in range(runs):
        cert = smooth.certify_radii(x, radii=radii, alpha=alpha, max_n=2000, batch_size=200, n0=50,
                                    method=method,
                                    generator=torch.Generator().manual_seed(seed))
        assert cert.label in (3, -1)
        wrong += cert.certified[1] or cert.certified[2]
        right += cert.certified[0]
    assert wrong <= alpha * runs + 3 * np.sqrt(alpha * (1 - alpha) * runs)
    assert right >= 0.9 * runs


# --- behaviour -------------------------------------------------------------------------------


@pytest.mark.parametrize("cs_name", ["mixture", "bonferroni"])
def test_stops_early_for_certain_and_for_hopeless_inputs(threshold_classifier, cs_name):
    smooth = Smooth(threshold_classifier, 4, 0.5, input_range=None)
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    certain = smooth.certify_radii(torch.tensor([3.0]), radii=radii, alpha=0.001, max_n=100_000,
                                   batch_size=100,
                                   confidence_sequence=cs_name,
                                   generator=torch.Generator().manual_seed(0))
    assert certain.label == 3 and all(certain.certified)
    assert certain.samples_used <= 1000
    # pA = 0.464 for the top class: nothing can be certified, and that is clear quickly.
    hopeless = smooth.certify_radii(torch.tensor([0.5]), radii=radii, alpha=0.001, max_n=100_000,
                                    batch_size=100,
                                    confidence_sequence=cs_name,
                                    generator=torch.Generator().manual_seed(0))
    assert hopeless.label == -1 and not any(hopeless.certified)
    assert hopeless.samples_used <= 2000
    assert hopeless.samples_used == 100 + hopeless.n == 100 + max(hopeless.decided_at)


def test_certify_radii_matches_the_procedure_on_the_same_stream(threshold_classifier):
    smooth = Smooth(threshold_classifier, 4, 0.5, input_range=None)
    x, radii = torch.tensor([1.8]), [0.25, 0.5, 0.75]
    cert = smooth.certify_radii(x, radii=radii, alpha=0.01, max_n=20_000, batch_size=500, n0=100,
                                method="tcertify",
                                generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    selection = smooth.sampler.counts(x, 100, 500, generator)
    label = int(np.argmax(selection))
    procedure = RadiiProcedure(radii, 0.5, 0.01, 20_000, method="tcertify", num_classes=4,
                               batch_size=500)
    counts = np.zeros(4, dtype=np.int64)
    while (size := procedure.next_batch()) > 0:
        counts += smooth.sampler.counts(x, size, 500, generator)
        procedure.update(counts[label], int(counts.sum()), np.delete(counts, label))
    assert cert == procedure.certificate(label, selection_counts=selection)
    assert cert.count_a == counts[label] and cert.n == counts.sum()
    assert cert.selection_counts == tuple(selection) and cert.estimation_counts == tuple(counts)
    # true radius 0.6: certified at 0.25 and 0.5, not at 0.75
    assert cert.label == 3 and cert.certified == (True, True, False)


def test_procedure_on_a_hand_made_path():
    procedure = RadiiProcedure([0.0, 0.5, 2.5, 5.0], 1.0, 0.001, 10_000,
                               confidence_sequence="bonferroni", first_look=1000,
                               batch_size=1000, final_share=0.0)
    # looks at 1000, 2000, 4000, 8000, 10000: Clopper-Pearson at 0.001 / 5 each; 5.0 is out of
    # reach of 10,000 samples (the ceiling is Phi^-1(0.0002^(1/10000)) = 3.14)
    assert procedure.certificate(0).decided_at == (-1, -1, -1, 0)
    assert procedure.next_batch() == 1000
    procedure.update(1000, 1000)  # all correct: pA >= 0.0002^(1/1000) = Phi(2.39)
    assert procedure.certified.tolist() == [True, True, False, False]
    assert procedure.next_batch() == 1000
    procedure.update(1700, 2000)  # 700 wrong in a row: pA near 0.85 < Phi(2.5)
    cert = procedure.certificate(7, selection_n=100)
    assert procedure.done and procedure.next_batch() == 0
    assert cert == sequential.RadiiCertificate(
        label=7, radii=(0.0, 0.5, 2.5, 5.0), certified=(True, True, False, False),
        samples_used=2100, n=2000, count_a=1700, decided_at=(1000, 1000, 2000, 0))
    with pytest.raises(ValueError, match="n_total"):
        procedure.update(2700, 3000)


def test_certificate_is_abstain_when_nothing_is_certified():
    procedure = RadiiProcedure([0.5, 1.0], 1.0, 0.001, 400, first_look=100, batch_size=100)
    while (size := procedure.next_batch()) > 0:
        procedure.update(procedure.count_a + size // 2, procedure.n + size)
    cert = procedure.certificate(4)
    assert cert.label == -1 and cert.certified == (False, False)
    assert cert.as_dict()["label"] == -1


def test_last_look_decides_every_radius():
    procedure = RadiiProcedure([0.0], 1.0, 0.001, 500, first_look=100, batch_size=100,
                               futility=None)  # which would give 0 up before the last look
    while (size := procedure.next_batch()) > 0:
        procedure.update(procedure.count_a + size // 2 + 1, procedure.n + size)  # pA ~ 0.51
    assert procedure.n == 500 and procedure.done and not procedure.certified[0]


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(radii=[0.5, 0.25]), "strictly increasing"),
        (dict(radii=[0.5, 0.5]), "strictly increasing"),
        (dict(radii=[-0.25, 0.5]), "finite and >= 0"),
        (dict(radii=[0.25, float("nan")]), "finite and >= 0"),
        (dict(radii=[]), "non-empty"),
        (dict(radii="abc"), "non-empty"),
        (dict(alpha=0.0), "alpha must be"),
        (dict(alpha=1.5), "alpha must be"),
        (dict(max_n=500, batch_size=1000), "max_n must be >= batch_size"),
        (dict(max_n=0), "max_n must be"),
        (dict(method="predict"), "method must be one of"),
        (dict(confidence_sequence="hoeffding"), "confidence_sequence must be one of"),
        (dict(method="tcertify", num_classes=None), "num_classes must be"),
        (dict(method="tcertify", pa_share=1.0), "pa_share must be"),
        (dict(final_share=1.0), r"final_share must be a number in \[0, 1\)"),
        (dict(final_share=-0.1), "final_share must be"),
        (dict(final_share=True), "final_share must be"),
        (dict(final_share="0.5"), "final_share must be"),
        (dict(precision=0.0), "precision must be a finite number > 0"),
        (dict(precision=-0.25), "precision must be"),
        (dict(precision=float("inf")), "precision must be"),
        (dict(precision=True), "precision must be"),
        (dict(futility=0.0), r"futility must be a number in \(0, 1\) \(or None\), got 0.0"),
        (dict(futility=1.0), "futility must be"),
        (dict(futility=True), "futility must be"),
        (dict(futility="0.05"), "futility must be"),
        (dict(alpha=1e-99, final_share=1e-3), "alpha must be >= .* final share 0.001"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    arguments = dict(radii=[0.25, 0.5], sigma=0.5, alpha=0.001, max_n=10_000, batch_size=1000,
                     num_classes=10)
    with pytest.raises(ValueError, match=match):
        RadiiProcedure(**{**arguments, **kwargs})


def test_bad_updates_are_named():
    procedure = RadiiProcedure([1.0], 0.5, 0.001, 1000, method="tcertify", num_classes=3,
                               batch_size=100)
    with pytest.raises(ValueError, match="n_total must be"):
        procedure.update(50, 60, [5, 5])
    with pytest.raises(ValueError, match="count_a must"):
        procedure.update(101, 100, [0, 0])
    with pytest.raises(ValueError, match="other_counts"):
        procedure.update(97, 100, [2, 0])
    procedure.update(97, 100, [2, 1])  # pA = 0.97 against Phi(2) = 0.977: undecided
    assert not procedure.done
    with pytest.raises(ValueError, match="count_a must"):
        procedure.update(90, 200, [60, 50])


def test_smooth_certify_radii_checks_arguments_before_sampling(threshold_classifier):
    smooth = Smooth(threshold_classifier, 4, 0.5, input_range=None)
    x = torch.tensor([1.0])
    with pytest.raises(ValueError, match="max_n must be >= batch_size"):
        smooth.certify_radii(x, radii=[0.25], alpha=0.001, max_n=100, batch_size=1000)
    with pytest.raises(ValueError, match="radii must be strictly increasing"):
        smooth.certify_radii(x, radii=[0.5, 0.25], alpha=0.001, max_n=10_000, batch_size=1000)
    with pytest.raises(ValueError, match="confidence_sequence"):
        make_confidence_sequence("hoeffding", 1000)


# --- input-specific n ------------------------------------------------------------------------


def expected_certify_radius(p: float, n: int, sigma: float, alpha: float) -> float:
    """E[CERTIFY's radius] with count ~ Bin(n, p), summed exactly over the counts."""
    k = np.arange(n + 1)
    weights = binom.pmf(k, n, p)
    keep = weights > 1e-14
    low = stats.clopper_pearson_lower(k[keep], n, alpha)
    return float((weights[keep] * stats.certified_radius(low, 1 - low, sigma)).sum())


@pytest.mark.parametrize("p", [0.8, 0.95, 0.99])
def test_choose_n_keeps_the_expected_radius_loss_near_the_tolerance(p):
    sigma, alpha, max_n, tolerance = 0.5, 0.001, 20_000, 0.02
    # a large pilot pins pA down, so the loss at pA itself is what choose_n controls
    pilot = np.array([round(p * 10**6), 10**6 - round(p * 10**6)])
    n = choose_n(pilot, max_n, sigma, alpha, tolerance)
    assert 100 <= n < max_n
    loss = (expected_certify_radius(p, max_n, sigma, alpha)
            - expected_certify_radius(p, n, sigma, alpha))
    assert loss <= 1.25 * tolerance
    smaller = round(n * 2 ** -0.5)  # two grid steps smaller would have lost more than allowed
    assert (expected_certify_radius(p, max_n, sigma, alpha)
            - expected_certify_radius(p, smaller, sigma, alpha)) > 0.75 * tolerance


@pytest.mark.parametrize("p", [0.85, 0.9, 0.95])
def test_choose_n_bounds_the_loss_over_the_pilots_interval(p):
    # 90 of 100 pilot votes: the 95% Clopper-Pearson interval is [0.824, 0.951]
    sigma, alpha, max_n, tolerance = 0.5, 0.001, 20_000, 0.02
    n = choose_n(np.array([90, 6, 4]), max_n, sigma, alpha, tolerance)
    loss = (expected_certify_radius(p, max_n, sigma, alpha)
            - expected_certify_radius(p, n, sigma, alpha))
    assert loss <= 1.25 * tolerance


def test_choose_n_extremes():
    hopeless, certain = np.array([40, 35, 25]), np.array([100, 0, 0])
    assert choose_n(hopeless, 100_000, 0.5, 0.001, 0.02) == 100
    assert choose_n(certain, 100_000, 0.5, 0.001, 0.0) == 100_000
    assert choose_n(certain, 100_000, 0.5, 0.001, 0.02) > 50_000  # the ceiling moves with n
    assert choose_n(certain, 50, 0.5, 0.001, 0.02) == 50
    for bad, match in [(dict(tolerance=-1), "tolerance"), (dict(max_n=0), "max_n"),
                       (dict(selection_counts=[5]), "selection_counts")]:
        arguments = dict(selection_counts=certain, max_n=1000, sigma=0.5, alpha=0.001)
        with pytest.raises(ValueError, match=match):
            choose_n(**{**arguments, **bad})


def test_certify_adaptive_checks_arguments_before_sampling():
    class Refuses(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("sampled before checking the arguments")

    smooth = Smooth(Refuses(), 4, 0.5)
    for bad, match in [(dict(tolerance=-0.1), "tolerance"), (dict(tolerance=True), "tolerance"),
                       (dict(max_n=0), "max_n"), (dict(alpha=2.0), "alpha")]:
        arguments = dict(x=torch.tensor([1.0]), n0=100, max_n=1000, alpha=0.001, batch_size=100)
        with pytest.raises(ValueError, match=match):
            smooth.certify_adaptive(**{**arguments, **bad})


def test_certify_adaptive_runs_certify_all_on_fresh_samples(threshold_classifier):
    smooth = Smooth(threshold_classifier, 4, 0.5, input_range=None)
    x = torch.tensor([1.6])
    result = smooth.certify_adaptive(x, n0=100, max_n=50_000, alpha=0.001, batch_size=1000,
                                     generator=torch.Generator().manual_seed(2))
    n = int(result.estimation_counts.sum())
    assert n == choose_n(result.selection_counts, 50_000, 0.5, 0.001, 0.02) < 50_000
    generator = torch.Generator().manual_seed(2)
    selection = smooth.sampler.counts(x, 100, 1000, generator)
    estimation = smooth.sampler.counts(x, n, 1000, generator)
    assert np.array_equal(selection, result.selection_counts)
    assert np.array_equal(estimation, result.estimation_counts)
    for method, cert in [("certify", result.certify), ("tcertify", result.tcertify),
                         ("tcertify-strict", result.strict)]:
        assert cert == stats.certify_from_counts(selection, estimation, 0.5, 0.001, method)
