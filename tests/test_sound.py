"""Sound sampling on the 8-bit lattice (issue 28, Voráček & Hein): the noise's exact
distribution, the classifier's input as a function of the lattice point, lattice refusal,
coverage against the discretised smoothed classifier's exact radius, the CLI and the sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from conftest import InputRecorder, ThresholdClassifier
from scipy.stats import chisquare, norm
from test_cli import cli

from smoothcert import Smooth
from smoothcert.lattice import LEVELS, LatticeGaussian, check_sound, lattice_gaussian
from smoothcert.results import check_file
from smoothcert.runner import RunConfig, run
from smoothcert.sampling import LatticeNoise
from smoothcert.sidecar import Sidecar
from smoothcert.verify import paper_mode_level


def lattice_inputs(noise: LatticeNoise, a: int, count: int, seed: int) -> np.ndarray:
    """The levels s = 255 z of `count` inputs the classifier gets at the one-pixel point a/255."""
    points = noise.prepare(torch.tensor([[[a / LEVELS]]], dtype=torch.float32))
    out = noise.fill(torch.empty(count, 1, 1, 1), points, torch.Generator().manual_seed(seed))
    levels = torch.round(out.double() * LEVELS)
    assert torch.equal((levels / LEVELS).float(), out)  # every input is some fl32(s/255)
    return levels.long().flatten().numpy()


def clipped_probabilities(dist: LatticeGaussian, a: int) -> dict[int, float]:
    """Exact P(clip(a + b) = s), from the distribution's bin probabilities."""
    sums = np.clip(a + np.arange(-dist.half_width, dist.half_width + 1), dist.low, dist.high)
    found: dict[int, float] = {}
    for s, p in zip(sums.tolist(), dist.probabilities(), strict=True):
        found[s] = found.get(s, 0.0) + p
    return found


def chi_square_pvalue(levels: np.ndarray, expected: dict[int, float]) -> float:
    """Goodness of fit of the drawn levels; cells expecting < 5 draws are pooled."""
    seen = dict(zip(*np.unique(levels, return_counts=True), strict=True))
    assert set(seen) <= set(expected)
    total = len(levels)
    big = [s for s, p in expected.items() if p * total >= 5]
    observed = [seen.get(s, 0) for s in big]
    wanted = [expected[s] * total for s in big]
    rest = total - sum(observed)
    if rest or total - sum(wanted) > 1e-9 * total:
        observed.append(rest)
        wanted.append(total - sum(wanted))
    return float(chisquare(observed, np.array(wanted) * total / sum(wanted)).pvalue)


@pytest.mark.parametrize("sigma, a", [(0.25, 3), (0.5, 128), (1.0, 250)])
def test_the_noise_is_the_rounded_gaussian_over_a_million_draws(sigma, a):
    noise = LatticeNoise(sigma, "exact")
    levels = lattice_inputs(noise, a, 10**6, seed=1)
    assert chi_square_pvalue(levels, clipped_probabilities(noise.distribution, a)) > 1e-3
    # the probabilities themselves: Phi((b + 1/2)/(255 sigma)) - Phi((b - 1/2)/(255 sigma))
    p = noise.distribution.probabilities()
    b = np.arange(-noise.distribution.half_width, noise.distribution.half_width + 1)
    inner = slice(1, -1)
    upper, lower = (np.abs(b[inner]) + 0.5) / (LEVELS * sigma), \
        (np.abs(b[inner]) - 0.5) / (LEVELS * sigma)
    np.testing.assert_allclose(p[inner], norm.sf(lower) - norm.sf(upper), rtol=1e-9)  # symmetric
    assert p.sum() == pytest.approx(1.0, abs=1e-15)


def test_draws_tied_with_a_threshold_are_decided_exactly_by_further_words(monkeypatch):
    # 10-bit words: a word equals a threshold's floor often, so further words decide it.
    dist = LatticeGaussian(0.25, word_bits=10)
    noise = LatticeNoise(0.25, "exact", word_bits=10)
    assert noise.distribution.word_bits == 10
    resolved = []
    resolve = LatticeGaussian.resolve

    def counting(self, word, draw_word):
        resolved.append(word)
        return resolve(self, word, draw_word)

    monkeypatch.setattr(LatticeGaussian, "resolve", counting)
    levels = lattice_inputs(noise, 128, 50_000, seed=2)
    assert len(resolved) > 1000
    assert chi_square_pvalue(levels, clipped_probabilities(dist, 128)) > 1e-3


