"""Devices, the memory a batch needs, and torch.distributed set-up for runs launched by torchrun
(NCCL on GPUs, gloo on CPUs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' is this process's GPU when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {name!r}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {name!r} was asked for but no MPS device is available")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} was asked for but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device: {name!r} was asked for but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return device


class BatchTooLargeError(ValueError):
    """A batch that does not fit in the device's memory; the message says which batch to try."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure (CUDA out of memory, CPU allocator, MemoryError)."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "can't allocate memory", "not enough memory")
    )


@contextlib.contextmanager
def batch_memory_guard(batch: int, option: str = "--batch", multiple_of: int = 1) -> Iterator[None]:
    """Turn an allocation failure inside the block into a BatchTooLargeError naming `option`.

    The suggestion is half of `batch`, rounded down to a multiple of `multiple_of` (the number
    of processes when `batch` is global).
    """
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        smaller = batch // 2 // multiple_of * multiple_of
        advice = (f"try {option} {smaller} or smaller" if smaller >= 1
                  else "use a device with more memory or a smaller model")
        raise BatchTooLargeError(
            f"{option.lstrip('-')}: a batch of {batch} does not fit in memory ({reason}); {advice}"
        ) from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, device=resolved)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
