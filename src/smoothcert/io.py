"""Crash-safe file writing, output locks and checkpoint loading.

A killed run never leaves a half-written file, and two processes never write one output.
torch is imported only by the checkpoint functions, so torch-free modules (analyze, results)
can write files through here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Iterator, Mapping
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
    """A checkpoint file that is missing, unreadable, corrupted or in no format smoothcert reads."""


WEIGHTS_DIGEST = "weights_sha256"  # the key of the weights' checksum in smoothcert's checkpoints
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle stream (protocol 2 and later)


def weights_digest(weights: Mapping[str, Any]) -> str:
    """sha256 over a state dict: each tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def _refusal_reason(err: BaseException) -> str:
    """What the weights-only unpickler objected to, e.g. 'Unsupported global: GLOBAL os.system'."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return _first_line(err)
    rest = text.split(marker, 1)[1].strip()
    return rest.split(" was not an allowed global")[0].splitlines()[0].strip()


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Whatever torch.save wrote to `path`, loaded with `weights_only=True` (no code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file '{path}'")
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as err:
        raise CheckpointError(f"checkpoint: cannot read '{path}': {err.strerror or err}") from None
    if not head:
        raise CheckpointError(f"checkpoint: '{path}' is empty (0 bytes)")
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        text = all(byte >= 0x20 or byte in b"\t\r\n" for byte in head)
        kind = "a text file" if text else "neither a zip archive nor a pickle stream"
        raise CheckpointError(
            f"checkpoint: '{path}' is not a PyTorch checkpoint (it is {kind}; torch.save writes "
            "a zip archive or, before PyTorch 1.6, a pickle stream)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:  # a permission or I/O error is not a damaged file
        raise CheckpointError(
            f"checkpoint: cannot read '{path}': {err.strerror or _first_line(err)}"
        ) from None
    except pickle.UnpicklingError as err:
        reason = _refusal_reason(err)
        if reason.startswith("Unsupported operand"):  # not a pickle opcode: damaged bytes
            raise CheckpointError(
                f"checkpoint: '{path}' is corrupted; torch.load failed: {reason}"
            ) from None
        raise CheckpointError(
            f"checkpoint: '{path}' holds objects other than tensors and plain values; refusing "
            f"to load it, since unpickling them could run code ({reason})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as err:
        detail = _first_line(err) or type(err).__name__
        raise CheckpointError(
            f"checkpoint: '{path}' is truncated or corrupted; torch.load failed: {detail}"
        ) from None


def verified_state(state: Any, path: str | os.PathLike) -> dict:
    """`state` if it is a smoothcert checkpoint whose weights match their stored checksum.

    Checkpoints written before smoothcert stored the checksum have none and are not verified.
    """
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(
            f"checkpoint: '{path}' is not a smoothcert checkpoint (expected keys 'model' and "
            "'config')"
        )
    stored = state.get(WEIGHTS_DIGEST)
    if stored is not None:
        try:
            actual = weights_digest(state["model"])
        except (AttributeError, TypeError, RuntimeError):
            actual = None
        if actual != stored:
            raise CheckpointError(
                f"checkpoint: '{path}' is corrupted or was modified after smoothcert wrote it: "
                f"its weights do not match the {WEIGHTS_DIGEST} checksum saved with them; "
                "restore the file or retrain"
            )
    return state


def read_checkpoint_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The state dict of a smoothcert checkpoint, read safely (`weights_only=True`), its
    weights verified. (The model of any checkpoint: `smoothcert.checkpoints.load_checkpoint`.)"""
    return verified_state(read_checkpoint(path, map_location), path)
