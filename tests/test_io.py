"""smoothcert.io's output locks, output paths and write errors (no torch, no network)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from smoothcert import io as sc_io
from smoothcert.io import (
    LOCK_MARK,
    OutputLockedError,
    atomic_write_bytes,
    check_output_path,
    lock_path,
    output_lock,
)
from smoothcert.results import RowWriter


def flock_is_free(path: Path) -> bool:
    """Whether a new descriptor of `path` can take its flock (no other holder)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------- locks


def test_a_held_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    out = tmp_path / "r.tsv"
    with output_lock(out):
        assert lock_path(out).read_text() == f"{LOCK_MARK}{os.getpid()}\n"
        with pytest.raises(OutputLockedError, match=rf"'{out}' .*\(PID {os.getpid()}\)"):
            with output_lock(out):
                pass


def test_the_lock_file_is_removed_when_the_run_ends(tmp_path):
    out = tmp_path / "r.tsv"
    with output_lock(out, also=[tmp_path / "r.tsv.json"]):
        assert {p.name for p in tmp_path.iterdir()} == {".r.tsv.lock", ".r.tsv.json.lock"}
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("first, second", [("r.json", "r"), ("r", "r.json")])
def test_a_result_file_and_another_runs_sidecar_are_one_locked_unit(tmp_path, first, second):
    """`--out r.json` and `--out r`: run A's result is run B's sidecar (either may start first)."""
    def lock(name):
        return output_lock(tmp_path / name, also=[tmp_path / f"{name}.json"])

    with lock(first), pytest.raises(OutputLockedError, match="'.*r.json' is being written"):
        with lock(second):
            pass


def test_a_foreign_file_at_the_lock_name_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "r.tsv"
    lock_path(out).write_text("my notes\n")
    with pytest.raises(ValueError, match=rf"'{lock_path(out)}' exists and is not a lock file"):
        with output_lock(out):
            pass
    assert lock_path(out).read_text() == "my notes\n"
    lock_path(out).unlink()
    lock_path(out).mkdir()
    with pytest.raises(ValueError, match=rf"'{lock_path(out)}' is a folder"):
        with output_lock(out):
            pass


def test_a_lock_file_of_an_earlier_version_is_taken_and_removed(tmp_path):
    out = tmp_path / "r.tsv"
    lock_path(out).write_text("4242\n")  # earlier versions wrote the PID only
    with output_lock(out):
        assert lock_path(out).read_text().startswith(LOCK_MARK)
    assert not lock_path(out).exists()


def test_a_lock_file_removed_while_opening_it_is_opened_again(tmp_path, monkeypatch):
    """The holder removes its lock file as it ends: a process that opened the old file just
    before must not take that orphan's lock, but the lock of the file the name now holds."""
    out = tmp_path / "r.tsv"
    lock = lock_path(out)
    lock.write_text(LOCK_MARK)
    orphan = os.open(lock, os.O_RDWR)
    lock.unlink()  # the previous holder's end ...
    lock.write_text(LOCK_MARK)  # ... and a new run's lock file
    opened = sc_io._open_or_create
    calls = iter([orphan])
    monkeypatch.setattr(sc_io, "_open_or_create", lambda path: next(calls, None) or opened(path))
    with output_lock(out):
        assert not flock_is_free(lock)  # the named file is held, not the orphan


def test_a_hard_linked_output_is_refused(tmp_path):
    out, link = tmp_path / "r.tsv", tmp_path / "other.tsv"
    out.write_text("idx\n")
    os.link(out, link)
    for name in (out, link):
        with pytest.raises(ValueError, match=rf"'{name}' has 2 hard links"):
            with output_lock(name):
                pass
    link.unlink()
    with output_lock(out):
        pass
    with output_lock(tmp_path):  # a folder (train's --out) has several links by nature
        pass


# ---------------------------------------------------------------- output paths


def test_an_output_path_of_the_wrong_kind_is_refused(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    with pytest.raises(ValueError, match=rf"^out: '{folder}' is a folder, but --out names a file"):
        check_output_path(folder, "out")
    with pytest.raises(ValueError, match=rf"^out: '{file}' is a file, but --out names a folder"):
        check_output_path(file, "out", folder=True)
    with pytest.raises(ValueError, match=rf"^plot: '{file}' is a file, so .* cannot be created"):
        check_output_path(file / "sub" / "x.png", "plot")
    check_output_path(tmp_path / "missing" / "x.png", "plot")  # created when written
    check_output_path(folder, "out", folder=True)
    check_output_path(file, "out")


# ---------------------------------------------------------------- write errors


def test_a_full_disk_during_an_atomic_write_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "r.tsv.json"
    with pytest.raises(OSError, match=rf"cannot write '{target}': No space left on device"):
        atomic_write_bytes(target, b"{}")
    assert list(tmp_path.iterdir()) == []  # the temporary removed


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_while_appending_rows_names_the_file():
    with pytest.raises(OSError, match="cannot write '/dev/full': No space left on device"):
        with RowWriter("/dev/full", ["idx"]) as writer:
            writer.write(["0"])
