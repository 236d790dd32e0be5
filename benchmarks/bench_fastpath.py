"""The CPU fast path step by step: allocator tuning, channels_last, bf16 autocast, threads
(issue item 5).

`mallopt` changes the whole process, so the script re-invokes itself: one child process with
glibc's default allocator settings, one after `smoothcert.perf.tune_allocator()`, alternated
(`--rounds` pairs). Inside each child every configuration is measured in interleaved
repetitions of `Smooth.predict` (noise, forward, argmax, on-device bincount: certification's
sampling loop) at a fixed batch size; the table reports median noisy samples per second.

Configurations (model and noise buffer laid out as each says):
- fp32       contiguous float32 (the naive baseline);
- cl         channels_last model, noise drawn in a channels_last buffer (rejected alternative;
             buffer);
- cl+cnoise  channels_last model, noise drawn in a contiguous buffer (the first convolution
             converts the layout);
- bf16, cl+bf16, cl+cnoise+bf16: the same under bf16 autocast.
"""

from __future__ import annotations

import math
import resource
import sys
from functools import partial

import torch
from _common import (
    ROOT,
    Table,
    emit,
    interleaved,
    machine_info,
    median,
    parse_args,
    run_json,
    setup,
)
from _loops import ALPHA, CLASSES, CONFIGS, LABELS, make_input, make_model, smooth_for

from smoothcert import Smooth

FULL = {
    "models": [("lenet", "mnist", 1000, 5000), ("cifar_resnet20", "cifar10", 1000, 2000),
               ("cifar_resnet110", "cifar10", 1000, 1000), ("resnet50", "imagenet", 50, 50)],
    "reps": 3,
    "rounds": 1,
    "thread_counts": [1, 2, 4],
}
QUICK = {
    "models": [("lenet", "mnist", 500, 1000), ("cifar_resnet20", "cifar10", 100, 200)],
    "reps": 1,
    "rounds": 1,
    "thread_counts": [1, 2],
}
VARIANTS = CONFIGS


def child(plan: dict, tuned: bool) -> list[Table]:
    """Runs inside one process: every variant of every model, interleaved."""
    table = Table("fastpath-raw", f"allocator tuned = {tuned}",
                  ["model", "batch", "samples", *VARIANTS])
    threads = Table("threads-raw", f"threads, allocator tuned = {tuned}",
                    ["model", "config", *[str(t) for t in plan["thread_counts"]]])
    faults_table = Table("faults-raw", f"page faults, allocator tuned = {tuned}",
                         ["model", "fp32 faults/batch", "fp32 kernel share",
                          "fast faults/batch", "fast kernel share"])
    default_threads = torch.get_num_threads()
    for name, dataset, batch, n in plan["models"]:
        x = make_input(dataset)
        models = {cl: make_model(name, dataset, cl) for cl in (False, True)}
        runs = {}
        for variant, (cl_model, cl_buffer, amp) in VARIANTS.items():
            smooth = smooth_for(models[cl_model], CLASSES[dataset], cl_buffer, amp)
            generator = torch.Generator().manual_seed(0)
            smooth.predict(x, batch, ALPHA, batch, generator=generator)  # warm-up

            runs[variant] = partial(smooth.predict, x, n, ALPHA, batch, generator=generator)
        times = interleaved(runs, plan["reps"])
        table.add(LABELS[name], batch, n, *[n / median(times[v]) for v in VARIANTS])
        row = [LABELS[name]]
        for variant in ("fp32", "cl+cnoise+bf16"):
            faults, kernel_share = page_faults(runs[variant])
            row += [faults / math.ceil(n / batch), kernel_share]
        faults_table.add(*row)
        if name in ("lenet", "cifar_resnet20") and tuned:
            smooth = Smooth(models[False], CLASSES[dataset], 0.25)

            def with_threads(count, smooth=smooth, x=x, n=n, batch=batch):
                torch.set_num_threads(count)
                smooth.predict(x, n, ALPHA, batch)

            variants = {str(t): partial(with_threads, t) for t in plan["thread_counts"]}
            for run in variants.values():
                run()
            times = interleaved(variants, plan["reps"])
            threads.add(LABELS[name], "fp32", *[n / median(times[v]) for v in variants])
            torch.set_num_threads(default_threads)
    return [table, faults_table, threads] if tuned else [table, faults_table]