def test_resolve_gives_the_bin_of_the_whole_uniform():
    dist = LatticeGaussian(0.25, word_bits=8)
    rng = np.random.default_rng(0)
    with mpmath.workprec(400):
        cdf = [mpmath.ncdf(mpmath.mpf(2 * (i - dist.half_width) + 1) / (2 * LEVELS * 0.25))
               for i in range(2 * dist.half_width)]
    for _ in range(300):
        words = [int(w) for w in rng.integers(0, 256, size=40)]
        first, rest = words[0], iter(words[1:])
        got = dist.resolve(first, lambda rest=rest: next(rest))
        with mpmath.workprec(400):
            u = sum(mpmath.ldexp(w, -8 * (j + 1)) for j, w in enumerate(words))
            assert got == sum(f <= u for f in cdf)


def test_thresholds_are_exact_floors_and_mirror_each_other():
    dist = lattice_gaussian(0.5)
    bits, top = dist.word_bits, 2 * dist.half_width - 1
    for i in (0, 7, dist.half_width - 3, dist.half_width, top - 2, top):
        with mpmath.workprec(400):
            value = mpmath.ldexp(mpmath.ncdf(mpmath.mpf(2 * (i - dist.half_width) + 1)
                                             / (2 * LEVELS * 0.5)), bits)
            assert int(dist.thresholds[i]) == int(mpmath.floor(value))
        assert dist.floor(i, bits) + dist.floor(top - i, bits) == (1 << bits) - 1
    assert np.all(np.diff(dist.thresholds) >= 0)
    # the guide's bins agree with a binary search wherever it gives one
    words = np.random.default_rng(1).integers(0, 2**63, size=100_000, dtype=np.int64)
    guided = dist.guide[words >> (bits - dist.guide_bits)]
    sure = guided >= 0
    assert sure.mean() > 0.95
    np.testing.assert_array_equal(guided[sure], np.searchsorted(dist.thresholds, words[sure]))


def test_the_paper_clip_is_k_sigma_wide_and_covers_the_table():
    for sigma, k in ((0.12, 1), (0.25, 1), (0.5, 3), (1.0, 6)):
        dist = lattice_gaussian(sigma)
        assert (dist.k, dist.low, dist.high) == (k, -LEVELS * k, LEVELS * (k + 1))
        # offsets beyond +-B clip to the same input for every a in 0..255
        assert 0 + dist.half_width >= dist.high and LEVELS - dist.half_width <= dist.low


def recorded_inputs(sound, x: torch.Tensor, n: int = 400, seed: int = 0) -> torch.Tensor:
    recorder = InputRecorder(ThresholdClassifier([0.5]))
    smooth = Smooth(recorder, 2, 0.25, sound=sound)
    smooth.predict(x, n, 0.01, n, generator=torch.Generator().manual_seed(seed))
    return torch.cat(recorder.batches)


def test_the_sound_input_is_a_function_of_the_lattice_point_alone():
    a = torch.tensor([[[3, 128, 250]]])
    inputs = recorded_inputs(True, a / 255.0)
    levels = torch.round(inputs.double() * LEVELS)
    # one float per lattice point: fl32(s/255) of the integer s
    assert torch.equal(inputs, (levels / LEVELS).float())
    # the same draws at the neighbouring lattice point: every unclipped input moves one level
    moved = torch.round(recorded_inputs(True, (a + 1) / 255.0).double() * LEVELS)
    dist = lattice_gaussian(0.25)
    inside = (levels > dist.low) & (levels < dist.high)
    assert torch.equal((moved - levels)[inside], torch.ones(int(inside.sum()), dtype=torch.float64))


