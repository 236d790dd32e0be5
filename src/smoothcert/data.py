"""Datasets as (image in [0,1] of shape [C,H,W], int label); normalisation belongs to the model."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

ENV_VAR = "SMOOTHCERT_DATA"
SHIPPED_DIR = Path(__file__).resolve().parent / "_data"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class MissingDatasetError(FileNotFoundError):
    """The dataset is not where smoothcert looked; the message says where and how to provide it."""


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def num_classes(name: str) -> int:
    return dataset_info(name).num_classes


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
) -> Dataset:
    """The `split` ("train"/"test"; "val" = "test" for imagenet) of dataset `name`."""
    dataset_info(name)
    splits = ("train", "test", "val") if name == "imagenet" else ("train", "test")
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)} for {name}, got {split!r}")
    train = split == "train"
    augment = train if augment is None else augment
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
        self.data = torch.from_numpy(_read_idx(images))
        self.targets = torch.from_numpy(_read_idx(labels)).long()
        if self.data.ndim != 3 or self.targets.ndim != 1 or len(self.data) != len(self.targets):
            raise ValueError(f"{images} and {labels} are not matching MNIST image/label files")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Same values as ToTensor() on the uint8 image, without the PIL round trip.
        return self.data[index].unsqueeze(0).float().div(255), int(self.targets[index])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_mnist(raw: Path, train: bool) -> tuple[Path, Path] | None:
    prefix = "train" if train else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _mnist(train: bool, data_dir: str | os.PathLike | None, download: bool) -> Dataset:
    root = SHIPPED_DIR if data_dir is None else Path(data_dir).expanduser()
    candidates = [root / "MNIST" / "raw", root]
    for raw in candidates:
        if files := _find_mnist(raw, train):
            return IdxMnist(*files)
    if download:
        datasets.MNIST(root, train=train, download=True)
        if files := _find_mnist(candidates[0], train):
            return IdxMnist(*files)
    raise _missing("MNIST (its IDX files, gzipped or not)", candidates, env=False, download=True)


# CIFAR-10 ------------------------------------------------------------------------------------


class NpzCifar(Dataset):
    """A CIFAR-10 subset stored as .npz (x_train/y_train/x_test/y_test, HWC uint8 images)."""

    def __init__(self, path: Path, train: bool, transform: Callable | None = None) -> None:
        part = "train" if train else "test"
        with np.load(path) as f:
            if f"x_{part}" not in f or f"y_{part}" not in f:
                raise ValueError(f"{path} lacks the arrays x_{part} and y_{part}")
            self.data = f[f"x_{part}"]
            self.targets = [int(y) for y in f[f"y_{part}"]]
        if self.data.dtype != np.uint8 or self.data.shape[1:] != (32, 32, 3):
            raise ValueError(
                f"x_{part} in {path} must be uint8 of shape [N,32,32,3], "
                f"got {self.data.dtype} {self.data.shape}"
            )
        if len(self.data) != len(self.targets):
            raise ValueError(f"x_{part} and y_{part} in {path} differ in length")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A PIL image, as torchvision's CIFAR10 makes, so augmentations behave identically.
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


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
