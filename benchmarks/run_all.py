"""Run every benchmark, each in a fresh process, and print (or write) all tables.

    python benchmarks/run_all.py                 # full run, about 15-20 minutes on 2 cores
    python benchmarks/run_all.py --quick         # smoke run, under 2 minutes
    python benchmarks/run_all.py --write-docs    # also replace the tables in docs/benchmarks.md

`--write-docs` rewrites only the part of the document between the markers
<!-- BEGIN GENERATED TABLES --> and <!-- END GENERATED TABLES -->; the discussion around it is
written by hand.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import ROOT, Table, load_average, run_json

SCRIPTS = ["bench_certify", "bench_stats", "bench_scaling", "bench_train", "bench_fastpath"]
BEGIN, END = "<!-- BEGIN GENERATED TABLES -->", "<!-- END GENERATED TABLES -->"
QUICK_NOTE = " (--quick: smoke sizes, not for quoting)"
DOC = ROOT / "docs" / "benchmarks.md"


def machine_section(meta: dict, loads: list[tuple[str, str, str, float]], quick: bool,
                    seconds: float) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in meta.get("flags", {}).items())
    lines = [
        f"Measured {meta.get('date', '?')}{QUICK_NOTE if quick else ''} by "
        f"`python benchmarks/run_all.py{' --quick' if quick else ''}` in {seconds / 60:.1f} min.",
        "",
        f"- CPU: {meta.get('cpu')} ({meta.get('physical_cores')} physical cores, "
        f"{meta.get('logical_cpus')} logical CPUs); {flags}",
        f"- torch {meta.get('torch')} (oneDNN {'on' if meta.get('mkldnn') else 'off'}), "
        f"{meta.get('threads')} intra-op threads; numpy {meta.get('numpy')}, scipy "
        f"{meta.get('scipy')}, Python {meta.get('python')}, glibc {meta.get('glibc')}",
        f"- allocator tuned (smoothcert.perf.tune_allocator) in every script but the "
        f"'glibc default' measurements of table 5: {meta.get('allocator_tuned')}",
        "- load average (1 / 5 / 15 min) before and after each script (its run time):",
    ]
    lines += [f"  - {name}: {before} -> {after} ({seconds:.0f} s)"
              for name, before, after, seconds in loads]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark and collect the tables.")
    parser.add_argument("--quick", action="store_true", help="smoke run, tiny sizes")
    parser.add_argument("--write-docs", nargs="?", const=DOC, type=Path, default=None,
                        metavar="PATH", help=f"write the tables into PATH (default {DOC})")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(SCRIPTS))
    parser.add_argument("--threads", type=int, help="torch threads for every script")
    args = parser.parse_args(argv)
    scripts = args.only.split(",") if args.only else SCRIPTS
    started = time.time()
    tables: list[Table] = []
    meta: dict = {}
    loads = []
    for name in scripts:
        print(f"\n##### {name}  (load average {load_average()})", flush=True)
        before, script_started = load_average(), time.time()
        extra = (["--quick"] if args.quick else []) + (
            ["--threads", str(args.threads)] if args.threads else [])
        payload = run_json([str(ROOT / "benchmarks" / f"{name}.py"), *extra])
        loads.append((name, before, load_average(), time.time() - script_started))
        meta = {**payload["meta"], **meta} if meta else dict(payload["meta"])
        tables += [Table.from_dict(t) for t in payload["tables"]
                   if not t["key"].endswith("-raw")]
    seconds = time.time() - started
    header = machine_section(meta, loads, args.quick, seconds)
    print("\n" + "=" * 100)
    print(header)
    for table in tables:
        print()
        print(table.text())
    if args.write_docs is not None:
        body = header + "\n\n" + "\n\n".join(t.markdown() for t in tables)
        path: Path = args.write_docs
        text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
        if BEGIN not in text or END not in text:
            text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")
        print(f"\nwrote the tables into {path}")
    print(f"\ntotal {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
