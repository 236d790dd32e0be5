"""Crash-safe file writing, output locks and checkpoint loading.

A killed run never leaves a half-written file, and two processes never write one output.
torch is imported only by the checkpoint functions, so torch-free modules (analyze, results)
can write files through here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename.

    The file gets the mode a plain `open` would give it (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file `.NAME.XXXXXXXX.tmp` beside `path`, created 0666 & ~umask (mkstemp: 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed atomic_write_bytes(path) left; return what was removed.

    Only files named as atomic_write_bytes names them (`.NAME.` + 8 characters + `.tmp`, which
    also matches the names of tempfile.mkstemp that earlier versions used). Call it only while
    holding the output_lock that guards `path`, so that no live writer's temporary is taken.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file()]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class OutputLockedError(ValueError):
    """Another live process holds the lock of an output this run would write."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file guarding output `path` (a file or a run folder): `.NAME.lock` beside it.

    The path is resolved first, so `runs/a`, `./runs/a/` and a symlink to it share one lock.
    """
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, holder: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on output `path` for the block; refuse if another process has it.

    `fcntl.flock` on a lock file beside the output: the kernel drops the lock when the holder
    dies, so a killed run never leaves a stale lock. `holder=False` (the non-main ranks of a
    torchrun job, which write only their own part files) yields without locking.
    """
    if not holder:
        yield
        return
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputLockedError(
                f"out: '{path}' is being written by another smoothcert process (PID {owner}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise `state` with torch.save and write it atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or not a smoothcert checkpoint."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a smoothcert checkpoint safely (`weights_only=True`: no code is executed)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file '{path}'")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"checkpoint: '{path}' is truncated or not a PyTorch checkpoint ({err})"
        ) from None
    except Exception as err:  # pickle.UnpicklingError and friends from weights_only
        raise CheckpointError(
            f"checkpoint: '{path}' holds objects other than tensors and plain values; "
            f"refusing to load it ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(
            f"checkpoint: '{path}' is not a smoothcert checkpoint (expected keys 'model' and "
            "'config')"
        )
    return state
