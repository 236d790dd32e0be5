"""Datasets as (image in [0,1] of shape [C,H,W], int label); normalisation belongs to the model."""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .labels import SHIPPED_DIR as SHIPPED_DIR  # the shipped MNIST, where it always was
from .labels import DatasetFileError, find_mnist, mnist_folders, read_idx

ENV_VAR = "SMOOTHCERT_DATA"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's shape and standardisation; a user's dataset (USER_DATASETS) may have no
    mean/std (None: its model's standardisation is the user's to give) and names its classes."""

    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: tuple[str, ...] | None = None


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# A user's own data, read from data_dir (imagefolder) or data_file (npz); see user_data.
USER_DATASETS = ("imagefolder", "npz")
Stats = Sequence[float] | str | None  # per-channel values, "auto" (from the training split) or None


class MissingDatasetError(FileNotFoundError):
    """The dataset is not where smoothcert looked; the message says where and how to provide it."""


def _check_labels(labels: np.ndarray, num_classes: int, where: Path) -> None:
    """Refuse labels that are not integers in 0..num_classes-1."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFileError(f"{where}: labels must be integers, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DatasetFileError(
            f"{where}: label {labels[bad[0]]} of example {bad[0]} is outside the classes "
            f"0-{num_classes - 1} ({bad.size} such label(s)); the file is corrupted"
        )


def dataset_info(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    data_file: str | os.PathLike | None = None,
    image_size: int | None = None,
    mean: Stats = None,
    std: Stats = None,
) -> DatasetInfo:
    """`name`'s classes, channels, image size and mean/std; a user's dataset (USER_DATASETS) is
    read from `data_dir` (imagefolder) or `data_file` (npz) to find them."""
    if name in USER_DATASETS:
        from .user_data import user_info

        return user_info(name, data_dir, data_file, image_size, mean, std)
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)} or {', '.join(USER_DATASETS)}, "
                         f"got {name!r}")
    return DATASETS[name]


