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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename.

    The file gets the mode a plain `open` would give it (0666 less the umask). A write error
    (a full disk, say) is an OSError that names `path`.
    """
    path = Path(path)
    with named_write_errors(path):
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


@contextlib.contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError of the block that does not name a file as one that names `path`
    (os.write and fsync report a full disk as a bare "[Errno 28] No space left on device")."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, f"cannot write '{path}': {err.strerror}") from None


def check_output_path(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """Refuse an output `path` that cannot be written: a folder where a file is expected (or
    the reverse), or below a file; `option` (e.g. "out") names it in the error."""
    path = Path(path)
    want, other = ("a folder", "a file") if folder else ("a file", "a folder")
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{option}: '{path}' is {other}, but --{option} names {want}: choose "
                         f"another --{option}")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ValueError(f"{option}: '{parent}' is a file, so '{path}' cannot be created in "
                         f"it: choose another --{option}")


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


LOCK_MARK = "smoothcert output lock\n"  # the first line of every lock file smoothcert creates
_LEGACY_LOCK = re.compile(r"\d+\n")  # what earlier versions wrote: the holder's PID only


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file guarding output `path` (a file or a run folder): `.NAME.lock` beside it.

    The path is resolved first, so `runs/a`, `./runs/a/` and a symlink to it share one lock.
    """
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, holder: bool = True,
                also: Sequence[str | os.PathLike] = ()) -> Iterator[None]:
    """Hold an exclusive lock on output `path` for the block; refuse if another process has it.

    `also`: the other files written with `path` (a result file's sidecar), locked with it, so
    that no other run's output can be one of them. `fcntl.flock` on a lock file beside each:
    the kernel drops the lock when the holder dies, so a killed run never leaves a stale lock,
    and the lock file is removed when the block ends. A file with several hard links is
    refused: a lock keyed on one name cannot see a writer through another. `holder=False`
    (the non-main ranks of a torchrun job, which write only their own part files) yields
    without locking.
    """
    if not holder:
        yield
        return
    guarded = [Path(p) for p in (path, *also)]
    with contextlib.ExitStack() as stack:
        # In one order everywhere, so that two runs sharing two names cannot both be refused.
        for lock, output in sorted({lock_path(p): p for p in guarded}.items()):
            stack.enter_context(_locked(lock, output))
        for output in guarded:
            _refuse_hard_links(output)
        yield


def _refuse_hard_links(path: Path) -> None:
    links = path.stat().st_nlink if path.is_file() else 1
    if links > 1:
        raise ValueError(f"out: '{path}' has {links} hard links (names); smoothcert writes only "
                         "a file with one, since two runs through two names would both write "
                         "it: copy it to a file of its own or choose another --out")


@contextlib.contextmanager
def _locked(lock: Path, output: Path) -> Iterator[None]:
    """Hold the flock of lock file `lock` (guarding `output`) for the block, then remove it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, output)
    try:
        content = f"{LOCK_MARK}{os.getpid()}\n".encode()
        os.pwrite(fd, content, 0)  # over the mark: never a moment without it
        os.ftruncate(fd, len(content))
        yield
    finally:
        # Removed while still held: a process that opened it meanwhile finds, once it holds
        # the lock, that the name no longer refers to its file and starts again (_acquire).
        lock.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(lock: Path, output: Path) -> int:
    """A descriptor of lock file `lock`, flock'ed by this process, which the name still
    refers to; a file of that name that smoothcert did not create is refused, untouched."""
    while True:
        fd = _open_or_create(lock)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputLockedError(
                f"out: '{output}' is being written by another smoothcert process (PID "
                f"{_holder(lock)}); wait for it to finish or choose another --out") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed it after we opened it: take the new one
    if not _is_own_lock(os.pread(fd, 256, 0)):
        os.close(fd)
        raise ValueError(f"out: '{lock}' exists and is not a lock file smoothcert created; "
                         "smoothcert uses that name to lock --out and does not overwrite it: "
                         "move it away or choose another --out")
    return fd


def _open_or_create(lock: Path) -> int | None:
    """A descriptor of lock file `lock`; None after creating it (or when another process did
    meanwhile): open it then."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise ValueError(f"out: '{lock}' is a folder; smoothcert uses that name to lock --out: "
                         "move it away or choose another --out") from None
    # Written under a temporary name and linked into place, so that no other process can see
    # the file without its mark (and take it for someone else's empty file).
    fd, tmp = _create_temporary(lock)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(LOCK_MARK.encode())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, lock)
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _is_own_lock(content: bytes) -> bool:
    text = content.decode("ascii", "replace")
    return text.startswith(LOCK_MARK) or bool(_LEGACY_LOCK.fullmatch(text))


def _holder(lock: Path) -> str:
    """The PID the holder of `lock` wrote into it ("unknown" before it has)."""
    try:
        lines = lock.read_text("ascii", "replace").splitlines()
    except OSError:
        return "unknown"
    return lines[-1] if lines and lines[-1].isdigit() else "unknown"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise `state` with torch.save and write it atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, corrupted or in no format smoothcert reads."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose objects the weights-only loader refuses: loading them would run code."""


WEIGHTS_DIGEST = "weights_sha256"  # the key of the weights' checksum in smoothcert's checkpoints
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle stream (protocol 2 and later)
# Lines of torch's refusal that advise an unsafe load or allowlisting, and its boilerplate.
_UNSAFE_ADVICE = ("Weights only load failed", "weights_only", "safe_globals", "trust",
                  "torch.load")


def weights_digest(weights: Mapping[str, Any]) -> str:
    """sha256 over a state dict: each tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def first_line(err: BaseException) -> str:
    """The first non-blank line of an error's message, stripped ("" for none)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def _refusal_reason(err: BaseException) -> str:
    """What the weights-only unpickler objected to, e.g. 'Unsupported global: GLOBAL os.system',
    without torch's advice to load the file unsafely (following it would run the file's code)."""
    text = str(err)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"Unsupported global: GLOBAL {named.group(1)}"
    rest = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in rest.splitlines()
             if line.strip() and not any(word in line for word in _UNSAFE_ADVICE)]
    return lines[0] if lines else "an object the safe loader does not allow"


def require_checkpoint_file(path: str | os.PathLike) -> Path:
    """`path` as a Path; CheckpointError unless it is a file (torch-free: checked first)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file '{path}'")
    return path


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Whatever torch.save wrote to `path`, loaded with `weights_only=True` (no code runs)."""
    import torch

    path = require_checkpoint_file(path)
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
            f"checkpoint: cannot read '{path}': {err.strerror or first_line(err)}"
        ) from None
    except pickle.UnpicklingError as err:
        reason = _refusal_reason(err)
        if reason.startswith("Unsupported operand"):  # not a pickle opcode: damaged bytes
            raise CheckpointError(
                f"checkpoint: '{path}' is corrupted; torch.load failed: {reason}"
            ) from None
        raise UnsafeCheckpointError(
            f"checkpoint: '{path}' holds objects other than tensors and plain values "
            f"({reason}): loading them would run code stored in the file, so smoothcert is "
            "refusing to load it and never runs it. If you trust the file, load it in the "
            "environment that made it and save only tensors and plain values (e.g. "
            "torch.save({'arch': ..., 'state_dict': model.state_dict()}, 'model.pth.tar')); "
            "otherwise delete it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as err:
        detail = first_line(err) or type(err).__name__
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
