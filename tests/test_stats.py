from fractions import Fraction
from math import comb

import mpmath
import numpy as np
import pytest
from conftest import true_radius
from reference import assert_matches_reference
from scipy.optimize import brentq
from scipy.stats import beta, binom, norm

from smoothcert import stats
from smoothcert.stats import (
    ABSTAIN,
    ALPHA_FLOOR,
    certify_from_counts,
    clopper_pearson_lower,
    clopper_pearson_upper,
    pb_upper_bound,
    predict_from_counts,
)

# scipy.stats' tails (the reference here) and scipy.special's (used by stats) agree to ~1e-12
# relative at n = 10^7; exact checks at small n use mpmath with no slack at all.
REFERENCE_SLACK = 1 + 1e-9


def union_tail(p, counts, n):
    return binom.cdf(np.asarray(counts), n, p).sum()


def exact_tail_at_least(k: int, n: int, p: float) -> mpmath.mpf:
    """P(Bin(n, p) >= k) in 50-digit arithmetic, p taken exactly as the given double."""
    with mpmath.workdps(50):
        p = mpmath.mpf(p)
        return mpmath.fsum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


def exact_tail_at_most(k: int, n: int, p: float) -> mpmath.mpf:
    """P(Bin(n, p) <= k) in 50-digit arithmetic."""
    with mpmath.workdps(50):
        p = mpmath.mpf(p)
        return mpmath.fsum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(0, k + 1))


# --- Clopper-Pearson -------------------------------------------------------------------------


def beta_quantile_lower(k: int, n: int, alpha: float) -> float:
    return beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0


def beta_quantile_upper(k: int, n: int, alpha: float) -> float:
    return beta.ppf(1 - alpha, k + 1, n - k) if k < n else 1.0


