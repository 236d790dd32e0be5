"""Where the time of `Smooth.certify` goes: torch.profiler's operators by self CPU time.

The evidence behind the discussion of the certify/raw target in docs/benchmarks.md: what is
left between the sampling loop and the raw forward loop is the noise draw (aten::normal_),
which torch runs on one thread.

    python benchmarks/profile_certify.py --model lenet --config cl+cnoise+bf16
"""

from __future__ import annotations

import sys

import torch
from _common import Table, emit, machine_info, parse_args, setup
from _loops import ALPHA, CONFIGS, LABELS, make_config, make_input
from torch.profiler import ProfilerActivity, profile

DATASETS = {"lenet": "mnist", "cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10",
            "resnet50": "imagenet"}


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--model", default="lenet", choices=list(DATASETS))
        parser.add_argument("--config", default="cl+cnoise+bf16", choices=list(CONFIGS))
        parser.add_argument("--batch", type=int, default=1000)
        parser.add_argument("--n", type=int, default=None, help="default 10 batches")
        parser.add_argument("--top", type=int, default=12)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    settings = setup(args.threads)
    dataset = DATASETS[args.model]
    _, smooth = make_config(args.model, dataset, args.config)
    x = make_input(dataset)
    n = args.n or (2 if args.quick else 10) * args.batch
    generator = torch.Generator().manual_seed(0)
    smooth.certify(x, 100, args.batch, ALPHA, args.batch, generator=generator)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        smooth.certify(x, 100, n, ALPHA, args.batch, generator=generator)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    table = Table(
        f"profile-{args.model}-{args.config}",
        f"Profile of Smooth.certify: {LABELS[args.model]}, {args.config}, batch {args.batch}, "
        f"n = {n:,} (self CPU time by operator)",
        ["operator", "calls", "self CPU (ms)", "share"],
    )
    for event in events[: args.top]:
        table.add(event.key, event.count, event.self_cpu_time_total / 1e3,
                  f"{100 * event.self_cpu_time_total / total:.1f} %")
    emit([table], args.json, {**machine_info(), **settings})
    return [table]


if __name__ == "__main__":
    main(sys.argv[1:])
