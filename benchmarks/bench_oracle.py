"""Sequential certification at radii against an oracle that knows p_A (issue 26).

The oracle knows p_A. For each input it takes the radius r* that fixed n = 100,000 CERTIFY
certifies with probability >= 1/2 (the largest grid radius with P(CP_alpha(K, 10^5) >=
Phi(r/sigma)) >= 1/2, K ~ Bin(10^5, p_A); none: the oracle draws nothing) and draws the
smallest n at which Clopper-Pearson at alpha certifies r* with probability >= 1/2. Both are
exact binomial sums, no simulation.

The sequential procedure (sequential.RadiiProcedure, CERTIFY, mixture, the Table-1 radii
below the n = 10^5 ceiling, max_n = 10^5, batch 1000) runs on simulated count streams
K_n ~ Bin(n, p_A), one per path, the same seeds for every variant (paired). p_A is each test
point's estimate count_a / n in a real model's result file: MNIST Basic sigma = 0.5
(experiments/results/mnist_table1/basic_s0.5.tsv, n = 10^4, 500 points) and the CIFAR-10
subset's ResNet-20 sigma = 0.25 (experiments/results/cifar_subset/basic.tsv, n = 2,000).

Printed, per model and variant: estimation samples per input (mean over inputs of the mean
over paths), the oracle's, their ratio (sequential / oracle, measured in this run), and how
often the procedure certifies r* (against fixed n's own rate on the same p_A). A separate
table gives P(certify r*) at p_A = 0.999, sigma = 0.5, for every variant and fixed n.
The variants: the issue-16 procedure (no final look, no futility), final looks without the
futility rule, futility levels with the default final look (the defaults: final share
FINAL_SHARE, futility FUTILITY), a stated precision, and max_n = 2 x 10^5.

    python benchmarks/bench_oracle.py                # defaults: 8 paths per input
    python benchmarks/bench_oracle.py --quick        # smoke run

The confidence sequence's decisions are tabulated (`Tabulated`): at each look, for each
threshold, the smallest count its test accepts (a bisection on its own `reaches`, which is
monotone in the count); the procedure itself runs unchanged. A check at the start replays
paths with and without the table and counts disagreements (printed; expected 0).
"""

from __future__ import annotations

import csv
import sys

import numpy as np
from _common import ROOT, Table, emit, machine_info, parse_args
from scipy.special import bdtrc, ndtr, ndtri

from smoothcert.sequential import FINAL_SHARE, FUTILITY, TABLE1_RADII, RadiiProcedure

FIXED_N = 100_000
RESULTS = {  # name -> (result file, sigma)
    "MNIST Basic σ=0.5": ("experiments/results/mnist_table1/basic_s0.5.tsv", 0.5),
    "CIFAR-10 subset ResNet-20 σ=0.25": ("experiments/results/cifar_subset/basic.tsv", 0.25),
}


def variants(args) -> dict[str, dict]:
    """name -> RadiiProcedure options (max_n: FIXED_N unless given)."""
    found = {"issue 16 (no final look, no futility)": dict(final_share=0.0, futility=None)}
    for share in sorted({*args.shares, FINAL_SHARE}):
        found[f"final share {share:g}, no futility"] = dict(final_share=share, futility=None)
    for level in sorted({*args.futilities, FUTILITY}):
        found[f"futility {level:g}" + (" (default)" if level == FUTILITY else "")] = dict(
            futility=level)
    for precision in args.precisions:
        found[f"default, precision {precision:g}"] = dict(precision=precision)
    longer = 2 * FIXED_N
    for level in sorted({*args.ceiling_futilities, FUTILITY}):
        found[f"max_n {longer:,}, futility {level:g}"] = dict(max_n=longer, futility=level)
    for precision in args.precisions:
        found[f"default, max_n {longer:,}, precision {precision:g}"] = dict(
            max_n=longer, precision=precision)
    return found


def extra_arguments(parser) -> None:
    parser.add_argument("--paths", type=int, default=8, help="simulated paths per input")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--precisions", type=float, nargs="*", default=[0.25])
    parser.add_argument("--shares", type=float, nargs="*", default=[0.25, 0.5],
                        help="final shares to compare, without futility")
    parser.add_argument("--futilities", type=float, nargs="*", default=[0.01, 0.02, 0.1],
                        help="futility levels to compare (choosing the default)")
    parser.add_argument("--ceiling-futilities", type=float, nargs="*", default=[0.01],
                        help="futility levels to compare at max_n = 2 x 10^5")
    parser.add_argument("--ceiling-paths", type=int, default=400,
                        help="paths at p_A = 0.999, sigma = 0.5")
    parser.add_argument("--seed", type=int, default=0)


