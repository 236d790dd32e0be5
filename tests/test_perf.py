import platform

import pytest
import torch

from smoothcert import perf


def test_tune_allocator_applies_on_glibc_linux():
    applied = perf.tune_allocator()
    assert applied == (platform.system() == "Linux" and perf.glibc_version() is not None)


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
