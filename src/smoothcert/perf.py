"""Performance settings: the autocast dtypes, the glibc allocator and the number of threads.

The allocator and the threads are settings of the whole process, so they belong at program
start-up (the CLI calls them once), never inside library functions. Measured effects:
`docs/benchmarks.md`.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Literal, get_args

# The autocast dtypes training and certification accept (--amp); None is float32.
Amp = Literal["bf16", "fp16"]
AMP = get_args(Amp)

# glibc <malloc.h> parameter numbers for mallopt().
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 1 << 30


def glibc_version() -> str | None:
    """'2.36' when this process runs on glibc, else None (musl, macOS, Windows)."""
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not value or not value.startswith("glibc "):
        return None
    return value.split()[1]


def tune_allocator(trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Keep freed memory in the process instead of returning it to the OS; True if applied.

    glibc serves every large block (a batch of inputs or activations) with its own mmap and
    gives it back on free, so each forward pass page-faults its activations in afresh, and it
    trims the heap top whenever more than 128 KiB is free. `mallopt(M_MMAP_MAX, 0)` serves
    large blocks from the heap and `mallopt(M_TRIM_THRESHOLD, trim_threshold)` keeps up to
    that many free bytes, so the pages of one batch are reused by the next. The cost: the
    resident size stays at its peak for the life of the process. Same effect without code:
    `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824` in the environment.

    Affects the whole process and everything that allocates after the call; call it once,
    at start-up. A no-op returning False where the C library is not glibc.
    """
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) or not (
        0 <= trim_threshold < 2**31
    ):
        raise ValueError(f"trim_threshold must be an integer in [0, 2**31), got {trim_threshold!r}")
    if glibc_version() is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_MAX, 0)) & bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 (`cpu.max`) or v1 (`cfs_quota_us`) quota, None if none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, one per SMT sibling group,
    capped by a cgroup CPU quota (containers), at least 1."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    count = len(cores)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def set_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to `num_threads` (default: physical_cores()); return it.

    One thread per physical core is the fastest setting measured here; more threads than
    cores (SMT siblings, or a container quota that torch does not see) only add contention.
    With no argument an explicit `OMP_NUM_THREADS` (torchrun sets it to 1 per process) wins
    and is left as it is.
    """
    import torch

    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        num_threads = physical_cores()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    torch.set_num_threads(num_threads)
    return num_threads
