"""Certify throughput against the physical limit and against the reference loop (issue item 1).

For each model and batch size, three loops over the same n0 + n noisy samples and the same
batches, measured alternately in one process:

- raw:       `model(x + noise)` with the noise drawn beforehand: the base model's own
             inference throughput, the limit of any certification loop;
- raw+noise: `model(buffer.normal_(0, sigma).add_(x))`: the limit of a loop that must draw
             its noise (torch's CPU normal_ runs on one thread, about 3.4 ns per value here);
- certify:   `Smooth.certify` (noise drawn per batch, argmax, on-device bincount, bounds);
- reference: the loop of the original randomized-smoothing code (x.repeat, randn_like,
             argmax, counts in numpy on the host), followed by the same bound computation.

Reported: noisy samples per second (medians) and the medians of the per-repetition ratios;
raw/ref is the ceiling of certify/ref (a loop cannot beat the raw forward pass). Targets:
certify/raw >= 0.95, certify/reference >= 1.1. The full run repeats one batch size per model
in a child process left with glibc's default allocator (table 1b).
"""

from __future__ import annotations

import sys
import time
from functools import partial

import torch
from _common import (
    ROOT,
    Table,
    emit,
    interleaved,
    machine_info,
    median,
    paired_ratio,
    parse_args,
    run_json,
    setup,
)
from _loops import (
    ALPHA,
    CLASSES,
    CONFIGS,
    LABELS,
    fixed_noise,
    make_config,
    make_input,
    raw_loop,
    raw_noise_loop,
    reference_certify,
)

N0 = 100
FULL = {
    "models": [("lenet", "mnist", [100, 200, 500, 1000, 2000]),
               ("cifar_resnet20", "cifar10", [100, 200, 500, 1000, 2000]),
               ("cifar_resnet110", "cifar10", [100, 500, 2000])],
    "configs": ["fp32", "cl+cnoise+bf16"],
    "target_s": 0.3,
    "reps": 3,
}
# Table 1b: the same loops in a process with glibc's default allocator settings (the setting
# the original code ran in), one batch size per model.
DEFAULT_ALLOCATOR = {
    "models": [("lenet", "mnist", [1000]), ("cifar_resnet20", "cifar10", [1000])],
    "configs": ["fp32"],
    "target_s": 0.3,
    "reps": 3,
}
QUICK = {
    "models": [("lenet", "mnist", [100, 1000]), ("cifar_resnet20", "cifar10", [100])],
    "configs": ["fp32"],
    "target_s": 0.1,
    "reps": 2,
}


def bench_model(table: Table, name: str, dataset: str, config: str, batches, target_s, reps):
    _, buffer_cl, amp = CONFIGS[config]
    model, smooth = make_config(name, dataset, config)
    x = make_input(dataset)
    classes = CLASSES[dataset]
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        noise = fixed_noise(x, batch, buffer_cl)
        buffer = torch.empty_like(noise)
        # Warm-up at this batch size (oneDNN builds its kernels per input shape; every variant
        # feeds the model the same shapes and layouts), which also calibrates n.
        raw_loop(model, x, noise, [N0], batch, amp)
        started = time.perf_counter()
        raw_loop(model, x, noise, [batch], batch, amp)
        rate = batch / (time.perf_counter() - started)
        n = max(batch, round(rate * target_s / batch) * batch)
        times = interleaved(
            {
                "raw": partial(raw_loop, model, x, noise, [N0, n], batch, amp),
                "raw+noise": partial(raw_noise_loop, model, x, buffer, [N0, n], batch, amp,
                                     generator),
                "certify": partial(smooth.certify, x, N0, n, ALPHA, batch, generator=generator),
                "reference": partial(reference_certify, model, x, N0, n, batch, classes, amp),
            },
            reps,
        )
        total = N0 + n
        table.add(
            LABELS[name], config, batch, total,
            total / median(times["raw"]),
            total / median(times["raw+noise"]),
            total / median(times["certify"]),
            total / median(times["reference"]),
            paired_ratio(times["raw"], times["certify"]),
            paired_ratio(times["raw+noise"], times["certify"]),
            paired_ratio(times["reference"], times["certify"]),
            paired_ratio(times["reference"], times["raw"]),
        )


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--configs", help="comma-separated subset of " + ",".join(CONFIGS))
        parser.add_argument("--batches", help="comma-separated batch sizes")
        parser.add_argument("--default-allocator", action="store_true",
                            help="leave glibc's allocator untuned (run in a child by default)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    plan = dict(QUICK if args.quick else FULL)
    if args.default_allocator:
        plan = dict(DEFAULT_ALLOCATOR if not args.quick else QUICK)
    if args.configs:
        plan["configs"] = args.configs.split(",")
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
        plan["models"] = [(name, dataset, batches) for name, dataset, _ in plan["models"]]
    settings = setup(args.threads, allocator=not args.default_allocator)
    table = Table(
        "certify-default-allocator" if args.default_allocator else "certify",
        "1b. The same with glibc's default allocator settings (samples/s)"
        if args.default_allocator else
        "1. Certify throughput vs the raw forward loop and the reference loop (samples/s)",
        ["model", "config", "batch", "samples", "raw", "raw+noise", "certify", "reference",
         "certify/raw", "certify/(raw+noise)", "certify/ref", "raw/ref"],
    )
    table.notes.append(
        f"n0 = {N0}; n chosen so one loop takes about {plan['target_s']} s; median of "
        f"{plan['reps']} interleaved repetitions; ratios are medians of per-repetition ratios."
    )
    table.notes.append(
        f"process: allocator tuned = {settings['allocator_tuned']}, threads = "
        f"{settings['threads']}. Configs: fp32 = contiguous float32; cl = channels_last model "
        "and a channels_last noise buffer; cl+cnoise = channels_last model, contiguous noise "
        "buffer; +bf16 = under bf16 autocast (the raw and reference loops run in the same "
        "layout and precision)."
    )
    for config in plan["configs"]:
        for name, dataset, batches in plan["models"]:
            bench_model(table, name, dataset, config, batches, plan["target_s"], plan["reps"])
    tables = [table]
    if not (args.default_allocator or args.quick or args.configs or args.batches):
        child = run_json([str(ROOT / "benchmarks" / "bench_certify.py"), "--default-allocator",
                          *(["--threads", str(args.threads)] if args.threads else [])])
        tables += [Table.from_dict(t) for t in child["tables"]]
    meta = {**machine_info(), **settings}
    emit(tables, args.json, meta)
    return tables


if __name__ == "__main__":
    main(sys.argv[1:])