class Tabulated:
    """A confidence sequence whose `reaches` is looked up: per (n, alpha, thresholds), the
    smallest count each threshold's test accepts, found once by bisection on the wrapped
    sequence's own `reaches` (monotone in the count)."""

    def __init__(self, cs, cache: dict):
        self.cs, self.cache = cs, cache

    def __getattr__(self, name):
        return getattr(self.cs, name)

    def reaches(self, k, n: int, t, alpha: float) -> np.ndarray:
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        key = (self.cs.name, self.cs.max_n, n, alpha, t.tobytes())
        if key not in self.cache:
            low, high = np.zeros(t.shape, np.int64), np.full(t.shape, n + 1, np.int64)
            while np.any(low < high):  # smallest k in [0, n + 1] accepted (n + 1: none)
                middle = (low + high) // 2
                accepted = self.cs.reaches(np.minimum(middle, n), n, t, alpha) & (middle <= n)
                low, high = np.where(accepted, low, middle + 1), np.where(accepted, middle, high)
            self.cache[key] = low
        return np.asarray(k) >= self.cache[key]


def run_path(options: dict, radii, sigma: float, pa: float, rng, args, cache) -> RadiiProcedure:
    options = {"max_n": FIXED_N, **options}
    procedure = RadiiProcedure(radii, sigma, args.alpha, batch_size=args.batch, **options)
    if cache is not None:
        procedure.cs = Tabulated(procedure.cs, cache)
        procedure.final = Tabulated(procedure.final, cache)
    count = 0
    while (size := procedure.next_batch()) > 0:
        count += rng.binomial(size, pa)
        procedure.update(count, procedure.n + size)
    return procedure


def certify_probability(pa: float, n: np.ndarray, threshold: float, alpha: float) -> np.ndarray:
    """P(CP_alpha(K, n) >= threshold), K ~ Bin(n, pa): K must reach the smallest count whose
    Clopper-Pearson bound clears the threshold, i.e. with P(Bin(n, threshold) >= k) <= alpha."""
    n = np.asarray(n, dtype=np.int64)
    low, high = np.zeros(n.shape, np.int64), n + 1
    while np.any(low < high):
        middle = (low + high) // 2
        accepted = (middle >= 1) & (middle <= n) & (
            bdtrc(np.maximum(middle - 1, 0), n, threshold) <= alpha)
        low, high = np.where(accepted, low, middle + 1), np.where(accepted, middle, high)
    return np.where(low <= n, bdtrc(np.maximum(low - 1, 0), n, pa), 0.0)


def half_certifies(pa: float, n: np.ndarray, threshold: float, alpha: float) -> np.ndarray:
    """P(CP_alpha(K, n) >= threshold) >= 1/2, K ~ Bin(n, pa): the largest k with
    P(K >= k) >= 1/2 (floor or ceil of n pa, a median) must clear the threshold."""
    n = np.asarray(n, dtype=np.int64)
    up = np.minimum(np.ceil(n * pa), n).astype(np.int64)
    k = np.where(bdtrc(np.maximum(up - 1, 0), n, pa) >= 0.5, up, np.floor(n * pa))
    return (k >= 1) & (bdtrc(np.maximum(k - 1, 0), n, threshold) <= alpha)


def oracle(pa: float, radii: np.ndarray, sigma: float, alpha: float) -> tuple[int, int]:
    """(index of r* in radii, or -1; the oracle's estimation samples)."""
    thresholds = ndtr(radii / sigma)
    good = np.flatnonzero([half_certifies(pa, np.array([FIXED_N]), t, alpha)[0]
                           for t in thresholds])
    if good.size == 0:
        return -1, 0
    target, start, size = int(good.max()), 1, 1024
    while True:  # in growing blocks, so that the cost follows the answer
        n = np.arange(start, min(start + size, FIXED_N + 1))
        ok = half_certifies(pa, n, thresholds[target], alpha)
        if ok.any():
            return target, int(n[np.argmax(ok)])
        start, size = start + size, 2 * size


