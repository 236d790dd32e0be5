"""A dataset split's labels without torch, so that `verify` can check result rows cheaply.

MNIST's labels are read straight from its IDX file (the shipped copy, or `data_dir`) with the
IDX reader `data.py` uses for the images too; the other datasets' labels come from
`smoothcert.data` (torch, torchvision), and only from a folder the caller names.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .io import first_line

SHIPPED_DIR = Path(__file__).resolve().parent / "_data"


class DatasetFileError(ValueError):
    """A dataset file that is truncated, corrupted or not what its dataset holds; names the file."""


class LabelsUnavailable(Exception):
    """The labels cannot be read; the message says why (shown as "labels not checked: ...")."""


def read_idx(path: Path) -> np.ndarray:
    """The array of an unsigned-byte IDX file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DatasetFileError(f"{path} is truncated or not a gzip file ({err})") from None
    # IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then each dimension as a big-endian uint32.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise DatasetFileError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    data = raw[4 + 4 * ndim :]
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DatasetFileError(
            f"{path}: its IDX header describes {expected} bytes of data ({list(shape)}), but the "
            f"file holds {len(data)}; it is truncated or corrupted"
        )
    return np.frombuffer(data, np.uint8).reshape(shape).copy()


def mnist_folders(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where MNIST's IDX files are looked for: torchvision's layout first, then the folder."""
    root = SHIPPED_DIR if data_dir is None else Path(data_dir).expanduser()
    return [root / "MNIST" / "raw", root]


def find_mnist(raw: Path, train: bool) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of a split in folder `raw`, gzipped or not."""
    prefix = "train" if train else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _mnist_labels(split: str, data_dir: str | os.PathLike | None) -> tuple[np.ndarray, str]:
    if split not in ("train", "test"):
        raise LabelsUnavailable(f"MNIST has no split {split!r}")
    folders = mnist_folders(data_dir)
    files = next(filter(None, (find_mnist(raw, split == "train") for raw in folders)), None)
    if files is None:
        raise LabelsUnavailable(f"no MNIST {split} files in {' or '.join(map(str, folders))}")
    try:
        labels = read_idx(files[1])
    except (DatasetFileError, OSError) as err:
        raise LabelsUnavailable(str(err)) from None
    if labels.ndim != 1:
        raise LabelsUnavailable(f"{files[1]} is not an MNIST label file (shape {labels.shape})")
    where = "the shipped copy" if data_dir is None else str(files[1])
    return labels.astype(np.int64), f"MNIST {split} ({where})"


def split_labels(dataset: str, split: str, data_dir: str | os.PathLike | None = None,
                 data_file: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """The labels of `split` of `dataset`, by example index, and what they were read from.

    Raises LabelsUnavailable (saying why) when they cannot be read. Only MNIST is read
    without `data_dir` (smoothcert ships it); an npz dataset is read from `data_file`; the
    others import `smoothcert.data`.
    """
    for name, given in (("data_dir", data_dir), ("data_file", data_file)):
        if given is not None and not Path(given).expanduser().exists():
            raise ValueError(f"{name}: '{given}' does not exist")
    if dataset == "mnist":
        return _mnist_labels(split, data_dir)
    source, needed = ((data_file, "--data-file (the .npz archive)") if dataset == "npz"
                      else (data_dir, "--data-dir (the dataset's folder)"))
    if source is None:
        raise LabelsUnavailable(f"the {dataset} labels need {needed}")
    from .data import get_dataset  # torch and torchvision: only when asked for

    try:
        targets = get_dataset(dataset, split, data_dir, augment=False,
                              data_file=data_file).targets
    except (ValueError, OSError) as err:
        raise LabelsUnavailable(first_line(err)) from None
    return np.asarray(targets, dtype=np.int64), f"{dataset} {split} ({source})"
