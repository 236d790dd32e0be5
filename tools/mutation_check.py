"""Mutation check: plant known bugs in a copy of the source tree; the tests must catch each.

Each mutant is plain data: a name, a file, a text to replace (every occurrence; it must occur)
and its replacement, and the test files (or single tests, `file::test`) that must fail on it.
For each mutant the source and test trees are copied to a temporary folder, the text is
replaced there, and pytest runs the listed tests (fast ones only, stopping at the first
failure) against the copy. A mutant is
KILLED when a test fails, SURVIVED when all pass; the table names the first failing test.
Exit status 0 only when every mutant is killed.

    python tools/mutation_check.py            # all mutants
    python tools/mutation_check.py --only "eval mode not set"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATS = "src/smoothcert/stats.py"
SMOOTH = "src/smoothcert/smooth.py"
SAMPLING = "src/smoothcert/sampling.py"
SEQUENTIAL_SAMPLING = "src/smoothcert/sequential_sampling.py"
LATTICE = "src/smoothcert/lattice.py"
SOUND_TESTS = "tests/test_sound.py::"
RUNNER = "src/smoothcert/runner.py"
CONFIDENCE = "src/smoothcert/sequential/confidence.py"
RADII = "src/smoothcert/sequential/radii.py"
ADAPTIVE = "src/smoothcert/sequential/adaptive.py"
SCHEMA = "src/smoothcert/schema.py"
RECOMPUTE = "src/smoothcert/recompute.py"
STATS_TESTS = ("tests/test_stats.py", "tests/test_coverage_exact.py")
SEQUENTIAL_TESTS = ("tests/test_sequential.py",)
SMOOTH_TESTS = ("tests/test_smooth.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...] = STATS_TESTS


MUTANTS = [
    Mutant("alpha spent twice (pB at alpha, not alpha - alpha')", STATS,
           "rest = alpha - alpha_primes[split]", "rest = alpha + 0 * alpha_primes[split]"),
    Mutant("strict alpha' chosen from the estimation counts", STATS,
           "plug_in = np.rint(estimation.sum() * selection / selection.sum()).astype(np.int64)",
           "plug_in = estimation"),
    Mutant("Clopper-Pearson lower bound at 2 alpha", STATS,
           "def _cp_lower(k: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:\n",
           "def _cp_lower(k: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:\n"
           "    alpha = 2 * alpha\n"),
    Mutant("T-CERTIFY grid missing alpha' = alpha", STATS,
           "return alpha * (np.arange(1, grid + 1) / grid)",
           "return alpha * (np.arange(1, grid) / grid)"),
    Mutant("union bound ignores the unseen classes", STATS,
           "values, weights = np.unique(counts, return_counts=True)",
           "values, weights = np.unique(counts[counts > 0], return_counts=True)"),
    Mutant("bounds not checked against their tails (rounding left as is)", STATS,
           "    bad = violates(p)\n", "    bad = violates(p) & False\n"),
    Mutant("selection samples reused as estimation samples", SMOOTH,
           "estimation = self.sampler.counts(\n            x, n, batch_size,",
           "estimation = selection + self.sampler.counts(\n            x, n - n0, batch_size,",
           SMOOTH_TESTS),
    Mutant("n counted off by one batch", SAMPLING,
           "while remaining > 0:", "while remaining >= batch_size:", SMOOTH_TESTS),
    Mutant("noise not scaled by sigma", SAMPLING,
           "normal_(0.0, self.sigma, generator=generator)",
           "normal_(0.0, 1.0, generator=generator)", SMOOTH_TESTS),
    Mutant("eval mode not set", SAMPLING, "    model.eval()\n", "", SMOOTH_TESTS),
    Mutant("submodule modes not restored", SAMPLING,
           "            module.training = training\n", "            pass\n", SMOOTH_TESTS),
    Mutant("non-finite logits counted", SAMPLING,
           "if not bool(finite):", "if False:", SMOOTH_TESTS),
    Mutant("inputs outside [0, 1] accepted", SAMPLING,
           "if x_min < low or x_max > high:", "if False:", SMOOTH_TESTS),
    Mutant("estimation noise restarts the selection stream (runner)", RUNNER,
           "generator(cfg.seed, purpose, idx, self.ctx.device)",
           'generator(cfg.seed, "selection" if purpose == "estimation" else purpose, idx, '
           "self.ctx.device)", ("tests/test_rng.py",)),
    # Sequential and input-specific certification (docs/sequential.md).
    Mutant("a Bonferroni look spends alpha without correction", CONFIDENCE,
           "return alpha / len(self.looks)", "return alpha", SEQUENTIAL_TESTS),
    Mutant("Bonferroni certifies at alpha at every look (reaches)", CONFIDENCE,
           "(bdtrc(k - 1, n, t) <= self._level(n, alpha))", "(bdtrc(k - 1, n, t) <= alpha)",
           SEQUENTIAL_TESTS),
    Mutant("T-CERTIFY spends alpha on each of its two sequences", RADII,
           "self.levels = (sequence_alpha * share, sequence_alpha * (1.0 - share))",
           "self.levels = (sequence_alpha, sequence_alpha)", SEQUENTIAL_TESTS),
    Mutant("runner-up sequence at alpha, not its share alpha_b", RADII,
           "certified |= cs.union_below(others, n, s, alpha_b)",
           "certified |= cs.union_below(others, n, s, self.alpha)", SEQUENTIAL_TESTS),
    # The final look at max_n and the precision stopping rule (issue 26).
    Mutant("final look spends the whole alpha besides the sequence's share", RADII,
           "final_alpha = self.alpha * self.final_share", "final_alpha = self.alpha",
           SEQUENTIAL_TESTS),
    Mutant("sequence keeps the whole alpha beside the final look", RADII,
           "sequence_alpha = self.alpha * (1.0 - self.final_share)",
           "sequence_alpha = self.alpha", SEQUENTIAL_TESTS),
    Mutant("final look taken before max_n", RADII,
           "if n == self.max_n and self.final_share > 0:", "if self.final_share > 0:",
           SEQUENTIAL_TESTS),
    Mutant("precision stop certifies the undecided radii", RADII,
           "self._drop(self.status == UNDECIDED)", "self._certify(self.status == UNDECIDED)",
           SEQUENTIAL_TESTS),
    Mutant("precision compared strictly", RADII,
           "<= self.precision)", "< self.precision)", SEQUENTIAL_TESTS),
    Mutant("precision measured from the smallest certified radius", RADII,
           "undecided.max() - self.radii[self.certified].max()",
           "undecided.max() - self.radii[self.certified].min()", SEQUENTIAL_TESTS),
    Mutant("futility certifies what the optimistic projection reaches", RADII,
           "self._drop(~self.certifiable(self._projected_count(), self.max_n))",
           "self._certify(self.certifiable(self._projected_count(), self.max_n))",
           SEQUENTIAL_TESTS),
    Mutant("futility ignored (every remaining sample for the label)", RADII,
           "if self.futility is None or remaining == 0:", "if True:", SEQUENTIAL_TESTS),
    Mutant("futility projects at the lower bound, not the upper", RADII,
           "rate = float(stats.clopper_pearson_upper(self.count_a, self.n, self.futility))",
           "rate = float(stats.clopper_pearson_lower(self.count_a, self.n, self.futility))",
           SEQUENTIAL_TESTS),
    Mutant("verify ignores a radii file's final share", RECOMPUTE,
           "final_share=0.0 if sidecar.final_share is None else sidecar.final_share",
           "final_share=0.0", ("tests/test_results.py",)),
    Mutant("mixture union bound counts each count value once (unseen classes dropped)",
           CONFIDENCE, "total = (weights * np.exp(-log_m)).sum(axis=1)",
           "total = np.exp(-log_m).sum(axis=1)", SEQUENTIAL_TESTS),
    Mutant("mixture point mass at q = 1 kept after a failure", CONFIDENCE,
           "np.where(failures == 0, np.log(weights[2]), -np.inf)",
           "np.where(failures <= 1, np.log(weights[2]), -np.inf)", SEQUENTIAL_TESTS),
    Mutant("mixture bound sought beyond its decreasing region (k - 1) / n", CONFIDENCE,
           "inside = t <= (np.asarray(k) - 1) / n", "inside = t <= np.asarray(k) / n",
           SEQUENTIAL_TESTS),
    Mutant("mixture tested against 1/(2 alpha) (Ville's bound spent twice)", CONFIDENCE,
           "_log_mixture(t, k, n, self.weights) - np.log(1.0 / alpha)",
           "_log_mixture(t, k, n, self.weights) - np.log(0.5 / alpha)", SEQUENTIAL_TESTS),
    Mutant("radii certified by the upper bound instead of dropped", RADII,
           "self._drop(~self._possible())", "self._certify(self._possible())",
           SEQUENTIAL_TESTS),
    Mutant("input-specific n: radius loss averaged over the pilot interval", ADAPTIVE,
           "loss = (radius[:, -1:] - radius).max(axis=0)",
           "loss = (radius[:, -1:] - radius).mean(axis=0)", SEQUENTIAL_TESTS),
    Mutant("verify trusts a radii row's certificate without recomputing it", RECOMPUTE,
           "    if not at_look[top]:", "    if False:", ("tests/test_results.py",)),
    Mutant("verify ignores a row's run column", RECOMPUTE,
           'problems = [] if value["run"] == run else [', "problems = [] if True else [",
           ("tests/test_results.py",)),
    Mutant("mixture rounding margin with its sign flipped (rounding may certify)", CONFIDENCE,
           "return statistic - _rounding_bound(t, k, n)",
           "return statistic + _rounding_bound(t, k, n)", SEQUENTIAL_TESTS),
    Mutant("mixture union test's rounding margin with its sign flipped", CONFIDENCE,
           "total * np.exp(rounding) <= alpha", "total * np.exp(-rounding) <= alpha",
           SEQUENTIAL_TESTS),
    Mutant("PREDICT's binomial test at 2 alpha", STATS,
           "binomial_test_pvalue(n_a, n_a + n_b) <= alpha",
           "binomial_test_pvalue(n_a, n_a + n_b) <= 2 * alpha"),
    Mutant("union bound keyed on the smallest other count, not the largest", STATS,
           "values.max()", "values.min()"),
    Mutant("mixture union test's region keyed on the smallest other count", CONFIDENCE,
           "usable = (s >= (values.max() + 1) / n)", "usable = (s >= (values.min() + 1) / n)",
           SEQUENTIAL_TESTS),
    Mutant("parse_counts accepts a class listed twice", SCHEMA,
           "if c < 0 or v < 1 or c in counts:", "if c < 0 or v < 1:", ("tests/test_results.py",)),
    # The base classifier is untrusted input (issue 22).
    Mutant("model output rows not checked", SAMPLING,
           "if logits.dim() != 2 or len(logits) != batch or", "if logits.dim() != 2 or",
           SMOOTH_TESTS),
    Mutant("model output checked on the first batch only", SAMPLING,
           "                first = False\n                check_logits(logits, size, "
           "self.num_classes)\n",
           "                if first:\n                    check_logits(logits, size, "
           "self.num_classes)\n                first = False\n", SMOOTH_TESTS),
    Mutant("training regroups a wrong number of model output rows", "src/smoothcert/attacks.py",
           "return check_logits(model((x.unsqueeze(1) + noise).flatten(0, 1)), b * k)",
           "return (model((x.unsqueeze(1) + noise).flatten(0, 1)))", ("tests/test_objectives.py",)),
    Mutant("empty input accepted", SAMPLING, "if x.numel() == 0:", "if False:", SMOOTH_TESTS),
    Mutant("no upper limit on the number of samples", STATS,
           "or not 1 <= value <= MAX_SAMPLES:", "or not 1 <= value:",
           ("tests/test_cli_options.py",)),
    Mutant("n checked only after the selection samples are drawn", SMOOTH,
           'stats.check_sample_count(n, "n")  # before the n0', "None  # before the n0",
           SMOOTH_TESTS),
    Mutant("Bonferroni alpha too small for its looks found only after sampling", RADII,
           "        self._check_levels()\n", "", SMOOTH_TESTS),
    Mutant("adaptive n: alpha / grid checked only after sampling", SEQUENTIAL_SAMPLING,
           "stats.check_alpha_grid(alpha, grid)\n    stats.check_sample_count(max_n",
           "stats.check_alpha(alpha)\n    stats.check_sample_count(max_n", SMOOTH_TESTS),
    Mutant("sound noise one level off (thresholds at b + 3/2)", LATTICE,
           "_cdf_floor(2 * (i - self.half_width) + 1, self.sigma, bits)",
           "_cdf_floor(2 * (i - self.half_width) + 3, self.sigma, bits)",
           (SOUND_TESTS + "test_the_noise_is_the_rounded_gaussian_over_a_million_draws",)),
    Mutant("sound: the noisy lattice sum not clipped", LATTICE,
           "np.clip(sums, self.low, self.high)", "sums",
           (SOUND_TESTS + "test_the_noise_is_the_rounded_gaussian_over_a_million_draws",)),
    Mutant("sound: a word tied with a threshold decided by that word alone", LATTICE,
           "while left < right:  # F_left", "while False:  # F_left",
           (SOUND_TESTS + "test_resolve_gives_the_bin_of_the_whole_uniform",)),
    Mutant("sound: inputs off the lattice accepted", SAMPLING,
           'if self.mode == "exact":', "if False:",
           (SOUND_TESTS + "test_inputs_off_the_lattice_are_refused_unless_rounding_is_asked",)),
    Mutant("sound not part of the run fingerprint", "src/smoothcert/sidecar.py",
           "*USER_KEYS, *NOISE_KEYS,", "*USER_KEYS,",
           (SOUND_TESTS + "test_the_sidecar_records_sound_and_keeps_other_fingerprints",)),
    Mutant("the training log's 'noisy accuracy' computed on clean inputs",
           "src/smoothcert/evaluation.py",
           "score(model(noisy), x, y)", "score(model(x), x, y)", ("tests/test_train.py",)),
]


def check_applicable(mutant: Mutant, root: Path = ROOT) -> None:
    """ValueError unless the mutant's text occurs in its file (the code may have moved on)."""
    if mutant.old not in (root / mutant.file).read_text():
        raise ValueError(f"mutant {mutant.name!r}: its text no longer occurs in {mutant.file}")


