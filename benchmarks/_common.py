"""Shared helpers of the benchmark scripts: interleaved timing, tables, machine description.

Every script prints its tables and, with `--json PATH`, writes them for `run_all.py`. Nothing
here asserts a time: benchmarks measure, tests assert.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Table:
    """A result table: printed as text, written as markdown by run_all.py."""

    key: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row) -> None:
        self.rows.append(list(row))
        print("  " + " | ".join(_cell(v) for v in row), flush=True)

    def text(self) -> str:
        cells = [self.columns] + [[_cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [f"== {self.title}"]
        for i, row in enumerate(cells):
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|:---|" + "|".join("---:" for _ in self.columns[1:]) + "|"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict) -> Table:
        return cls(**data)


def _cell(value) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def parse_args(description: str, argv: Sequence[str] | None = None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, ~1 minute")
    parser.add_argument("--json", type=Path, help="also write the tables here (for run_all.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: smoothcert.perf.physical_cores())")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def setup(threads: int | None, allocator: bool = True) -> dict:
    """The process settings every benchmark starts from (the recommended defaults)."""
    import torch

    from smoothcert import perf

    applied = perf.tune_allocator() if allocator else False
    used = perf.set_threads(threads)
    torch.manual_seed(0)
    return {"allocator_tuned": applied, "threads": used}


def interleaved(variants: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Wall-clock seconds of `reps` calls of each variant, taken in rotating interleaved order
    (A B C, B C A, C A B, ...) so that drift in machine load hits every variant alike."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - started)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repetitions of numerator[i] / denominator[i] (interleaved pairs)."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def spread(values: Sequence[float]) -> float:
    """Half the relative range of the measurements (a rough +- of the median)."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / (2 * statistics.median(values))


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    import numpy
    import scipy
    import torch

    from smoothcert import perf

    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": perf.physical_cores(),
        "flags": {name: name in flags for name in wanted},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "glibc": perf.glibc_version(),
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "load_average": load_average(),
    }


def emit(tables: list[Table], path: Path | None, meta: dict | None = None) -> None:
    print()
    for table in tables:
        print(table.text())
        print()
    if path is not None:
        payload = {"meta": meta or {}, "tables": [asdict(t) for t in tables]}
        path.write_text(json.dumps(payload, indent=1))


# Environment variables through which glibc's allocator may already be tuned.
ALLOCATOR_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def run_json(args: list[str], env: dict | None = None, clean_allocator: bool = True) -> dict:
    """Run `python <args> --json TMP` in a fresh process; return its JSON payload.

    With `clean_allocator` the child starts with glibc's default allocator settings (the
    variables that would tune it are removed from its environment)."""
    import tempfile

    child_env = {**os.environ, **(env or {})}
    if clean_allocator:
        for name in ALLOCATOR_VARS:
            child_env.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, *args, "--json", str(out)]
        subprocess.run(cmd, check=True, env=child_env)
        return json.loads(out.read_text())


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc/self/status."""
    current = peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return current, peak


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
