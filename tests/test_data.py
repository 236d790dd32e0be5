import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.datasets import cifar

from smoothcert import data
from smoothcert.data import (
    DATASETS,
    DatasetFileError,
    MissingDatasetError,
    dataset_info,
    get_dataset,
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_dataset_info():
    info = dataset_info("cifar10")
    assert (info.num_classes, info.channels, info.image_size) == (10, 3, 32)
    assert len(info.mean) == len(info.std) == info.channels
    assert dataset_info("imagenet").num_classes == 1000
    with pytest.raises(ValueError, match="name") as excinfo:
        dataset_info("svhn")
    for name in DATASETS:
        assert name in str(excinfo.value)


def test_unknown_dataset_and_bad_split():
    with pytest.raises(ValueError, match="name"):
        get_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split"):
        get_dataset("mnist", "validation")
    with pytest.raises(ValueError, match="split"):
        get_dataset("cifar10", "val")  # "val" is an alias for imagenet only


@pytest.mark.parametrize(
    ("split", "size", "first_label"), [("train", 60000, 5), ("test", 10000, 7)]
)
def test_shipped_mnist_loads_offline(split, size, first_label):
    ds = get_dataset("mnist", split)
    assert len(ds) == size
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert isinstance(y, int) and y == first_label


def test_mnist_matches_torchvisions_reader(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    # torchvision reads unzipped files only, and insists on all four of them.
    for gz in (data.SHIPPED_DIR / "MNIST" / "raw").glob("*.gz"):
        with gzip.open(gz) as src:
            (raw / gz.stem).write_bytes(src.read())
    reference = datasets.MNIST(tmp_path, train=False, download=False)
    ours = get_dataset("mnist", "test", data_dir=tmp_path)
    assert torch.equal(ours.data, reference.data)
    assert torch.equal(ours.targets, reference.targets)
    to_tensor = datasets.MNIST(tmp_path, train=False, transform=lambda im: im)
    for i in (0, 1234, 9999):
        image, label = to_tensor[i]
        expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).unsqueeze(0)
        torch.testing.assert_close(ours[i][0], expected, rtol=0, atol=1e-7)
        assert ours[i][1] == label


def test_mnist_missing_dir(tmp_path):
    with pytest.raises(MissingDatasetError, match="--data-dir") as excinfo:
        get_dataset("mnist", "train", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(excinfo.value)


@pytest.mark.parametrize(("split", "size"), [("train", 7897), ("test", 932)])
def test_cifar_npz_subset_loads(cifar_npz, split, size):
    for where in (cifar_npz, cifar_npz.parent):
        ds = get_dataset("cifar10", split, data_dir=where, augment=False)
        assert len(ds) == size
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert isinstance(y, int) and 0 <= y < 10


def test_cifar_data_dir_from_environment(cifar_npz, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(cifar_npz.parent))
    assert len(get_dataset("cifar10", "test")) == 932


def test_cifar_train_augments_by_default(cifar_npz):
    torch.manual_seed(0)
    plain = get_dataset("cifar10", "train", data_dir=cifar_npz, augment=False)
    augmented = get_dataset("cifar10", "train", data_dir=cifar_npz)
    test = get_dataset("cifar10", "test", data_dir=cifar_npz)
    with np.load(cifar_npz) as f:
        pixels = {"train": f["x_train"][:16], "test": f["x_test"][:16]}

    def as_tensor(image: np.ndarray) -> torch.Tensor:  # HWC uint8 -> CHW in [0, 1]
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255

    changed = 0
    for i in range(16):
        x = augmented[i][0]
        assert x.shape == (3, 32, 32)
        assert 0.0 <= x.min() and x.max() <= 1.0
        changed += not torch.equal(x, as_tensor(pixels["train"][i]))
        # Without augmentation the stored pixels come back, whatever the RNG's state.
        torch.manual_seed(i + 1)
        torch.testing.assert_close(plain[i][0], as_tensor(pixels["train"][i]), rtol=0, atol=1e-7)
        torch.testing.assert_close(test[i][0], as_tensor(pixels["test"][i]), rtol=0, atol=1e-7)
    assert changed > 8


def _write_batches_py(folder: Path, x_train: np.ndarray, y_train, x_test, y_test) -> None:
    """A cifar-10-batches-py folder in CIFAR-10's own pickle format (five train batches + test)."""
    folder.mkdir(parents=True)

    def dump(name, x, y):
        batch = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": list(y)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    for i, (x, y) in enumerate(
        zip(np.array_split(x_train, 5), np.array_split(y_train, 5), strict=True)
    ):
        dump(f"data_batch_{i + 1}", x, y)
    dump("test_batch", x_test, y_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_batches_folder_matches_npz_and_augments_alike(cifar_npz, tmp_path, monkeypatch):
    with np.load(cifar_npz) as f:
        x_train, y_train = f["x_train"][:10], f["y_train"][:10]
        x_test, y_test = f["x_test"][:5], f["y_test"][:5]
    np.savez(tmp_path / "small.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    _write_batches_py(tmp_path / "root" / "cifar-10-batches-py", x_train, y_train, x_test, y_test)
    # The fake batches cannot match torchvision's md5 sums of the real files.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    from_npz = get_dataset("cifar10", "train", data_dir=tmp_path / "small.npz")
    for where in (tmp_path / "root", tmp_path / "root" / "cifar-10-batches-py"):
        from_batches = get_dataset("cifar10", "train", data_dir=where)
        assert isinstance(from_batches, datasets.CIFAR10)
        assert len(from_batches) == len(from_npz) == 10
        for i in range(10):
            torch.manual_seed(i)
            a = from_batches[i]
            torch.manual_seed(i)
            b = from_npz[i]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert len(get_dataset("cifar10", "test", data_dir=tmp_path / "root")) == 5


def test_cifar_missing_dir_names_paths_and_remedies(tmp_path):
    missing = tmp_path / "no-cifar-here"
    with pytest.raises(MissingDatasetError) as excinfo:
        get_dataset("cifar10", "train", data_dir=missing)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, FileNotFoundError)
    assert str(missing) in message
    assert "--data-dir" in message and "SMOOTHCERT_DATA" in message and "--download" in message


def test_cifar_missing_env_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "from-env"))
    with pytest.raises(MissingDatasetError, match="from-env"):
        get_dataset("cifar10", "test")