def run_mutant(mutant: Mutant, root: Path = ROOT, first_failure: bool = True
               ) -> tuple[str, str, float]:
    """(KILLED / SURVIVED / ERROR, the first failing test or the error, seconds)."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="smoothcert-mutant-") as tmp:
        copy = Path(tmp)
        for part in ("src", "tests"):
            shutil.copytree(root / part, copy / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(root / "pyproject.toml", copy / "pyproject.toml")
        target = copy / mutant.file
        target.write_text(target.read_text().replace(mutant.old, mutant.new))
        env = dict(os.environ, PYTHONPATH=str(copy / "src"), OMP_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1")
        # The copy, not an installed smoothcert, must be the one the tests import.
        where = subprocess.run(
            [sys.executable, "-c", "import smoothcert; print(smoothcert.__file__)"],
            cwd=copy, env=env, capture_output=True, text=True,
        )
        if not where.stdout.startswith(str(copy)):
            return "ERROR", f"imports {where.stdout.strip() or where.stderr[-300:]}", 0.0
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
             *(["-x"] if first_failure else []), *mutant.tests],
            cwd=copy, env=env, capture_output=True, text=True,
        )
    seconds = time.time() - started
    if done.returncode == 0:
        return "SURVIVED", "", seconds
    failed = re.findall(r"^FAILED ([^\[\s]+)", done.stdout, re.MULTILINE)  # tests, no params
    if done.returncode == 1 and failed:
        return "KILLED", ", ".join(dict.fromkeys(failed)), seconds
    return "ERROR", (done.stdout + done.stderr)[-500:], seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only the mutant of this name")
    parser.add_argument("--all-failures", action="store_true",
                        help="run every listed test on each mutant and name all that fail")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(args.only):
        parser.error(f"unknown mutant among {args.only}")
    print("| mutant | file | result | caught by | seconds |")
    print("|---|---|---|---|---|")
    results = []
    for mutant in mutants:
        try:
            check_applicable(mutant)
            result, detail, seconds = run_mutant(mutant, first_failure=not args.all_failures)
        except ValueError as err:
            result, detail, seconds = "ERROR", str(err), 0.0
        results.append(result)
        print(f"| {mutant.name} | {Path(mutant.file).name} | {result} | {detail} | "
              f"{seconds:.0f} |", flush=True)
    killed = results.count("KILLED")
    print(f"\n{killed} of {len(results)} mutants killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