def page_faults(run) -> tuple[float, float]:
    """Minor page faults of one call of `run`, and the share of its CPU time in the kernel."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    user = after.ru_utime - before.ru_utime
    return after.ru_minflt - before.ru_minflt, system / max(system + user, 1e-9)


def combine(plan: dict, results: dict[bool, list[dict]]) -> list[Table]:
    """Medians over rounds; the step-by-step table and its gains."""
    def cells(tuned: bool, key: str) -> dict[str, list[list]]:
        rows: dict[str, list[list]] = {}
        for payload in results[tuned]:
            for table in payload["tables"]:
                if table["key"] == key:
                    for row in table["rows"]:
                        rows.setdefault(row[0], []).append(row)
        return rows

    plain, tuned = cells(False, "fastpath-raw"), cells(True, "fastpath-raw")
    names = list(VARIANTS)
    steps = Table(
        "fastpath",
        "5. Fast path step by step: Smooth sampling throughput (noisy samples/s)",
        ["model", "batch", "naive fp32", "+allocator", "+channels_last", "+bf16",
         "total gain", "cl (shipped buffer)", "cl+bf16 (shipped buffer)", "bf16 only"],
    )
    for label in plain:
        batch = plain[label][0][1]

        def med(rows, variant):
            return median([row[3 + names.index(variant)] for row in rows])

        naive = med(plain[label], "fp32")
        alloc = med(tuned[label], "fp32")
        cl = med(tuned[label], "cl+cnoise")
        bf16 = med(tuned[label], "cl+cnoise+bf16")
        steps.add(label, batch, naive, alloc, cl, bf16, f"{bf16 / naive:.2f}x",
                  med(tuned[label], "cl"), med(tuned[label], "cl+bf16"), med(tuned[label], "bf16"))
    gains = Table(
        "fastpath-gains",
        "5b. Gain of each step (ratio to the previous column of table 5)",
        ["model", "allocator", "channels_last", "bf16", "all three",
         "shipped cl buffer / contiguous noise (fp32)", "(bf16)"],
    )
    for row in steps.rows:
        label, _, naive, alloc, cl, bf16 = row[:6]
        gains.add(label, f"{alloc / naive:.2f}x", f"{cl / alloc:.2f}x", f"{bf16 / cl:.2f}x",
                  f"{bf16 / naive:.2f}x", f"{row[7] / cl:.2f}x", f"{row[8] / bf16:.2f}x")
    full = Table("fastpath-all", "5c. Every configuration under both allocator settings "
                 "(noisy samples/s)", ["model", "allocator", *names])
    for label in plain:
        for setting, rows in (("glibc default", plain[label]), ("tuned", tuned[label])):
            full.add(label, setting, *[med_col(rows, 3 + i) for i in range(len(names))])
    faults = Table("faults", "5e. Why the allocator matters: minor page faults per batch and the "
                   "share of CPU time spent in the kernel (one call each)",
                   ["model", "allocator", "fp32 faults / batch", "fp32 kernel time",
                    "cl+bf16 faults / batch", "cl+bf16 kernel time"])
    for setting, tuned_flag in (("glibc default", False), ("tuned", True)):
        for label, rows in cells(tuned_flag, "faults-raw").items():
            faults.add(label, setting, med_col(rows, 1), f"{100 * med_col(rows, 2):.0f} %",
                       med_col(rows, 3), f"{100 * med_col(rows, 4):.0f} %")
    threads_rows = cells(True, "threads-raw")
    threads = Table("threads", "5d. Intra-op threads (fp32, allocator tuned; noisy samples/s)",
                    ["model", *[f"{t} threads" for t in plan["thread_counts"]]])
    for label, rows in threads_rows.items():
        threads.add(label, *[med_col(rows, 2 + i) for i in range(len(plan["thread_counts"]))])
    steps.notes.append(
        "naive = glibc default allocator, contiguous fp32; each later column adds one step: "
        "tune_allocator() (same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824), "
        "then a channels_last model with the noise drawn contiguous, then bf16 autocast."
    )
    steps.notes.append(
        "'shipped buffer' columns: ChannelsLastNoiseSmooth (the rejected alternative), noise "
        "drawn into a channels_last buffer, which torch fills with its slow serial normal_ "
        "path when C > 1."
    )
    steps.notes.append(
        f"medians of {plan['reps']} interleaved repetitions x {plan['rounds']} alternated "
        "process pairs."
    )
    return [steps, gains, full, faults, threads]


def med_col(rows: list[list], index: int) -> float:
    return median([row[index] for row in rows])


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--child", choices=["plain", "tuned"], help=argparse_hidden())

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    plan = QUICK if args.quick else FULL
    if args.child:
        settings = setup(args.threads, allocator=args.child == "tuned")
        emit(child(plan, args.child == "tuned"), args.json, settings)
        return []
    forwarded = ["--quick"] if args.quick else []
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    script = str(ROOT / "benchmarks" / "bench_fastpath.py")
    results: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(plan["rounds"]):
        for tuned in (False, True):
            print(f"-- child process, allocator tuned = {tuned}", flush=True)
            results[tuned].append(
                run_json([script, "--child", "tuned" if tuned else "plain", *forwarded])
            )
    tables = combine(plan, results)
    meta = {**machine_info(), "threads": results[True][0]["meta"].get("threads")}
    emit(tables, args.json, meta)
    return tables


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main(sys.argv[1:])
