"""Processes × threads: certification throughput of the whole machine (`certify --procs`).

P worker processes with T torch threads each sample the same LeNet workload at once, as the
ranks of `certify --procs P` do (the ranks share no work while certifying: each certifies
its own examples). The workers start once, import torch and warm up outside the timing; for
each repetition the main process starts the participating workers at one instant, and the
throughput is all their samples over the span from the first start to the last finish. The
combinations are timed interleaved (rotating order), each against the first (1 × 1).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

from _common import Table, emit, machine_info, median, parse_args, spread

COMBOS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)
BATCH = 1000


def worker(commands, replies, config: str, compile_: bool) -> None:
    """Runs sampling commands: ("prepare", threads) warms up, ("run", n, start_at) times."""
    import torch
    from _loops import CLASSES, CONFIGS, SIGMA, make_input, make_model

    from smoothcert import perf
    from smoothcert.sampling import NoiseSampler

    perf.tune_allocator()
    channels_last, _, amp = CONFIGS[config]
    model = make_model("lenet", "mnist", channels_last)
    x = make_input("mnist")
    generator = torch.Generator().manual_seed(0)
    samplers: dict[int, NoiseSampler] = {}  # by thread count: a compiled graph is specialised
    threads = 1
    while (command := commands.get())[0] != "stop":
        if command[0] == "prepare":
            threads = command[1]
            torch.set_num_threads(threads)
            if threads not in samplers:
                samplers[threads] = NoiseSampler(model, CLASSES["mnist"], SIGMA, amp=amp,
                                                 compile=compile_)
            samplers[threads].counts(x, BATCH, BATCH, generator)
            replies.put("ready")
        else:
            _, n, start_at = command
            time.sleep(max(0.0, start_at - time.time()))
            started = time.time()
            samplers[threads].counts(x, n, BATCH, generator)
            replies.put((started, time.time()))


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--config", default="cl+cnoise", help="a _loops.CONFIGS name "
                            "(default cl+cnoise: smoothcert's fp32 path)")
        parser.add_argument("--compile", action="store_true", help="compiled workers")
        parser.add_argument("--samples", type=int, default=20_000,
                            help="samples per process and repetition")
        parser.add_argument("--reps", type=int, default=5)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    samples, reps = (2_000, 2) if args.quick else (args.samples, args.reps)
    context = mp.get_context("spawn")
    workers = []
    for _ in range(max(p for p, _ in COMBOS)):
        commands, replies = context.Queue(), context.Queue()
        process = context.Process(target=worker,
                                  args=(commands, replies, args.config, args.compile))
        process.start()
        workers.append((process, commands, replies))
    rates: dict[tuple[int, int], list[float]] = {combo: [] for combo in COMBOS}
    try:
        for rep in range(reps):
            shift = rep % len(COMBOS)
            for procs, threads in COMBOS[shift:] + COMBOS[:shift]:
                active = workers[:procs]
                for _, commands, _ in active:
                    commands.put(("prepare", threads))
                for _, _, replies in active:
                    replies.get()
                start_at = time.time() + 0.2
                for _, commands, _ in active:
                    commands.put(("run", samples, start_at))
                spans = [replies.get() for _, _, replies in active]
                wall = max(end for _, end in spans) - min(start for start, _ in spans)
                rates[(procs, threads)].append(procs * samples / wall)
    finally:
        for process, commands, _ in workers:
            commands.put(("stop",))
            process.join()
    what = f"{args.config}{', compiled' if args.compile else ''}"
    table = Table("procs", f"8. Processes × threads, LeNet ({what}, batch {BATCH}), "
                  "interleaved", ["processes × threads", "samples / s (all processes)", "±",
                                  "vs 1 × 1"])
    base = rates[COMBOS[0]]
    for combo in COMBOS:
        ratio = median([a / b for a, b in zip(rates[combo], base, strict=True)])
        table.add(f"{combo[0]} × {combo[1]}", median(rates[combo]), f"{spread(rates[combo]):.0%}",
                  f"{ratio:.2f}x")
    table.notes.append(f"{samples:,} samples per process and repetition, {reps} repetitions; "
                       "'vs 1 × 1': median of the per-repetition throughput ratios.")
    emit([table], args.json, machine_info())
    return [table]


if __name__ == "__main__":
    main(sys.argv[1:])
