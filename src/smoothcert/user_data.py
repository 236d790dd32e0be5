"""A user's own data: an ImageFolder (`imagefolder`) or arrays in an .npz archive (`npz`).

Class names, image size and the per-channel mean/std (given, or `auto`: from the training split)
are found from the files, so a class-count or normalisation mismatch is never silent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .data import DatasetInfo, MissingDatasetError, Stats, _check_labels, _label_vector, _read_npz
from .labels import SHIPPED_DIR as SHIPPED_DIR  # the shipped MNIST, where it always was
from .labels import DatasetFileError

# Per user dataset: its option, what it must name, how to check it exists, what it is.
_USER_SOURCES = {
    "imagefolder": ("data_dir", "--data-dir DIR, a folder with train/ and val/ or test/, each "
                    "with one sub-folder of images per class", Path.is_dir, "folder"),
    "npz": ("data_file", "--data-file F, an .npz archive with x_train, y_train, x_test and "
            "y_test", Path.is_file, "file"),
}


def _user_source(name: str, given: str | os.PathLike | None) -> Path:
    option, needs, exists, kind = _USER_SOURCES[name]
    if given is None:
        raise ValueError(f"{option}: --dataset {name} needs {needs}")
    path = Path(given).expanduser()
    if not exists(path):
        raise MissingDatasetError(f"{option}: no such {kind} '{path}'")
    return path


def user_info(
    name: str, data_dir: str | os.PathLike | None, data_file: str | os.PathLike | None,
    image_size: int | None, mean: Stats, std: Stats,
) -> DatasetInfo:
    if name == "imagefolder":
        root = _user_source("imagefolder", data_dir)
        classes = _folder_classes(root)
        size = _folder_image_size(root, image_size)
        train = partial(_imagefolder, root, "train", False, size)
        info = DatasetInfo(len(classes), 3, size, None, None, tuple(classes))
    else:
        path = _user_source("npz", data_file)
        arrays = NpzArrays(path, True, image_size)
        num_classes = _npz_num_classes(arrays, NpzArrays(path, False), path)
        train = partial(NpzArrays, path, True)
        info = DatasetInfo(num_classes, arrays.channels, arrays.image_size, None, None)
    stats = _user_stats(mean, std, info.channels, train)
    return info if stats is None else replace(info, mean=stats[0], std=stats[1])


def _user_stats(
    mean: Stats, std: Stats, channels: int, train: Callable[[], Dataset]
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) as given, computed from the training split ("auto"), or None (not given)."""
    if (mean is None) != (std is None) or (mean == "auto") != (std == "auto"):
        raise ValueError("mean/std: give both, both 'auto', or neither")
    if mean is None:
        return None
    if mean == "auto":
        return channel_stats(train())
    values = _numbers(mean, "mean"), _numbers(std, "std")
    for label, given in (("mean", values[0]), ("std", values[1])):
        if len(given) != channels:
            raise ValueError(f"{label}: the data has {channels} channel(s), so {label} needs "
                             f"{channels} value(s); got {len(given)}: {list(given)}")
    if any(not s > 0 for s in values[1]):
        raise ValueError(f"std must be positive, got {list(values[1])}")
    return values


def _numbers(values: Sequence[float], name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, one per channel, or 'auto'; got {values!r}"
                         ) from None


def channel_stats(dataset: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over every pixel of `dataset`'s images (float64 sums)."""
    total = squares = None
    count = 0
    for index in range(len(dataset)):
        image = dataset[index][0].double().flatten(1)
        total = image.sum(1) if total is None else total + image.sum(1)
        squares = (image**2).sum(1) if squares is None else squares + (image**2).sum(1)
        count += image.shape[1]
    if total is None:
        raise ValueError("mean/std: 'auto' needs a training split with at least one image")
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ImageFolder: root/train and root/val or root/test, one sub-folder of images per class.


def _folder_splits(root: Path) -> list[Path]:
    found = [root / name for name in ("train", "val", "test") if (root / name).is_dir()]
    if not found:
        raise MissingDatasetError(f"imagefolder: {root} has none of train/, val/, test/ (each "
                                  "with one sub-folder of images per class)")
    return found


def _folder_classes(root: Path) -> list[str]:
    """The class names, the same in every split (or labels would change meaning between them)."""
    named = {}
    for folder in _folder_splits(root):
        try:
            named[folder.name] = datasets.folder.find_classes(str(folder))[0]
        except FileNotFoundError as err:
            raise MissingDatasetError(f"imagefolder: {folder}: {err}") from None
    first, *others = named.items()
    for split, classes in others:
        if classes != first[1]:
            differ = sorted(set(classes) ^ set(first[1]))
            raise DatasetFileError(
                f"imagefolder: {root}/{first[0]} and {root}/{split} have different class "
                f"folders ({', '.join(differ[:5])} in only one); labels would change meaning"
            )
    if len(first[1]) < 2:
        raise DatasetFileError(f"imagefolder: {root}/{first[0]} has {len(first[1])} class "
                               "folder(s); a classifier needs at least 2")
    return first[1]


def _folder_image_size(root: Path, image_size: int | None) -> int:
    """`image_size`, checked, or (None) the shorter side of the first split's first image."""
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        return image_size
    folder = _folder_splits(root)[0]
    samples = datasets.ImageFolder(folder).samples
    if not samples:
        raise MissingDatasetError(f"imagefolder: {folder} holds no images")
    with Image.open(samples[0][0]) as first:
        return min(first.size)


def _folder_transform(image_size: int, augment: bool) -> Callable:
    if augment:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor()])