def random_binomial_cases(seed: int, count: int) -> list[tuple[int, int, float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        n = int(rng.integers(1, 10**6))
        cases.append((int(rng.integers(0, n + 1)), n, float(10 ** rng.uniform(-6, -0.5))))
    return cases


def test_clopper_pearson_matches_beta_quantiles():
    cases = random_binomial_cases(1, 200)
    assert_matches_reference(clopper_pearson_lower, beta_quantile_lower, cases, rtol=1e-9)
    assert_matches_reference(clopper_pearson_upper, beta_quantile_upper, cases, rtol=1e-9,
                             atol=1e-15)


def test_clopper_pearson_hand_checked_values():
    # All n successes: P(Bin(n, p) >= n) = p^n = alpha  =>  p = alpha^(1/n).
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert clopper_pearson_upper(0, 100, 0.001) == pytest.approx(1 - 0.001 ** (1 / 100), rel=1e-12)
    assert clopper_pearson_lower(0, 100, 0.05) == 0.0
    assert clopper_pearson_upper(100, 100, 0.05) == 1.0
    # One success in one trial: P(Bin(1, p) >= 1) = p = alpha.
    assert clopper_pearson_lower(1, 1, 0.2) == pytest.approx(0.2, rel=1e-12)


def test_clopper_pearson_is_conservative_after_rounding():
    rng = np.random.default_rng(2)
    n = rng.integers(10, 10**7, size=300)
    k = (rng.uniform(0.01, 1, size=300) * n).astype(np.int64)
    alpha = 10 ** rng.uniform(-6, -1, size=300)
    low = clopper_pearson_lower(k, n, alpha)
    up = clopper_pearson_upper(k, n, alpha)
    assert np.all(binom.sf(k - 1, n, low) <= alpha * REFERENCE_SLACK)
    assert np.all(binom.cdf(k, n, up) <= alpha * REFERENCE_SLACK)


@pytest.mark.parametrize("alpha", [ALPHA_FLOOR, 1e-40, 1e-3, 0.2])
def test_clopper_pearson_is_exact_against_50_digit_tails(alpha):
    """Valid (the exact tail at the bound is <= alpha) and tight (not so 1e-9 further on)."""
    for n in (30, 60, 500):
        for k in sorted({1, 2, 5, n // 3, n // 2, n - 1, n}):
            low = clopper_pearson_lower(k, n, alpha)
            assert exact_tail_at_least(k, n, low) <= alpha, (n, k)
            assert exact_tail_at_least(k, n, low * (1 + 1e-9)) > alpha, (n, k)
            up = clopper_pearson_upper(n - k, n, alpha)
            assert exact_tail_at_most(n - k, n, up) <= alpha, (n, k)
            assert exact_tail_at_most(n - k, n, up * (1 - 1e-9)) > alpha, (n, k)


def test_clopper_pearson_vectorises_over_alpha():
    alphas = np.array([1e-4, 1e-3, 1e-2])
    low = clopper_pearson_lower(900, 1000, alphas)
    assert low.shape == (3,)
    assert np.all(np.diff(low) > 0)  # a larger alpha gives a tighter (higher) lower bound


# --- the T-CERTIFY union bound ---------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
def test_pb_upper_bound_is_the_root_of_the_union_tail(num_classes):
    rng = np.random.default_rng(num_classes)
    for _ in range(5):
        n = int(rng.integers(100, 200_000))
        others = rng.multinomial(
            int(n * rng.uniform(0.01, 0.5)), rng.dirichlet(np.ones(num_classes - 1))
        )
        alpha = float(10 ** rng.uniform(-5, -1))
        bound = pb_upper_bound(others, n, alpha)

        def excess(p, others=others, n=n, alpha=alpha):
            return union_tail(p, others, n) - alpha

        root = brentq(excess, 1e-15, 1 - 1e-15, xtol=1e-300, rtol=1e-15)
        assert bound == pytest.approx(root, rel=1e-9)
        assert union_tail(bound, others, n) <= alpha * REFERENCE_SLACK  # a valid bound ...
        assert union_tail(bound * (1 - 1e-9), others, n) > alpha  # ... and a tight one


def test_pb_upper_bound_two_classes_is_clopper_pearson():
    def pb_upper_bound_of_one(k: int, n: int, alpha: float) -> float:
        return pb_upper_bound([k], n, alpha)

    cases = [(3, 100, 0.01), (0, 1000, 0.001), (400, 1000, 1e-5)]
    assert_matches_reference(pb_upper_bound_of_one, clopper_pearson_upper, cases, rtol=1e-12)


def test_pb_upper_bound_counts_unseen_classes():
    n, alpha = 1000, 0.001  # small n: the (1 - p)^n terms of unseen classes are not negligible
    seen_only = pb_upper_bound([5], n, alpha)
    with_unseen = pb_upper_bound([5] + [0] * 998, n, alpha)
    assert with_unseen > seen_only
    # Ignoring the unseen classes would give an invalid bound for the 999-class problem.
    everything = [5] + [0] * 998
    assert union_tail(seen_only, everything, n) > alpha >= union_tail(with_unseen, everything, n)
    # All zeros: (C - 1) (1 - p)^n = alpha has a closed form.
    n = 10_000
    zeros = pb_upper_bound([0] * 9, n, alpha)
    assert zeros == pytest.approx(1 - (alpha / 9) ** (1 / n), rel=1e-9)


def test_pb_upper_bound_extreme_sizes():
    rng = np.random.default_rng(3)
    n = 10**7
    others = rng.multinomial(1000, np.ones(999) / 999)
    bound = pb_upper_bound(others, n, 1e-6)
    assert 0 < bound < 1
    assert union_tail(bound, others, n) <= 1e-6
    assert union_tail(bound * (1 - 1e-9), others, n) > 1e-6


def test_pb_upper_bound_vectorises_over_alpha():
    others = [30, 5, 0, 0]
    alphas = np.array([1e-4, 1e-3, 1e-2])
    bounds = pb_upper_bound(others, 1000, alphas)
    assert bounds.shape == (3,)
    assert np.all(np.diff(bounds) < 0)
    for a, b in zip(alphas, bounds, strict=True):
        assert b == pb_upper_bound(others, 1000, float(a))


def test_pb_upper_bound_top_count_equal_to_n_is_one():
    assert pb_upper_bound([100, 0], 100, 0.01) == 1.0


@pytest.mark.parametrize("alpha", [ALPHA_FLOOR, 1e-3, 0.15])
def test_pb_upper_bound_is_exact_against_50_digit_tails(alpha):
    for others, n in (([7, 3], 40), ([0, 0, 0], 30), ([12, 5, 1, 0], 60), ([250, 30], 500)):
        bound = pb_upper_bound(others, n, alpha)
        tails = [exact_tail_at_most(c, n, bound) for c in others]
        assert mpmath.fsum(tails) <= alpha, others
        tails = [exact_tail_at_most(c, n, bound * (1 - 1e-9)) for c in others]
        assert mpmath.fsum(tails) > alpha, others


# --- certificates ----------------------------------------------------------------------------


def random_counts(rng, num_classes, n):
    probs = rng.dirichlet(np.full(num_classes, 0.3))
    return rng.multinomial(n, probs)


def test_certify_radius_is_sigma_times_phi_inverse_of_pa_lower():
    rng = np.random.default_rng(4)
    for _ in range(50):
        estimation = random_counts(rng, 10, 10_000)
        selection = estimation // 100 + 1
        cert = certify_from_counts(selection, estimation, 0.5, 0.001, "certify")
        top = int(np.argmax(selection))
        pa = clopper_pearson_lower(estimation[top], 10_000, 0.001)
        if pa > 0.5:
            assert cert.label == top
            assert cert.radius == pytest.approx(0.5 * norm.ppf(pa), rel=1e-12)
            assert cert.pb_upper == pytest.approx(1 - pa)
        else:
            assert (cert.label, cert.radius) == (ABSTAIN, 0.0)


def test_tcertify_never_below_certify_and_equal_for_two_classes():
    rng = np.random.default_rng(5)
    improved = 0
    for num_classes in (2, 3, 10, 100):
        for _ in range(30):
            estimation = random_counts(rng, num_classes, 5_000)
            selection = rng.multinomial(100, (estimation + 1) / (estimation + 1).sum())
            base = certify_from_counts(selection, estimation, 1.0, 0.001, "certify")
            tight = certify_from_counts(selection, estimation, 1.0, 0.001, "tcertify")
            assert tight.radius >= base.radius
            if base.label != ABSTAIN:
                assert tight.label == base.label
            if num_classes == 2:
                assert tight == base
            improved += tight.radius > base.radius
    assert improved > 0  # the grid does find tighter radii on multi-class counts


def test_tcertify_reports_the_winning_alpha_prime():
    estimation = np.array([9_000, 30, 0, 0, 0, 0, 0, 0, 0, 970])
    selection = np.array([90, 0, 0, 0, 0, 0, 0, 0, 0, 10])
    cert = certify_from_counts(selection, estimation, 0.5, 0.001, "tcertify", grid=10)
    assert np.isclose(stats.alpha_grid(0.001, 10), cert.alpha_prime, rtol=1e-12).any()
    assert cert.alpha_prime < 0.001  # the union bound beats pB = 1 - pA here
    pa = clopper_pearson_lower(9_000, 10_000, cert.alpha_prime)
    assert cert.pa_lower == pytest.approx(pa)
    expected = 0.25 * (norm.ppf(cert.pa_lower) - norm.ppf(cert.pb_upper))
    assert cert.radius == pytest.approx(expected)


def test_strict_alpha_prime_never_depends_on_the_estimation_counts():
    rng = np.random.default_rng(7)
    selection = np.array([70, 25, 5])
    chosen = set()
    for _ in range(40):
        estimation = rng.multinomial(2_000, rng.dirichlet(np.ones(3)))
        chosen.add(certify_from_counts(selection, estimation, 0.5, 0.01, "tcertify-strict")
                   .alpha_prime)
    assert len(chosen) == 1
    # ... and it is the one the plug-in counts make T-CERTIFY pick (here not alpha itself).
    plug_in = certify_from_counts(selection, np.array([1400, 500, 100]), 0.5, 0.01, "tcertify")
    assert chosen == {plug_in.alpha_prime} and plug_in.alpha_prime < 0.01


@pytest.mark.parametrize("method", stats.METHODS)
def test_every_certificate_spends_at_most_alpha(method):
    """pA's tail at level alpha' plus the union tail of pB at alpha - alpha' is <= alpha."""
    rng = np.random.default_rng(8)
    alpha = 0.01
    for num_classes in (2, 3, 10):
        for _ in range(25):
            n = int(rng.integers(50, 5_000))
            estimation = random_counts(rng, num_classes, n)
            selection = rng.multinomial(50, (estimation + 1) / (estimation + 1).sum())
            cert = certify_from_counts(selection, estimation, 0.5, alpha, method)
            label = int(np.argmax(selection))
            k = int(estimation[label])
            assert cert.alpha_prime <= alpha
            if k > 0:
                assert binom.sf(k - 1, n, cert.pa_lower) <= cert.alpha_prime * REFERENCE_SLACK
            spent = cert.alpha_prime
            if cert.pb_upper < 1 - cert.pa_lower:  # the union bound was used: it spends the rest
                spent += union_tail(cert.pb_upper, np.delete(estimation, label), n)
            assert spent <= alpha * REFERENCE_SLACK, (cert, spent)


def test_the_grid_ends_at_alpha_exactly():
    for alpha in (0.001, 0.05, 0.3, 1e-7):
        for grid in (1, 3, 7, 10):
            assert stats.alpha_grid(alpha, grid)[-1] == alpha


def test_strict_mode_evaluates_one_alpha_prime_chosen_from_selection_counts():
    estimation = np.array([9_000, 30, 0, 0, 0, 0, 0, 0, 0, 970])
    selection = np.array([95, 0, 0, 0, 0, 0, 0, 0, 0, 5])
    strict = certify_from_counts(selection, estimation, 0.5, 0.001, "tcertify-strict")
    n = estimation.sum()
    plug_in = np.rint(n * selection / selection.sum())
    plug_cert = certify_from_counts(selection, plug_in, 0.5, 0.001, "tcertify")
    assert strict.alpha_prime == pytest.approx(plug_cert.alpha_prime)
    # The estimation counts change the radius but never the chosen alpha'.
    other = certify_from_counts(
        selection, estimation[[0, 1, 2, 3, 4, 5, 6, 7, 9, 8]], 0.5, 0.001, "tcertify-strict"
    )
    assert other.alpha_prime == strict.alpha_prime


def test_abstains_when_pa_lower_is_at_most_one_half():
    for method in stats.METHODS:
        cert = certify_from_counts([60, 40], [52, 48], 0.25, 0.001, method)
        assert cert.label == ABSTAIN and cert.radius == 0.0


def test_selection_picks_the_label_even_when_estimation_disagrees():
    cert = certify_from_counts([0, 10, 0], [1000, 0, 0], 0.5, 0.01, "certify")
    assert cert.label == ABSTAIN  # class 1 was selected; its estimation count is 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": 1e-101}, r"alpha must be a number in \[1e-100, 1\), got 1e-101"),
        ({"alpha": 5e-100, "method": "tcertify"}, r"alpha / grid .* >= 1e-100"),
        ({"alpha": 5e-100, "method": "tcertify-strict"}, r"alpha / grid .* >= 1e-100"),
        ({"grid": 0}, "grid"),
        ({"method": "fast"}, "method"),
        ({"selection_counts": [1]}, "selection_counts"),
        ({"estimation_counts": [-1, 3]}, "estimation_counts"),
        ({"estimation_counts": [0, 0]}, "estimation_counts"),
        ({"estimation_counts": [1, 2, 3]}, "one entry per class"),
    ],
)
def test_certify_from_counts_rejects_bad_input(kwargs, message):
    args = {"selection_counts": [5, 1], "estimation_counts": [90, 10], "sigma": 0.5, "alpha": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        certify_from_counts(**args)


# --- PREDICT -----------------------------------------------------------------------------------


def exact_two_sided_pvalue(k: int, n: int) -> float:
    """Against p = 1/2 the two-sided p-value is 2 P(X >= max(k, n - k)), capped at 1."""
    extreme = max(k, n - k)
    tail = Fraction(sum(comb(n, j) for j in range(extreme, n + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def test_binomial_test_pvalue_is_the_exact_two_sided_tail():
    cases = [(10, 12), (2, 12), (60, 100), (3, 3), (0, 7), (500, 1000), (530, 1000)]
    assert_matches_reference(stats.binomial_test_pvalue, exact_two_sided_pvalue, cases, rtol=1e-9)


def test_predict_from_counts():
    assert predict_from_counts([2, 90, 8], 0.001) == 1
    assert predict_from_counts([45, 55, 0], 0.05) == ABSTAIN
    with pytest.raises(ValueError, match="alpha"):
        predict_from_counts([1, 2], 2.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda a: stats.check_alpha(a),
        lambda a: predict_from_counts([1, 2], a),
        lambda a: clopper_pearson_lower(3, 10, a),
        lambda a: clopper_pearson_upper(3, 10, [0.01, a]),
        lambda a: pb_upper_bound([3, 1], 10, a),
    ],
)
def test_alpha_below_the_floor_is_refused(call):
    call(ALPHA_FLOOR)  # the floor itself is fine
    with pytest.raises(ValueError, match="1e-100"):
        call(ALPHA_FLOOR / 10)


# --- Monte-Carlo coverage with known class probabilities ---------------------------------------


def coverage_failures(probs, sigma, alpha, n0, n, runs, rng):
    """Failure counts per method: wrong label, or a radius above the true radius."""
    top, radius = true_radius(probs, sigma)
    failures = dict.fromkeys(stats.METHODS, 0)
    for _ in range(runs):
        selection = rng.multinomial(n0, probs)
        estimation = rng.multinomial(n, probs)
        for method in stats.METHODS:
            cert = certify_from_counts(selection, estimation, sigma, alpha, method)
            if cert.label != ABSTAIN and (cert.label != top or cert.radius > radius):
                failures[method] += 1
    return failures


@pytest.mark.slow  # the exact enumeration of test_coverage_exact.py covers this at small n
@pytest.mark.parametrize(
    "probs",
    [
        [0.8, 0.2],
        [0.62, 0.3, 0.08],
        [0.7, 0.1, 0.1, 0.05, 0.05],
        [0.9, 0.02, 0.02, 0.03, 0.03],
    ],
)
def test_certificates_fail_at_most_alpha(probs):
    rng = np.random.default_rng(6)
    alpha, runs = 0.1, 600
    failures = coverage_failures(np.array(probs), 0.5, alpha, n0=20, n=200, runs=runs, rng=rng)
    limit = alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    for method, count in failures.items():
        assert count / runs <= limit, (method, count / runs)
