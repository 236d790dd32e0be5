import platform

import pytest
import torch

from smoothcert import perf


class FakeMallopt:
    """mallopt of a fake C library: records its calls; 0 (error) for the `refused` parameter."""

    def __init__(self, refused: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.refused = refused

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(param != self.refused)


def fake_libc(monkeypatch, version: str | None, refused: int | None = None) -> FakeMallopt:
    mallopt = FakeMallopt(refused)
    libc = type("FakeLibc", (), {"mallopt": mallopt})()
    monkeypatch.setattr(perf, "glibc_version", lambda: version)
    monkeypatch.setattr(perf.ctypes, "CDLL", lambda name, use_errno=False: libc)
    return mallopt


def test_tune_allocator_sets_both_mallopt_parameters(monkeypatch):
    libc = fake_libc(monkeypatch, "2.36")
    assert perf.tune_allocator(12345) is True
    # glibc's <malloc.h>: M_MMAP_MAX is -4, M_TRIM_THRESHOLD is -1.
    assert sorted(libc.calls) == [(-4, 0), (-1, 12345)]


@pytest.mark.parametrize("refused", [perf.M_MMAP_MAX, perf.M_TRIM_THRESHOLD])
def test_tune_allocator_reports_a_refused_mallopt(monkeypatch, refused):
    fake_libc(monkeypatch, "2.36", refused=refused)
    assert perf.tune_allocator() is False


def test_tune_allocator_leaves_other_c_libraries_alone(monkeypatch):
    libc = fake_libc(monkeypatch, None)
    assert perf.tune_allocator() is False
    assert libc.calls == []


@pytest.mark.parametrize("threshold", [-1, 2**31, 1.5, True])
def test_tune_allocator_rejects_a_bad_threshold(threshold):
    with pytest.raises(ValueError, match=r"trim_threshold must be an integer in \[0, 2\*\*31\)"):
        perf.tune_allocator(threshold)


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's confstr is read on Linux")
def test_glibc_version_reads_the_running_c_library():
    version = perf.glibc_version()
    libc, found = platform.libc_ver()  # the version string in the C library's own binary
    if libc == "glibc":
        assert version is not None and tuple(map(int, version.split("."))) >= (2, 0)
        assert version.split(".")[:2] == found.split(".")[:2]
    else:
        assert version is None


def test_set_threads_sets_and_validates():
    before = torch.get_num_threads()
    try:
        assert perf.set_threads(1) == 1
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads"):
            perf.set_threads(0)
    finally:
        torch.set_num_threads(before)


class FakePath:
    """A stand-in for pathlib.Path over a dict of file contents (missing: OSError)."""

    files: dict[str, str] = {}

    def __init__(self, path: str):
        self.path = str(path)

    def read_text(self) -> str:
        if self.path not in self.files:
            raise FileNotFoundError(self.path)
        return self.files[self.path]


def siblings(cpu: int) -> str:
    return f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"


@pytest.mark.parametrize(
    ("files", "quota", "expected"),
    [
        # 4 logical CPUs, SMT pairs (0,2) and (1,3): 2 physical cores.
        ({siblings(0): "0,2", siblings(1): "1,3", siblings(2): "0,2", siblings(3): "1,3"},
         None, 2),
        # No SMT: one core per logical CPU.
        ({siblings(c): str(c) for c in range(4)}, None, 4),
        # A container quota of 1.5 CPUs caps 4 cores at 2; a quota below 1 still gives 1.
        ({siblings(c): str(c) for c in range(4)}, 1.5, 2),
        ({siblings(c): str(c) for c in range(4)}, 0.2, 1),
        # No topology in /sys: each logical CPU counts as a core.
        ({}, None, 4),
    ],
)
def test_physical_cores_counts_sibling_groups_capped_by_the_quota(monkeypatch, files, quota,
                                                                  expected):
    monkeypatch.setattr(perf.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(FakePath, "files", files)
    monkeypatch.setattr(perf, "Path", FakePath)
    monkeypatch.setattr(perf, "_cgroup_cpu_limit", lambda: quota)
    assert perf.physical_cores() == expected


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"/sys/fs/cgroup/cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2: quota period
        ({"/sys/fs/cgroup/cpu.max": "max 100000\n"}, None),  # v2 without a quota
        ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "250000\n",
          "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 2.5),  # cgroup v1
        ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
          "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 without a quota
        ({}, None),  # no cgroup files
    ],
)
def test_cgroup_cpu_limit_reads_v2_then_v1(monkeypatch, files, expected):
    monkeypatch.setattr(FakePath, "files", files)
    monkeypatch.setattr(perf, "Path", FakePath)
    assert perf._cgroup_cpu_limit() == expected
