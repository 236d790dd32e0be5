"""Sound sampling on the 8-bit lattice against ordinary sampling, per noisy sample (issue 28).

Two workloads, each measured in interleaved repetitions of the two samplers in the same
process, on a lattice input x = a/255:
- noise: the noisy copies alone (`GaussianNoise.fill`: torch's float32 normal_ plus one add;
  `LatticeNoise.fill`: 63-bit words, the guide table, the input table), batch 1000;
- counts: `NoiseSampler.counts` with a model (noise, forward, argmax, bincount: certification's
  sampling loop), channels_last as the runner runs it.
The ratio is the median over repetitions of sound time / ordinary time (paired). A last table
gives the one-time cost of a sigma's tables (mpmath thresholds, cached per process).
"""

from __future__ import annotations

import time
from functools import partial

import torch
from _common import Table, emit, interleaved, machine_info, median, paired_ratio, parse_args
from _common import setup as setup_process
from _common import spread as relative_spread
from _loops import CLASSES, LABELS, SHAPES, SIGMA, make_model

from smoothcert.lattice import LatticeGaussian
from smoothcert.sampling import GaussianNoise, LatticeNoise, NoiseSampler

FULL = {"noise": [("mnist", 1000, 30), ("cifar10", 1000, 30)],
        "counts": [("lenet", "mnist", 1000, 5000, 7), ("cifar_resnet20", "cifar10", 500, 1000, 5)],
        "sigmas": [0.25, 0.5, 1.0]}
QUICK = {"noise": [("mnist", 200, 5)], "counts": [("lenet", "mnist", 200, 400, 3)],
         "sigmas": [0.25]}


def lattice_input(dataset: str) -> torch.Tensor:
    levels = torch.randint(0, 256, SHAPES[dataset], generator=torch.Generator().manual_seed(0))
    return levels / 255.0


def per_sample(times: dict[str, list[float]], samples: int) -> list[float]:
    """µs per sample of each sampler, the paired ratio sound / ordinary and its spread."""
    ratios = [a / b for a, b in zip(times["sound"], times["ordinary"], strict=True)]
    return [1e6 * median(times["ordinary"]) / samples, 1e6 * median(times["sound"]) / samples,
            paired_ratio(times["sound"], times["ordinary"]), relative_spread(ratios)]


def noise_table(plan: dict) -> Table:
    table = Table("sound-noise", "Noisy copies alone: µs per sample (one copy of the image)",
                  ["input", "batch", "ordinary", "sound", "sound / ordinary", "±"])
    for dataset, batch, reps in plan["noise"]:
        x = lattice_input(dataset)
        out = torch.empty((batch, *x.shape))
        samplers = {"ordinary": GaussianNoise(SIGMA), "sound": LatticeNoise(SIGMA, "exact")}
        prepared = {name: s.prepare(x) for name, s in samplers.items()}
        generator = torch.Generator().manual_seed(0)
        times = interleaved({name: partial(s.fill, out, prepared[name], generator)
                             for name, s in samplers.items()}, reps)
        table.add(f"{dataset} {tuple(x.shape)}", batch, *per_sample(times, batch))
    return table


def counts_table(plan: dict) -> Table:
    table = Table("sound-counts", "NoiseSampler.counts with a model: µs per sample",
                  ["model", "batch", "n", "ordinary", "sound", "sound / ordinary", "±"])
    for name, dataset, batch, n, reps in plan["counts"]:
        model = make_model(name, dataset, channels_last=True)
        x = lattice_input(dataset)
        samplers = {sound: NoiseSampler(model, CLASSES[dataset], SIGMA, sound=sound)
                    for sound in (None, "exact")}
        generator = torch.Generator().manual_seed(0)
        samplers[None].counts(x, batch, batch, generator)  # warm-up: oneDNN's first pass
        times = interleaved({("sound" if s else "ordinary"): partial(
            samplers[s].counts, x, n, batch, generator) for s in samplers}, reps)
        table.add(LABELS[name], batch, n, *per_sample(times, n))
    return table


def build_table(plan: dict) -> Table:
    table = Table("sound-build", "One-time cost of a sigma's tables (exact mpmath thresholds)",
                  ["sigma", "bins", "seconds"])
    for sigma in plan["sigmas"]:
        started = time.perf_counter()
        dist = LatticeGaussian(sigma)
        table.add(sigma, dist.bins, time.perf_counter() - started)
    return table


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    settings = setup_process(args.threads)
    plan = QUICK if args.quick else FULL
    tables = [noise_table(plan), counts_table(plan), build_table(plan)]
    emit(tables, args.json, {**machine_info(), **settings})


if __name__ == "__main__":
    main()