def default_data_dir() -> Path:
    """The data folder used when neither data_dir nor SMOOTHCERT_DATA is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "smoothcert"


def get_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    augment: bool | None = None,
    *,
    data_file: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> Dataset:
    """The `split` ("train"/"test"; "val" = "test" for imagenet and imagefolder) of `name`."""
    if name not in USER_DATASETS:
        dataset_info(name)
    splits = ("train", "test", "val") if name in ("imagenet", "imagefolder") else ("train", "test")
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)} for {name}, got {split!r}")
    train = split == "train"
    augment = train if augment is None else augment
    if name in USER_DATASETS:
        from .user_data import user_dataset

        return user_dataset(name, split, augment, data_dir, data_file, image_size)
    if name == "mnist":
        return _mnist(train, data_dir, download)
    if name == "cifar10":
        return _cifar10(train, augment, _root(data_dir), download)
    return _imagenet(train, augment, _root(data_dir))


def _root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return default_data_dir()


def _missing(what: str, looked_at: list[Path], env: bool, download: bool) -> MissingDatasetError:
    places = "\n".join(f"  {p}" for p in looked_at)
    ways = ["--data-dir PATH"]
    if env:
        ways.append(f"the environment variable {ENV_VAR}=PATH")
    if download:
        ways.append("--download to fetch it")
    return MissingDatasetError(
        f"{what} not found. Looked at:\n{places}\nProvide it with {', or '.join(ways)}."
    )


# MNIST ---------------------------------------------------------------------------------------


class IdxMnist(Dataset):
    """MNIST read from its IDX files, gzipped or not (torchvision's reader needs them unzipped)."""

    def __init__(self, images: Path, labels: Path) -> None:
        info = DATASETS["mnist"]
        data, targets = read_idx(images), read_idx(labels)
        if data.shape[1:] != (info.image_size, info.image_size):
            raise DatasetFileError(
                f"{images}: MNIST images are {info.image_size}x{info.image_size}, but its IDX "
                f"header describes an array of shape {list(data.shape)}"
            )
        if targets.ndim != 1:
            raise DatasetFileError(
                f"{labels}: an MNIST label file holds one number per image, but its IDX header "
                f"describes an array of shape {list(targets.shape)}"
            )
        if len(data) != len(targets):
            raise DatasetFileError(
                f"{images} and {labels} are not matching MNIST image/label files "
                f"({len(data)} images, {len(targets)} labels)"
            )
        _check_labels(targets, info.num_classes, labels)
        self.data = torch.from_numpy(data)
        self.targets = torch.from_numpy(targets).long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Same values as ToTensor() on the uint8 image, without the PIL round trip.
        return self.data[index].unsqueeze(0).float().div(255), int(self.targets[index])


def _mnist(train: bool, data_dir: str | os.PathLike | None, download: bool) -> Dataset:
    candidates = mnist_folders(data_dir)
    root = candidates[1]
    for raw in candidates:
        if files := find_mnist(raw, train):
            return IdxMnist(*files)
    if download:
        datasets.MNIST(root, train=train, download=True)
        if files := find_mnist(candidates[0], train):
            return IdxMnist(*files)
    raise _missing("MNIST (its IDX files, gzipped or not)", candidates, env=False, download=True)


# CIFAR-10 ------------------------------------------------------------------------------------


class NpzCifar(Dataset):
    """A CIFAR-10 subset stored as .npz (x_train/y_train/x_test/y_test, HWC uint8 images)."""

    def __init__(self, path: Path, train: bool, transform: Callable | None = None) -> None:
        part = "train" if train else "test"
        x, y = _read_npz(path, f"x_{part}", f"y_{part}")
        y = _label_vector(y)
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or y.ndim != 1:
            raise DatasetFileError(
                f"{path}: x_{part} must be uint8 of shape [N,32,32,3] and y_{part} of shape [N], "
                f"got {x.dtype} {list(x.shape)} and {list(y.shape)}"
            )
        if len(x) != len(y):
            raise DatasetFileError(f"{path}: x_{part} and y_{part} differ in length")
        _check_labels(y, DATASETS["cifar10"].num_classes, path)
        self.data = x
        self.targets = [int(label) for label in y]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A PIL image, as torchvision's CIFAR10 makes, so augmentations behave identically.
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _label_vector(y: np.ndarray) -> np.ndarray:
    """Labels as a vector; Keras stores them as a column."""
    return y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def _read_npz(path: Path, *names: str) -> list[np.ndarray]:
    """The arrays `names` of the .npz archive `path`, with errors that name the file."""
    try:
        archive = np.load(path)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetFileError(f"{path} holds a single array, not an .npz archive of arrays")
        with archive:
            missing = [name for name in names if name not in archive.files]
            if missing:
                raise DatasetFileError(f"{path} lacks the array(s) {', '.join(missing)}")
            return [archive[name] for name in names]
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DatasetFileError(f"{path} is truncated or not an .npz archive ({err})") from None
    except DatasetFileError:
        raise
    except ValueError as err:  # numpy's own "cannot load" and format errors
        raise DatasetFileError(f"{path} is not a valid .npz archive of arrays ({err})") from None


def _cifar_transform(augment: bool) -> Callable:
    steps = (
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    )
    return transforms.Compose([*steps, transforms.ToTensor()])


def _cifar10(train: bool, augment: bool, root: Path, download: bool) -> Dataset:
    transform = _cifar_transform(augment)
    if root.is_file() and root.suffix == ".npz":
        return NpzCifar(root, train, transform)
    folder = root if root.name == _CIFAR_FOLDER else root / _CIFAR_FOLDER
    if all((folder / f).is_file() for f in _CIFAR_FILES):
        return _torchvision_cifar(folder, train, transform, download=False)
    npz = sorted(root.glob("*.npz")) if root.is_dir() else []
    if len(npz) > 1:
        raise ValueError(f"data_dir {root} holds several .npz files, name one: {npz}")
    if npz:
        return NpzCifar(npz[0], train, transform)
    if download:
        return _torchvision_cifar(folder, train, transform, download=True)
    what = f"CIFAR-10 ({_CIFAR_FOLDER}/ or a .npz subset)"
    raise _missing(what, [folder, root / "*.npz"], env=True, download=True)


def _torchvision_cifar(folder: Path, train: bool, transform: Callable, download: bool) -> Dataset:
    try:
        return datasets.CIFAR10(folder.parent, train=train, transform=transform, download=download)
    except RuntimeError as e:  # torchvision's md5 check failed
        raise MissingDatasetError(f"CIFAR-10 in {folder} is corrupted or incomplete: {e}") from None


# ImageNet ------------------------------------------------------------------------------------


def _imagenet_transform(augment: bool) -> Callable:
    if augment:
        steps = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(256), transforms.CenterCrop(224)]
    return transforms.Compose([*steps, transforms.ToTensor()])


def _imagenet(train: bool, augment: bool, root: Path) -> Dataset:
    folder_name = "train" if train else "val"
    candidates = [root / folder_name, root / "imagenet" / folder_name]
    for folder in candidates:
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            try:
                return datasets.ImageFolder(folder, transform=_imagenet_transform(augment))
            except FileNotFoundError as e:  # class folders without any image
                raise MissingDatasetError(f"ImageNet in {folder}: {e}") from None
    raise _missing(
        f"ImageNet ({folder_name}/ with one sub-folder of images per class)",
        candidates,
        env=True,
        download=False,
    )