def test_cifar_folder_with_several_npz_is_ambiguous(cifar_npz, tmp_path):
    for name in ("a.npz", "b.npz"):
        shutil.copy(cifar_npz, tmp_path / name)
    with pytest.raises(ValueError, match="several"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


@pytest.fixture
def fake_imagenet(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, cls in enumerate(("n01440764", "n01443537")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (260 + 20 * i, 300, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{label}{i}.png")
    return tmp_path


@pytest.mark.parametrize("split", ["test", "val"])
def test_imagenet_folder_eval_transform(fake_imagenet, split):
    ds = get_dataset("imagenet", split, data_dir=fake_imagenet)
    assert len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 224, 224) and 0.0 <= x.min() and x.max() <= 1.0
    assert isinstance(y, int) and y == 1
    # The eval transform by hand: shorter side to 256 (bilinear), then the central 224x224.
    path, _ = ds.samples[3]
    with Image.open(path) as image:
        w, h = image.size  # 300 x 280
        resized = image.convert("RGB").resize((int(256 * w / h), 256), Image.BILINEAR)
    left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    torch.manual_seed(1)  # no randomness in the eval transform
    torch.testing.assert_close(x, torch.from_numpy(expected / 255).permute(2, 0, 1), rtol=0,
                               atol=1e-6)


def test_imagenet_train_transform(fake_imagenet):
    torch.manual_seed(0)
    ds = get_dataset("imagenet", "train", data_dir=fake_imagenet)
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and 0.0 <= x.min() and x.max() <= 1.0
    assert y == 0


def test_imagenet_missing(tmp_path):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)  # a class folder without images
    with pytest.raises(MissingDatasetError):
        get_dataset("imagenet", "val", data_dir=tmp_path)
    with pytest.raises(MissingDatasetError, match="--data-dir") as excinfo:
        get_dataset("imagenet", "train", data_dir=tmp_path)
    assert str(tmp_path / "train") in str(excinfo.value)
    assert "--download" not in str(excinfo.value)


# ---------------------------------------------------------------- corrupted files


def write_idx(path: Path, array: np.ndarray) -> Path:
    """`array` (uint8) as an IDX file, gzipped when the name ends in .gz."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def small_mnist(root: Path, images: np.ndarray | None = None, labels: np.ndarray | None = None,
                suffix: str = ".gz") -> tuple[Path, Path]:
    """A 20-example MNIST test split in root/MNIST/raw (or the given images and labels)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28)) if images is None else images
    labels = rng.integers(0, 10, 20) if labels is None else labels
    raw = root / "MNIST" / "raw"
    return (write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", images),
            write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", labels))


def test_a_small_valid_mnist_loads(tmp_path):
    small_mnist(tmp_path)
    assert len(get_dataset("mnist", "test", data_dir=tmp_path)) == 20


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_mnist_label_outside_the_classes_names_the_file(tmp_path, suffix):
    labels = np.full(20, 3)
    labels[7] = 200
    _, label_file = small_mnist(tmp_path, labels=labels, suffix=suffix)
    with pytest.raises(DatasetFileError, match=r"label 200 of example 7 is outside .* 0-9") as e:
        get_dataset("mnist", "test", data_dir=tmp_path)
    assert str(label_file) in str(e.value)


def test_mnist_images_of_another_size_are_refused(tmp_path):
    images, _ = small_mnist(tmp_path, images=np.zeros((20, 14, 14)))
    with pytest.raises(DatasetFileError, match=r"28x28.*\[20, 14, 14\]") as e:
        get_dataset("mnist", "test", data_dir=tmp_path)
    assert str(images) in str(e.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) // 2], "truncated or not a gzip file"),  # a cut download
        (lambda raw: b"<html>404 not found</html>", "truncated or not a gzip file"),
        (lambda raw: gzip.compress(gzip.decompress(raw)[:-100]), "holds 15580"),
        (lambda raw: gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(raw)[4:]),
         "not an unsigned-byte IDX file"),
        (lambda raw: gzip.compress(b"\x00\x00"), "not an unsigned-byte IDX file"),
    ],
)
def test_a_damaged_mnist_file_names_itself(tmp_path, damage, message):
    images, _ = small_mnist(tmp_path)
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(DatasetFileError, match=message) as e:
        get_dataset("mnist", "test", data_dir=tmp_path)
    assert str(images) in str(e.value)


