"""Compiled against eager certification: the speed ratio and the n that pays for compiling.

`NoiseSampler.counts` with `compile=True` (torch.compile, inductor, freezing, static shapes)
against the same call eager, both on smoothcert's fast path (channels_last model, contiguous
noise buffer), in fp32 and under bf16 autocast. Each thread count runs in a process of its
own (inductor's generated code is specialised to the thread count it was compiled with);
within a process the two variants are timed interleaved on the same input and generator.

compile (s): the first compiled call (one full batch) minus one steady compiled batch, with an
empty inductor cache (each thread count's process gets its own): what a first run pays.
break-even n: the estimation samples over which compiling pays for itself, compile time /
(eager − compiled time per sample); "never" where compiled is not faster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from _common import (
    Table,
    emit,
    interleaved,
    machine_info,
    median,
    paired_ratio,
    parse_args,
    run_json,
    setup,
    spread,
)
from _loops import CLASSES, LABELS, SIGMA, make_input, make_model

from smoothcert.sampling import NoiseSampler

DATASETS = {"lenet": "mnist", "cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10"}
BATCH = {"lenet": 1000, "cifar_resnet20": 250, "cifar_resnet110": 100}
AMPS = {"fp32": None, "bf16": "bf16"}
COLUMNS = ["model", "threads", "dtype", "batch", "eager µs/sample", "compiled µs/sample",
           "compiled / eager speed", "±", "compile (s)", "break-even n"]


def measure(name: str, amp: str, threads: int, reps: int, seconds: float) -> list:
    """One row: eager and compiled sampling of `name` under `amp`, timed interleaved."""
    dataset, batch = DATASETS[name], BATCH[name]
    model = make_model(name, dataset, channels_last=True)
    x = make_input(dataset)
    eager = NoiseSampler(model, CLASSES[dataset], SIGMA, amp=AMPS[amp])
    compiled = NoiseSampler(model, CLASSES[dataset], SIGMA, amp=AMPS[amp], compile=True)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    compiled.counts(x, batch, batch, generator)
    first = time.perf_counter() - started
    if not compiled.compiled:
        return [LABELS[name], threads, amp, batch, "-", "compile failed", "-", "-", "-", "-"]
    started = time.perf_counter()
    eager.counts(x, batch, batch, generator)  # warm-up, and the size of a repetition
    one = time.perf_counter() - started
    n = batch * max(1, round(seconds / one))
    times = interleaved({"eager": lambda: eager.counts(x, n, batch, generator),
                         "compiled": lambda: compiled.counts(x, n, batch, generator)}, reps)
    per_eager, per_compiled = (median(times[k]) / n for k in ("eager", "compiled"))
    compile_s = first - per_compiled * batch
    gain = per_eager - per_compiled
    ratio = paired_ratio(times["eager"], times["compiled"])
    ratios = [a / b for a, b in zip(times["eager"], times["compiled"], strict=True)]
    break_even = f"{compile_s / gain:,.0f}" if gain > 0 else "never"
    return [LABELS[name], threads, amp, batch, per_eager * 1e6, per_compiled * 1e6,
            f"{ratio:.2f}x", f"{spread(ratios):.0%}", compile_s, break_even]


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--models", default="lenet,cifar_resnet20",
                            help="comma-separated, of " + ", ".join(DATASETS))
        parser.add_argument("--thread-counts", default="1,2", help="comma-separated")
        parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
        parser.add_argument("--reps", type=int, default=5)
        parser.add_argument("--seconds", type=float, default=2.0,
                            help="about how long one eager repetition runs")
        parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    reps, seconds = (2, 0.3) if args.quick else (args.reps, args.seconds)
    if args.child:  # one thread count, in this process
        settings = setup(args.threads)
        table = Table("compile", "", COLUMNS)
        for name in models:
            for amp in dtypes:
                table.add(*measure(name, amp, settings["threads"], reps, seconds))
        emit([table], args.json, {**machine_info(), **settings})
        return [table]
    table = Table("compile", "7. torch.compile (inductor, freezing, static shapes) against "
                  "eager, channels_last, interleaved", COLUMNS)
    meta = machine_info()
    for threads in args.thread_counts.split(","):
        child = [__file__, "--child", "--threads", threads, "--models", args.models,
                 "--dtypes", args.dtypes, "--reps", str(reps), "--seconds", str(seconds)]
        with tempfile.TemporaryDirectory() as cache:  # a cold compile, as a first run has
            payload = run_json(child, {"TORCHINDUCTOR_CACHE_DIR": cache}, clean_allocator=False)
        for row in payload["tables"][0]["rows"]:
            table.add(*row)
        meta.setdefault("load_average_by_threads", {})[threads] = payload["meta"]["load_average"]
    table.notes += [
        "speed: median of the per-repetition ratios eager time / compiled time (> 1: compiled "
        "is faster); ±: half their relative range.",
        "compile (s): the first compiled batch minus a steady one; break-even n: compile time "
        "/ per-sample saving, in samples (one CERTIFY at N = 100,000 is 100,100 samples).",
    ]
    emit([table], args.json, meta)
    return [table]


if __name__ == "__main__":
    main(sys.argv[1:])