class LowBitVoter(torch.nn.Module):
    """A malicious base classifier: votes the last mantissa bit of its first input value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bit = x.reshape(len(x), -1)[:, 0].contiguous().view(torch.int32) & 1
        return torch.nn.functional.one_hot(bit.long(), 2).float()


def low_bit_votes_per_lattice_point(sound) -> dict[int, list[int]]:
    """The low-bit voter's votes on 20,000 noisy copies of 100/255, by the lattice point each
    copy is nearest to."""
    recorder = InputRecorder(LowBitVoter())
    Smooth(recorder, 2, 0.25, sound=sound).predict(
        torch.tensor([[[100 / 255.0]]]), 20_000, 0.01, 20_000,
        generator=torch.Generator().manual_seed(3))
    inputs = torch.cat(recorder.batches).flatten()
    votes = LowBitVoter()(inputs[:, None]).argmax(dim=1)
    cells: dict[int, list[int]] = {}
    for level, vote in zip(torch.round(inputs.double() * LEVELS).long().tolist(),
                           votes.tolist(), strict=True):
        cells.setdefault(level, []).append(vote)
    return cells


def test_a_low_bit_reader_sees_more_than_the_lattice_point_only_under_ordinary_sampling():
    # Ordinary sampling: copies nearest to the same lattice point reach the classifier as
    # different floats, and a classifier reading their low bits votes both ways on one point.
    ordinary = low_bit_votes_per_lattice_point(None)
    crowded = [v for v in ordinary.values() if len(v) >= 20]
    # (not all: copies near 0 are exact float sums x + delta on the coarser grid of x and
    # delta, whose low bits are 0; GridReader below turns that into an attack)
    assert len(crowded) > 50 and sum(len(set(v)) == 2 for v in crowded) > 0.7 * len(crowded)
    # Sound sampling: one float per lattice point, so one vote per lattice point: the smoothed
    # classifier is a Gaussian smoothing of a function of the rounded point (statistics.md).
    sound = low_bit_votes_per_lattice_point(True)
    assert len(sound) > 50 and all(len(set(v)) == 1 for v in sound.values())


class GridReader(torch.nn.Module):
    """A malicious base classifier: class 1 if an input value near 0 (in (-0.002, 0.0009]) is
    not a multiple of 2^-25, else class 0.

    Under ordinary sampling at x0 = 64/255 (in [1/4, 1/2), so a multiple of 2^-25) a value near
    0 is x0 + delta with delta in [-1/2, -1/4), also a multiple of 2^-25, and the float sum is
    exact (Sterbenz): never class 1. At x' = 63/255 (an odd multiple of 2^-26), 1/255 lower,
    such a value has delta in (-1/4, -1/8), a multiple of 2^-26 only: class 1 half the time,
    and over 3072 pixels almost surely."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(len(x), -1)
        fine = ((z > -0.002) & (z <= 0.0009) & (torch.frac(z * 2.0**25) != 0)).any(dim=1)
        return torch.nn.functional.one_hot(fine.long(), 2).float()


def test_a_float_rounding_attack_breaks_an_ordinary_certificate_but_not_a_sound_one():
    x0, x1 = torch.full((3, 32, 32), 64 / 255.0), torch.full((3, 32, 32), 63 / 255.0)
    distance = float((x0 - x1).norm())  # sqrt(3072)/255 = 0.217: both on the lattice
    for sound, at_x1 in ((None, 1), (True, 0)):
        smooth = Smooth(GridReader(), 2, 0.25, sound=sound)
        label, radius = smooth.certify(x0, 100, 1000, 0.001, 500,
                                       generator=torch.Generator().manual_seed(0))
        assert label == 0 and radius > 2.5 * distance  # every vote at x0 is class 0
        # PREDICT at x1 (wrong with probability <= 0.001): ordinary sampling's smoothed
        # classifier says 1 inside the certified ball, a false certificate; the sound one says 0
        assert smooth.predict(x1, 1000, 0.001, 500,
                              generator=torch.Generator().manual_seed(1)) == at_x1


@pytest.mark.parametrize("x", [0.5, float(np.nextafter(np.float32(3 / 255), np.float32(1)))])
def test_inputs_off_the_lattice_are_refused_unless_rounding_is_asked(x):
    smooth = Smooth(ThresholdClassifier([0.5]), 2, 0.25, sound=True)
    with pytest.raises(ValueError, match=r"x: sound sampling takes inputs on the 8-bit lattice"
                       r".*sound='round' \(--sound round\)"):
        smooth.predict(torch.tensor([[[x]]]), 10, 0.01, 10)
    rounded = Smooth(ThresholdClassifier([0.5]), 2, 0.25, sound="round")
    nearest = torch.tensor([[[round(x * 255) / 255.0]]])
    for point in (torch.tensor([[[x]]]), nearest):
        assert rounded.certify(point, 10, 100, 0.01, 100,
                               generator=torch.Generator().manual_seed(0)) == \
            rounded.certify(nearest, 10, 100, 0.01, 100, generator=torch.Generator().manual_seed(0))


def test_lattice_points_in_float64_are_accepted():
    smooth = Smooth(ThresholdClassifier([0.5]), 2, 0.25, sound=True)
    x = torch.arange(256, dtype=torch.float64).reshape(1, 16, 16) / 255
    assert smooth.predict(x, 10, 0.01, 10) in (0, 1, Smooth.ABSTAIN)


def test_bad_sound_settings_are_refused_naming_the_argument():
    assert [check_sound(v) for v in (None, False, True, "exact", "round")] == \
        [None, None, "exact", "exact", "round"]
    with pytest.raises(ValueError, match="sound must be False, True, or one of exact, round"):
        Smooth(ThresholdClassifier([0.5]), 2, 0.25, sound="yes")
    with pytest.raises(ValueError, match=r"input_range must be \(0, 1\) with sound sampling"):
        Smooth(ThresholdClassifier([0.5]), 2, 0.25, sound=True, input_range=None)


# ---------------------------------------------------------------- coverage