def test_mnist_files_of_different_lengths_are_refused(tmp_path):
    small_mnist(tmp_path, labels=np.zeros(19))
    with pytest.raises(DatasetFileError, match="20 images, 19 labels"):
        get_dataset("mnist", "test", data_dir=tmp_path)


def save_cifar(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
                  y_train=np.arange(6), x_test=rng.integers(0, 256, (4, 32, 32, 3),
                  dtype=np.uint8), y_test=np.arange(4))
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_a_small_valid_cifar_npz_loads_with_column_labels(tmp_path):
    path = save_cifar(tmp_path / "c.npz", y_train=np.arange(6)[:, None])  # Keras's layout
    ds = get_dataset("cifar10", "train", data_dir=path)
    assert [ds[i][1] for i in range(6)] == list(range(6))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(y_train=np.array([0, 1, 2, 10, 4, 5])), "label 10 of example 3 is outside"),
        (dict(y_train=np.array([0, 1, -1, 3, 4, 5])), "label -1 of example 2 is outside"),
        (dict(y_train=np.linspace(0, 5, 6)), "labels must be integers"),
        (dict(y_train=np.arange(5)), "differ in length"),
        (dict(x_train=np.zeros((6, 3, 32, 32), np.uint8)), r"\[N,32,32,3\]"),
        (dict(y_train=None), "lacks the array"),
    ],
)
def test_a_bad_cifar_npz_names_the_file(tmp_path, changes, message):
    path = save_cifar(tmp_path / "c.npz", **changes)
    with pytest.raises(DatasetFileError, match=message) as e:
        get_dataset("cifar10", "train", data_dir=path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) // 2], "truncated or not an .npz archive"),
        (lambda raw: raw[:200] + bytes([raw[200] ^ 0xFF]) + raw[201:], "Bad CRC-32"),  # x_train
        (lambda raw: b"not a zip file at all", "not a valid .npz archive"),
    ],
)
def test_a_damaged_cifar_npz_names_the_file(tmp_path, damage, message):
    path = save_cifar(tmp_path / "c.npz")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetFileError, match=message) as e:
        get_dataset("cifar10", "train", data_dir=path)
    assert str(path) in str(e.value)


def test_a_single_array_named_npz_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DatasetFileError, match="single array") as e:
        get_dataset("cifar10", "test", data_dir=path)
    assert str(path) in str(e.value)
