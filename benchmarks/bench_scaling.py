"""Scaling with n: certify time and peak memory for n = 10^3 ... 10^6 (issue item 3).

`Smooth.certify` at a fixed batch size; the time should grow linearly in n (constant time per
sample) and the memory should not grow at all: the loop holds one noise buffer of `batch`
inputs, the activations of one batch and a vector of class counts, whatever n is. Peak memory
is the process's peak resident set size during the call (VmHWM, reset before each call through
/proc/self/clear_refs) minus its resident size just before the call; the first call at each
batch size (oneDNN kernels, buffers) is a warm-up and is not reported.
"""

from __future__ import annotations

import sys
import time

import torch
from _common import Table, emit, machine_info, median, parse_args, reset_peak_rss, rss_bytes, setup
from _loops import ALPHA, CONFIGS, LABELS, make_config, make_input

N0 = 100
FULL = {
    "runs": [("lenet", "mnist", [10**3, 10**4, 10**5, 10**6]),
             ("cifar_resnet20", "cifar10", [10**3, 10**4, 10**5])],
    "batch": 1000, "config": "cl+cnoise+bf16", "min_seconds": 2.0,
}
QUICK = {"runs": [("lenet", "mnist", [10**3, 5 * 10**3])], "batch": 1000,
         "config": "cl+cnoise+bf16", "min_seconds": 0.2}
MIB = 2**20


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--config", choices=list(CONFIGS), help="default cl+cnoise+bf16")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    plan = dict(QUICK if args.quick else FULL)
    if args.config:
        plan["config"] = args.config
    settings = setup(args.threads)
    can_reset = reset_peak_rss()
    table = Table(
        "scaling",
        f"3. Certify time and peak memory against n (batch {plan['batch']}, "
        f"{plan['config']}, n0 = {N0})",
        ["model", "n", "time (s)", "µs / sample", "vs smallest n", "peak RSS − RSS before (MiB)",
         "RSS before (MiB)"],
    )
    batch = plan["batch"]
    for name, dataset, sizes in plan["runs"]:
        _, smooth = make_config(name, dataset, plan["config"])
        x = make_input(dataset)
        generator = torch.Generator().manual_seed(0)
        smooth.certify(x, N0, 2 * batch, ALPHA, batch, generator=generator)  # warm-up
        base = None
        for n in sizes:
            times, peaks, before = [], [], 0
            while not times or sum(times) < plan["min_seconds"]:
                before = rss_bytes()[0]
                reset_peak_rss()
                started = time.perf_counter()
                smooth.certify(x, N0, n, ALPHA, batch, generator=generator)
                times.append(time.perf_counter() - started)
                peaks.append(rss_bytes()[1] - before)
            seconds = median(times)
            per_sample = seconds / (N0 + n) * 1e6
            base = base or per_sample
            table.add(LABELS[name], f"{n:,}", seconds, per_sample, f"{per_sample / base:.2f}x",
                      max(peaks) / MIB, before / MIB)
    table.notes.append(
        "time: median over repeated calls (at least "
        f"{plan['min_seconds']} s of calls per row); 'vs smallest n': time per sample relative "
        "to the first row of the model (1.00x = linear in n)."
    )
    if not can_reset:
        table.notes.append("could not reset VmHWM here: peak columns are the process peak")
    emit([table], args.json, {**machine_info(), **settings})
    return [table]


if __name__ == "__main__":
    main(sys.argv[1:])