def discrete_smoothed_labels(dist: LatticeGaussian, cut: int) -> np.ndarray:
    """g(a') for every lattice point a' of the threshold classifier z > (cut + 1/2)/255: class 1
    where P(a' + b >= cut + 1) > 1/2 under the rounded Gaussian (exact)."""
    p = dist.probabilities()
    tail = np.cumsum(p[::-1])[::-1]  # tail[j] = P(bin >= j)
    return np.array([int(tail[cut + 1 - a + dist.half_width] > 0.5) for a in range(256)])


def exact_radius(labels: np.ndarray, a: int, label: int) -> float:
    """The distance from a/255 to the nearest lattice point the smoothed classifier does not
    label `label` (0 for a wrong label: any positive radius is wrong)."""
    other = np.flatnonzero(labels != label)
    return float(np.min(np.abs(other - a)) / LEVELS) if other.size else np.inf


def test_certificates_of_a_threshold_classifier_exceed_the_exact_radius_at_most_alpha():
    """Monte-Carlo coverage: CERTIFY and strict T-CERTIFY wrong at most alpha, paper-mode
    T-CERTIFY at most its level, against the exact radius of the discretised smoothed
    classifier on the lattice (not the continuous one's)."""
    sigma, cut, alpha, trials = 0.25, 127, 0.1, 240
    dist = lattice_gaussian(sigma)
    labels = discrete_smoothed_labels(dist, cut)
    smooth = Smooth(ThresholdClassifier([(cut + 0.5) / LEVELS]), 2, sigma, sound=True)
    points = [0, 40, 90, 160, 200, 255]  # pA from about 0.7 to 0.98
    wrong = {"certify": 0, "tcertify": 0, "strict": 0}
    near = 0
    for trial in range(trials):
        a = points[trial % len(points)]
        result = smooth.certify_all(torch.tensor([[[a / 255.0]]]), 20, 200, alpha, 220,
                                    generator=torch.Generator().manual_seed(trial))
        for name in wrong:
            cert = getattr(result, name)
            if cert.radius > 0 and cert.radius > exact_radius(labels, a, cert.label):
                wrong[name] += 1
        near += result.certify.radius > 0.5 * exact_radius(labels, a, result.certify.label)
    slack = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert wrong["certify"] / trials <= alpha + slack
    assert wrong["strict"] / trials <= alpha + slack
    assert wrong["tcertify"] / trials <= paper_mode_level(alpha, 10) + slack
    assert near > 0.2 * trials  # the certificates are close to the exact radius: a real test


# ---------------------------------------------------------------- runner, CLI, sidecar


def test_the_sidecar_records_sound_and_keeps_other_fingerprints():
    plain = Sidecar.build({}, mode="certify", sigma=0.5, n=100)
    sound = Sidecar.build({}, mode="certify", sigma=0.5, n=100, sound="exact")
    assert "sound" not in plain.to_json() and sound.to_json()["sound"] == "exact"
    assert plain.run == Sidecar.build({}, mode="certify", sigma=0.5, n=100, sound=None).run
    assert sound.run != plain.run
    assert sound.differences(plain) == ["sound (was 'exact', now None)"]


def test_certify_sound_through_the_cli_is_verified_and_never_mixed(trained_checkpoint,
                                                                    tmp_path, capsys):
    out = tmp_path / "sound.tsv"
    common = [str(trained_checkpoint), "--out", str(out), "--n0", "10", "--N", "100",
              "--batch", "100", "--max-examples", "2", "--device", "cpu"]
    code, _, err = cli(capsys, "certify", *common, "--sound")
    assert code == 0, err
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["sound"] == "exact"
    code, _, err = cli(capsys, "verify", str(out))
    assert code == 0, err
    assert "every certificate matches" in err and "sound sampling (exact)" in err
    # resuming without --sound, or with rounding, is another run: refused, naming the setting
    for other in ([], ["--sound", "round"]):
        code, _, err = cli(capsys, "certify", *common, "--max-examples", "3", *other)
        assert code != 0 and "sound (was 'exact'" in err
    # a sidecar edited to claim ordinary sampling no longer matches its rows' fingerprint
    sidecar.pop("sound")
    Path(f"{out}.json").write_text(json.dumps(sidecar))
    assert check_file(out).problems


def test_sound_predict_radii_and_adaptive_runs_verify(trained_checkpoint, tmp_path):
    common = dict(checkpoint=str(trained_checkpoint), n0=10, n=100, batch=50, max=2,
                  device="cpu", sound=True)
    for name, options in (("predict", {"mode": "predict"}),
                          ("radii", {"radii": (0.1, 0.25), "max_n": 100}),
                          ("adaptive", {"adaptive_n": True, "max_n": 200})):
        out = run(RunConfig(out=str(tmp_path / f"{name}.tsv"), **common, **options),
                  progress=False)
        assert json.loads(Path(f"{out}.json").read_text())["sound"] == "exact"
        if name != "predict":
            report = check_file(out)
            assert not report.problems and report.rows == 2
