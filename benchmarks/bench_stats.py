"""Cost of the certificate's statistics against the sampling they summarise (issue item 2).

Per image: the time of `stats.certify_from_counts` for CERTIFY, T-CERTIFY (grid 10) and
strict T-CERTIFY, on counts of n = 10^5 estimation and n0 = 100 selection samples, for 10 and
1000 classes, divided by the time to draw those n0 + n samples through the model the class
count belongs to (LeNet on MNIST, ResNet-50 on 224² ImageNet inputs). The sampling time is
extrapolated from the measured sampling throughput of `Smooth.predict` (a full 10^5-sample run
of ResNet-50 would take minutes); the fastest of the measured configurations is used, which
gives the largest (most pessimistic) fraction. Target: < 1 %.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np
from _common import Table, emit, interleaved, machine_info, median, parse_args, setup
from _loops import ALPHA, LABELS, SIGMA, make_config, make_input

from smoothcert import stats

N0, N = 100, 100_000
GRID = 10
FULL = {"reps": 15, "throughput": {"lenet": (1000, 10_000), "resnet50": (50, 100)},
        "configs": ["fp32", "cl+cnoise+bf16"]}
QUICK = {"reps": 3, "throughput": {"lenet": (1000, 2000), "resnet50": (8, 8)},
         "configs": ["fp32"]}
MODELS = {10: ("lenet", "mnist"), 1000: ("resnet50", "imagenet")}


def scenario_counts(classes: int, kind: str, rng: np.random.Generator):
    """Selection and estimation counts drawn from a class distribution of the given kind."""
    if kind == "confident":
        p = np.zeros(classes)
        others = min(classes - 1, 20)
        p[0] = 0.9
        p[1 : 1 + others] = rng.dirichlet(np.ones(others)) * 0.1
    else:  # "spread": a contested top class and mass on every other class (many distinct counts)
        p = np.empty(classes)
        p[0] = 0.45
        p[1:] = rng.dirichlet(np.full(classes - 1, 0.5)) * 0.55
    return rng.multinomial(N0, p), rng.multinomial(N, p)


def sampling_rate(name: str, dataset: str, config: str, batch: int, n: int, reps: int) -> float:
    _, smooth = make_config(name, dataset, config)
    x = make_input(dataset)
    smooth.predict(x, batch, ALPHA, batch)  # warm-up
    times = interleaved({"s": lambda: smooth.predict(x, n, ALPHA, batch)}, max(1, reps // 5))
    return n / median(times["s"])


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2g} %"


def main(argv=None) -> list[Table]:
    args = parse_args(__doc__.splitlines()[0], argv)
    plan = QUICK if args.quick else FULL
    settings = setup(args.threads)
    rates = Table("stats-sampling", "2a. Sampling throughput used for the sampling time",
                  ["model", "config", "batch", "samples/s", f"time for n0+n = {N0 + N:,} (s)"])
    fastest: dict[int, float] = {}
    for classes, (name, dataset) in MODELS.items():
        batch, n = plan["throughput"][name]
        for config in plan["configs"]:
            rate = sampling_rate(name, dataset, config, batch, n, plan["reps"])
            fastest[classes] = max(fastest.get(classes, 0.0), rate)
            rates.add(LABELS[name], config, batch, rate, (N0 + N) / rate)
    table = Table(
        "stats",
        f"2. Bound computation per image (n = {N:,}, n0 = {N0}, grid {GRID}) as a fraction of "
        "the sampling time",
        ["classes", "counts", "method", "bounds (ms)", "sampling (s)", "fraction"],
    )
    rng = np.random.default_rng(0)
    for classes in MODELS:
        sampling = (N0 + N) / fastest[classes]
        for kind in ("confident", "spread"):
            selection, estimation = scenario_counts(classes, kind, rng)
            distinct = len(np.unique(np.delete(estimation, int(np.argmax(selection)))))
            runs = {
                method: partial(stats.certify_from_counts, selection, estimation, SIGMA, ALPHA,
                                method, GRID)
                for method in stats.METHODS
            }
            for run in runs.values():
                run()
            times = interleaved(runs, plan["reps"])
            total = 0.0
            for method in stats.METHODS:
                seconds = median(times[method])
                total += seconds
                table.add(classes, f"{kind} ({distinct} distinct)", method, seconds * 1e3,
                          sampling, percent(seconds / sampling))
            table.add(classes, f"{kind} ({distinct} distinct)", "all three (certify_all)",
                      total * 1e3, sampling, percent(total / sampling))
    table.notes.append(
        "counts: 'confident' = top class 0.9, the rest on 20 classes; 'spread' = top class "
        "0.45, the rest Dirichlet(0.5) over every other class (the union bound's worst case: "
        "many distinct counts). Sampling time from the fastest configuration of table 2a."
    )
    emit([rates, table], args.json, {**machine_info(), **settings})
    return [rates, table]


if __name__ == "__main__":
    main(sys.argv[1:])