def _imagefolder(root: Path, split: str, augment: bool, image_size: int | None) -> Dataset:
    _folder_classes(root)
    names = ["train"] if split == "train" else [split, "test" if split == "val" else "val"]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise MissingDatasetError(f"imagefolder: {root} has no {' or '.join(names)}/ folder for "
                                  f"the {split} split")
    size = _folder_image_size(root, image_size)
    try:
        return datasets.ImageFolder(folder, transform=_folder_transform(size, augment))
    except FileNotFoundError as err:  # class folders without any image
        raise MissingDatasetError(f"imagefolder: {folder}: {err}") from None


# Arrays: x_train/y_train/x_test/y_test, uint8 NHWC or float NCHW in [0, 1].


class NpzArrays(Dataset):
    """One split of a user's .npz arrays, as float [C,H,W] images in [0, 1] and int labels."""

    def __init__(self, path: Path, train: bool, image_size: int | None = None) -> None:
        part = "train" if train else "test"
        x, y = _read_npz(path, f"x_{part}", f"y_{part}")
        self.data = _npz_images(x, path, f"x_{part}")
        y = _label_vector(y)
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetFileError(f"{path}: y_{part} must hold one label per image of x_{part} "
                                   f"({len(x)}), got shape {list(y.shape)}")
        _check_labels(y, int(y.max(initial=0)) + 1, path)
        self.targets = [int(label) for label in y]
        self.channels, self.image_size = int(self.data.shape[1]), int(self.data.shape[2])
        if image_size is not None and image_size != self.image_size:
            raise ValueError(f"image_size: the images in {path} are {self.image_size}x"
                             f"{self.image_size} (arrays are not resized); leave image_size out "
                             f"or give {self.image_size}, got {image_size}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index]  # uint8 / 255 as ToTensor() computes it
        pixels = image.float().div(255) if image.dtype == torch.uint8 else image.float()
        return pixels, self.targets[index]


def _npz_images(x: np.ndarray, path: Path, name: str) -> torch.Tensor:
    """`x` as an NCHW tensor: uint8 NHWC kept as bytes, float NCHW checked to lie in [0, 1]."""
    if x.ndim != 4:
        raise DatasetFileError(f"{path}: {name} must be 4-D (uint8 NHWC or float NCHW), got "
                               f"shape {list(x.shape)}")
    if x.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    elif np.issubdtype(x.dtype, np.floating):
        if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DatasetFileError(f"{path}: {name} holds floats outside [0, 1] (min "
                                   f"{x.min():.4g}, max {x.max():.4g}); float images must be "
                                   "NCHW in [0, 1]")
        images = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise DatasetFileError(f"{path}: {name} must be uint8 NHWC or float NCHW in [0, 1], got "
                               f"{x.dtype}")
    if images.shape[2] != images.shape[3]:
        raise DatasetFileError(f"{path}: {name} images must be square, got "
                               f"{images.shape[2]}x{images.shape[3]} (as {x.dtype} "
                               f"{'NHWC' if x.dtype == np.uint8 else 'NCHW'})")
    return images


def _npz_num_classes(train: NpzArrays, test: NpzArrays, path: Path) -> int:
    """1 + the largest label of either split; the splits' images must have one shape."""
    if train.data.shape[1:] != test.data.shape[1:]:
        raise DatasetFileError(f"{path}: x_train images are {list(train.data.shape[1:])} but "
                               f"x_test images are {list(test.data.shape[1:])}")
    num_classes = 1 + max(train.targets + test.targets, default=0)
    if num_classes < 2:
        raise DatasetFileError(f"{path}: the labels name {num_classes} class(es); a classifier "
                               "needs at least 2")
    return num_classes


def user_dataset(
    name: str, split: str, augment: bool, data_dir: str | os.PathLike | None,
    data_file: str | os.PathLike | None, image_size: int | None,
) -> Dataset:
    """The `split` of the user's dataset `name` (imagefolder: "val" and "test" stand in for
    each other)."""
    if name == "imagefolder":
        return _imagefolder(_user_source("imagefolder", data_dir), split, augment, image_size)
    return NpzArrays(_user_source("npz", data_file), split == "train", image_size)