def read_pa(path: str) -> np.ndarray:
    with open(ROOT / path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return np.array([int(r["count_a"]) / int(r["n"]) for r in rows])


def ceiling_radii(sigma: float, alpha: float) -> np.ndarray:
    return TABLE1_RADII[TABLE1_RADII <= sigma * ndtri(alpha ** (1.0 / FIXED_N))]


def check_table(args, cache) -> int:
    """Disagreements between tabulated and direct decisions on a few paths."""
    radii, wrong = ceiling_radii(0.5, args.alpha), 0
    for options in variants(args).values():
        for pa in (0.999, 0.99, 0.9, 0.6):
            direct = run_path(options, radii, 0.5, pa, np.random.default_rng(1), args, None)
            table = run_path(options, radii, 0.5, pa, np.random.default_rng(1), args, cache)
            wrong += (direct.n != table.n) or not np.array_equal(direct.status, table.status)
    return wrong


def run_model(name: str, args, table: Table, cache) -> None:
    path, sigma = RESULTS[name]
    pas = read_pa(path)
    radii = ceiling_radii(sigma, args.alpha)
    values, weights = np.unique(pas, return_counts=True)
    targets, oracle_n = zip(*(oracle(p, radii, sigma, args.alpha) for p in values), strict=True)
    targets, oracle_n = np.array(targets), np.array(oracle_n, dtype=float)
    fixed_rate = np.array([certify_probability(p, np.array([FIXED_N]),
                                               ndtr(radii[t] / sigma), args.alpha)[0]
                           if t >= 0 else 1.0 for p, t in zip(values, targets, strict=True)])
    samples = {v: np.zeros(values.size) for v in variants(args)}
    hits = {v: np.zeros(values.size) for v in variants(args)}
    for i, pa in enumerate(values):  # the variants interleaved, on the same seeds
        for v, options in variants(args).items():
            rng = np.random.default_rng([args.seed, i])
            for _ in range(args.paths):
                procedure = run_path(options, radii, sigma, pa, rng, args, cache)
                samples[v][i] += procedure.n / args.paths
                hits[v][i] += (targets[i] < 0 or procedure.certified[targets[i]]) / args.paths
    mean_oracle = float((weights * oracle_n).sum() / weights.sum())
    fixed_hit = float((weights * fixed_rate).sum() / weights.sum())
    for v in variants(args):
        mean = float((weights * samples[v]).sum() / weights.sum())
        hit = float((weights * hits[v]).sum() / weights.sum())
        table.add(name, v, mean, mean_oracle, mean / mean_oracle, f"{hit:.3f} / {fixed_hit:.3f}")
    table.notes.append(f"{name}: {len(pas)} points ({values.size} distinct p_A), radii "
                       f"{radii.tolist()}, {args.paths} paths per p_A")


def ceiling(args, cache) -> Table:
    sigma, pa = 0.5, 0.999
    radii = ceiling_radii(sigma, args.alpha)
    target, n_oracle = oracle(pa, radii, sigma, args.alpha)
    fixed = certify_probability(pa, np.array([FIXED_N]), ndtr(radii[target] / sigma),
                                args.alpha)[0]
    table = Table("ceiling", f"P(certify r* = {radii[target]}) at p_A = {pa}, σ = {sigma} "
                  f"(the fixed-n radius; fixed n = {FIXED_N:,}: {fixed:.3f}, exact; oracle "
                  f"n = {n_oracle:,})", ["variant", "P(certify r*)", "± SE", "mean samples"])
    for v, options in variants(args).items():
        rng = np.random.default_rng([args.seed, 999])
        runs = [run_path(options, radii, sigma, pa, rng, args, cache)
                for _ in range(args.ceiling_paths)]
        hit = np.mean([p.certified[target] for p in runs])
        table.add(v, float(hit), float(np.sqrt(hit * (1 - hit) / len(runs))),
                  float(np.mean([p.n for p in runs])))
    table.notes.append(f"{args.ceiling_paths} simulated paths per variant, the same seeds")
    return table


def main(argv=None) -> list[Table]:
    args = parse_args(__doc__.splitlines()[0], argv, extra_arguments)
    if args.quick:
        args.paths, args.ceiling_paths = 2, 50
    cache: dict = {}
    wrong = check_table(args, cache)
    print(f"tabulated vs direct decisions: {wrong} disagreeing paths", flush=True)
    table = Table("oracle", "Estimation samples per input: sequential against the oracle "
                  f"(α = {args.alpha}, max_n = {FIXED_N:,}, CERTIFY, mixture)",
                  ["model", "variant", "sequential", "oracle", "ratio (seq/oracle)",
                   "P(certify r*): seq / fixed n"])
    for name in RESULTS:
        run_model(name, args, table, cache)
    table.notes.append(f"tabulated vs direct decisions: {wrong} disagreeing paths")
    tables = [table, ceiling(args, cache)]
    emit(tables, args.json, {**machine_info(), "args": vars(args) | {"json": str(args.json)}})
    return tables


if __name__ == "__main__":
    main(sys.argv[1:])
