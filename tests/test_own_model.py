"""A user's own model and data (issue 23): model specs, checkpoint kinds, input convention,
ImageFolder and npz datasets, smoothcert.load."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import INTEROP, needs_interop
from PIL import Image
from torch import nn

import smoothcert
from smoothcert.data import dataset_info, get_dataset
from smoothcert.io import CheckpointError, UnsafeCheckpointError, save_checkpoint
from smoothcert.loading import load
from smoothcert.models import Standardize, build_model
from smoothcert.models.spec import build_from_spec, parse_model_kwargs

SPEC = "torchvision:mobilenet_v3_small"
CLASSES = ("cat", "dog", "emu")
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
# Training images are solid colours, half of each class A and half B: per channel, the mean is
# (A + B) / 2 and the std |A - B| / 2, exactly.
COLOUR_A, COLOUR_B = (10, 100, 200), (50, 150, 250)

FACTORY = '''
import torchvision

def make(num_classes, width=1.0):
    return torchvision.models.mobilenet_v3_small(num_classes=num_classes, width_mult=width)
'''


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for i in range(4):
            train = root / "train" / name
            train.mkdir(parents=True, exist_ok=True)
            colour = COLOUR_A if i % 2 else COLOUR_B
            Image.new("RGB", (40, 36), colour).save(train / f"{i}.png")
            val = root / "val" / name
            val.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8) // (label + 1)
            Image.fromarray(pixels).save(val / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def network() -> nn.Module:
    torch.manual_seed(1)
    net = build_from_spec(SPEC, len(CLASSES))
    for module in net.modules():  # running statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, network) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("files")
    weights = network.state_dict()
    saved = {
        "plain": weights,
        "wrapped": {"model": weights, "epoch": 3},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in weights.items()}, "arch": "mine"},
        "custom_key": {"ema": weights, "step": 7},
        "factory": weights,
    }
    paths = {}
    for kind, state in saved.items():
        paths[kind] = where / f"{kind}.pt"
        torch.save(state, paths[kind])
    paths["torchscript"] = where / "scripted.pt"
    with warnings.catch_warnings():  # torch.jit's deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(network, torch.rand(1, 3, 32, 32)).save(str(paths["torchscript"]))
    paths["pickle"] = where / "whole.pt"
    torch.save(network, paths["pickle"])
    paths["pickle_in_dict"] = where / "whole_in_dict.pt"
    torch.save({"model": network, "epoch": 3}, paths["pickle_in_dict"])
    (where / "my_factory.py").write_text(FACTORY)
    return paths


def _options(kind: str, files: dict[str, Path]) -> dict:
    if kind == "factory":
        return {"model": f"{files['plain'].parent / 'my_factory.py'}:make"}
    if kind == "custom_key":
        return {"model": SPEC, "state_dict_key": "ema"}
    if kind.startswith("pickle"):
        return {"trust_pickle": True}
    return {} if kind == "torchscript" else {"model": SPEC}


# ---------------------------------------------------------------- the same weights, every kind


@pytest.mark.parametrize("kind", ["plain", "wrapped", "ddp", "custom_key", "factory",
                                  "torchscript", "pickle", "pickle_in_dict"])
def test_same_weights_give_the_same_predictions_whatever_the_file_kind(kind, files, network):
    loaded = load(files[kind], sigma=0.25, num_classes=3, mean=MEAN, std=STD,
                  **_options(kind, files))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = network(Standardize(MEAN, STD)(x))
        torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=1e-5)
    assert (loaded.sigma, loaded.num_classes) == (0.25, 3)
    assert loaded.normalization == {"mean": MEAN, "std": STD}
    assert not loaded.model.training


def test_how_a_state_dict_was_found_is_in_the_config(files):
    loaded = load(files["wrapped"], sigma=0.5, num_classes=3, normalize=False, model=SPEC)
    assert loaded.format == "state_dict" and loaded.normalization is None
    assert loaded.config == {"format": "state_dict", "model": SPEC, "model_kwargs": {},
                             "state_dict_key": "model"}


def test_a_torchscript_archive_needs_no_spec_and_no_class_count(files):
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not shown
        warnings.simplefilter("error", FutureWarning)
        loaded = load(files["torchscript"], sigma=0.5, normalize=False)
    assert (loaded.format, loaded.num_classes) == ("torchscript", 3)


def test_the_model_reads_pixels_through_the_standardisation_given(files, network):
    unnormalised = load(files["plain"], sigma=0.5, num_classes=3, normalize=False, model=SPEC)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unnormalised.model(x), network(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- refusals, one line each


def test_a_pickled_model_is_refused_without_trust_pickle(files):
    with pytest.raises(UnsafeCheckpointError) as err:
        load(files["pickle"], sigma=0.5, normalize=False)
    text = _one_line(err)
    assert "trust_pickle=True" in text and "--trust-pickle" in text and "runs the code" in text


@pytest.mark.parametrize("options, error, message", [
    ({"model": SPEC, "num_classes": 4}, CheckpointError,
     r"do not fit model 'torchvision:mobilenet_v3_small' with 4 classes: wrong shape "
     r"'classifier\.3\.weight' \(3, 1024\) instead of \(4, 1024\)"),
    ({"model": "torchvision:resnet18", "num_classes": 3}, CheckpointError,
     r"do not fit model 'torchvision:resnet18' with 3 classes: missing 'conv1\.weight'"),
    ({"model": SPEC, "dataset": "cifar10"}, CheckpointError, r"with 10 classes: wrong shape"),
    ({"num_classes": 3}, ValueError, r"model: .* holds a state_dict, which does not say its "
     r"architecture; give model \(--model\), one of: a smoothcert model \(lenet, "),
    ({"model": SPEC}, ValueError, r"num_classes: .* give num_classes \(--num-classes\)"),
    ({"model": SPEC, "num_classes": 3, "state_dict_key": "weights"}, CheckpointError,
     r"holds no state_dict \(names -> tensors\) under 'weights'"),
])
def test_what_does_not_fit_is_named(files, options, error, message):
    with pytest.raises(error, match=message) as err:
        load(files["plain"], sigma=0.5, normalize=False, **options)
    _one_line(err)


def test_a_model_whose_output_is_not_the_class_count_is_refused(files):
    with pytest.raises(ValueError, match=r"num_classes: the model in .*scripted\.pt' outputs 3 "
                       r"classes on a probe input, but num_classes has 10") as err:
        load(files["torchscript"], sigma=0.5, num_classes=10, normalize=False)
    _one_line(err)
    with pytest.raises(ValueError, match=r"outputs 3 classes .* but dataset 'mnist' has 10"):
        load(files["torchscript"], sigma=0.5, dataset="mnist", channels=3, normalize=False)


@pytest.mark.parametrize("options, message", [
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, r"mean/std: 2 values for 3-channel input"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2]}, r"one value per channel each, got 3 and 1"),
    ({"mean": MEAN, "std": [0.2, 0.0, 0.2]}, r"std must be positive"),
    ({}, r"the model's expected input is unknown; give mean and std .* normalize=False"),
    ({"mean": MEAN, "std": STD, "normalize": False}, r"not both"),
])
def test_the_input_convention_must_be_stated_and_fit(files, options, message):
    with pytest.raises(ValueError, match=message) as err:
        load(files["torchscript"], sigma=0.5, **options)
    _one_line(err)


def test_a_torchscript_archive_refuses_a_spec_and_sigma_is_required(files):
    with pytest.raises(ValueError, match="TorchScript archive, which holds its architecture"):
        load(files["torchscript"], sigma=0.5, normalize=False, model=SPEC)
    with pytest.raises(ValueError, match="sigma: .* does not record the noise level"):
        load(files["torchscript"], normalize=False)
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        load(files["torchscript"], sigma=-1.0, normalize=False)


def test_a_damaged_torchscript_archive_is_one_line(files, tmp_path):
    data = files["torchscript"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load(cut, sigma=0.5, normalize=False)
    _one_line(err)


# ---------------------------------------------------------------- smoothcert's and Cohen's files


def test_load_reads_sigma_classes_and_standardisation_from_a_smoothcert_checkpoint(tmp_path):
    model = build_model("lenet", "mnist")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": model.state_dict(),
                           "config": {"model": "lenet", "dataset": "mnist", "sigma": 0.5}})
    loaded = load(path)
    assert (loaded.format, loaded.sigma, loaded.num_classes, loaded.dataset) == (
        "smoothcert", 0.5, 10, "mnist")
    assert loaded.normalization["mean"] == pytest.approx([0.1307])
    assert loaded.normalization["std"] == pytest.approx([0.3081])
    assert loaded.config["model"] == "lenet" and load(path, sigma=0.25).sigma == 0.25
    with pytest.raises(ValueError, match="mean/std: .* carries its standardisation"):
        load(path, normalize=False)
    with pytest.raises(ValueError, match="arch: .* holds a 'lenet' model"):
        load(path, model="cifar_resnet20")


@needs_interop
def test_load_reads_a_cohen_checkpoint_with_the_sigma_given():
    loaded = load(INTEROP / "cohen_cifar_resnet20.pth.tar", sigma=0.25)
    assert (loaded.format, loaded.dataset, loaded.num_classes) == ("cohen", "cifar10", 10)
    assert loaded.normalization["std"] == pytest.approx([0.2023, 0.1994, 0.2010])


def test_load_is_exported():
    assert smoothcert.load is load and smoothcert.Loaded.__name__ == "Loaded"
    assert smoothcert.build_from_spec is build_from_spec


# ---------------------------------------------------------------- model specs


def test_every_kind_of_spec_builds_the_class_count():
    for spec in ("cifar_resnet20", "torchvision:resnet18"):
        assert build_from_spec(spec, 7)(torch.rand(1, 3, 32, 32)).shape == (1, 7)


def test_a_timm_spec_builds_when_timm_is_installed():
    pytest.importorskip("timm")
    net = build_from_spec("timm:resnet10t", 5, {"in_chans": 1})
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, 5)


def test_a_timm_spec_never_asks_for_pretrained_weights(monkeypatch):
    timm = pytest.importorskip("timm")
    asked = {}
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: asked.update(kwargs) or
                        nn.Linear(1, 1))
    build_from_spec("timm:resnet18", 3)
    assert asked == {"num_classes": 3, "pretrained": False}


def test_a_timm_spec_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ValueError, match=r"needs timm, .* pip install 'smoothcert\[timm\]'"):
        build_from_spec("timm:resnet18", 3)


def test_a_factory_in_an_importable_module_gets_its_kwargs(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    narrow = build_from_spec("user_models:make", 4, parse_model_kwargs('{"width": 0.5}'))
    wide = build_from_spec("user_models:make", 4)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())


@pytest.mark.parametrize("spec, message", [
    ("cifar_resnet2", r"model must be a smoothcert model \(lenet, .*\), torchvision:NAME, "
     r"timm:NAME, module:callable or path/to/file.py:callable; got 'cifar_resnet2' "
     r"\(did you mean 'cifar_resnet20'\?\)"),
    ("torchvision:resnet1", r"torchvision has no model 'resnet1' .*close: resnet18"),
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz'"),
    ("missing_file.py:make", r"no such file 'missing_file.py'"),
    ("smoothcert.data:no_factory", r"smoothcert.data has no callable 'no_factory'"),
    ("smoothcert.data:DATASETS", r"has no callable 'DATASETS'"),
])
def test_an_unknown_spec_says_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        build_from_spec(spec, 3)
    _one_line(err)


def test_a_factory_file_that_fails_to_import_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(ValueError, match=r"importing .*broken\.py' failed .*ModuleNotFoundError: "
                       r"No module named 'no_such_module_xyz'") as err:
        build_from_spec(f"{tmp_path / 'broken.py'}:make", 3)
    _one_line(err)


@pytest.mark.parametrize("spec, kwargs, message", [
    ("torchvision:resnet18", {"no_such_option": 1}, r"cannot be built with num_classes=3 and "
     r"model_kwargs \{'no_such_option': 1\}"),
    ("torchvision:resnet18", {"num_classes": 5}, r"must not hold num_classes"),
    ("smoothcert.data:dataset_info", {}, r"cannot be built|returned a"),
])
def test_a_builder_that_does_not_build_is_one_line(spec, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        build_from_spec(spec, 3, kwargs)
    _one_line(err)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", r"model_kwargs must be a JSON object.*got list"),
    ("{width: 1}", r"model_kwargs must be a JSON object.*is not JSON"),
])
def test_model_kwargs_must_be_a_json_object(text, message):
    with pytest.raises(ValueError, match=message):
        parse_model_kwargs(text)
    assert parse_model_kwargs(None) == {} and parse_model_kwargs('{"a": 1}') == {"a": 1}


# ---------------------------------------------------------------- ImageFolder


def test_an_image_folder_keeps_its_class_names_and_sizes(folder):
    info = dataset_info("imagefolder", folder)
    assert (info.num_classes, info.channels, info.classes) == (3, 3, CLASSES)
    assert info.image_size == 36 and info.mean is None  # the first image's shorter side
    test = get_dataset("imagefolder", "test", folder, image_size=24)  # test falls back to val/
    assert len(test) == 12 and test[0][0].shape == (3, 24, 24)
    assert [test[i][1] for i in range(0, 12, 4)] == [0, 1, 2] and test.classes == list(CLASSES)


def test_an_image_folder_trains_on_random_crops_and_evaluates_on_centre_crops(folder):
    train = get_dataset("imagefolder", "train", folder, image_size=16)
    plain = get_dataset("imagefolder", "train", folder, image_size=16, augment=False)
    assert train[0][0].shape == plain[0][0].shape == (3, 16, 16)
    assert "RandomResizedCrop" in repr(train.transform) and "CenterCrop" in repr(plain.transform)


def test_auto_mean_and_std_come_from_the_training_split(folder):
    info = dataset_info("imagefolder", folder, mean="auto", std="auto")
    a, b = np.array(COLOUR_A) / 255, np.array(COLOUR_B) / 255
    assert info.mean == pytest.approx((a + b) / 2, abs=1e-6)
    assert info.std == pytest.approx(abs(a - b) / 2, abs=1e-6)
    given = dataset_info("imagefolder", folder, mean=MEAN, std=STD)
    assert (given.mean, given.std) == (tuple(MEAN), tuple(STD))


@pytest.mark.parametrize("options, message", [
    ({"mean": [0.5], "std": [0.2]}, r"mean: the data has 3 channel\(s\), so mean needs 3"),
    ({"mean": "auto"}, r"mean/std: give both, both 'auto', or neither"),
    ({"image_size": 0}, r"image_size must be a positive integer, got 0"),
])
def test_an_image_folder_refuses_what_does_not_fit(folder, options, message):
    with pytest.raises(ValueError, match=message):
        dataset_info("imagefolder", folder, **options)


def test_splits_with_different_classes_are_refused(folder, tmp_path):
    for split, names in (("train", CLASSES), ("test", CLASSES[:2])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    with pytest.raises(ValueError, match=r"different class folders \(emu in only one\); labels "
                       r"would change meaning"):
        dataset_info("imagefolder", tmp_path)


def test_an_image_folder_needs_its_folder(tmp_path):
    with pytest.raises(ValueError, match="data_dir: --dataset imagefolder needs --data-dir"):
        dataset_info("imagefolder")
    with pytest.raises(FileNotFoundError, match="has none of train/, val/, test/"):
        dataset_info("imagefolder", tmp_path)


def test_a_loaded_model_is_checked_against_the_folder(folder, files):
    info = dataset_info("imagefolder", folder, image_size=32)
    loaded = load(files["torchscript"], sigma=0.5, num_classes=info.num_classes,
                  image_size=info.image_size, normalize=False)
    x, label = get_dataset("imagefolder", "val", folder, image_size=32)[0]
    assert loaded.model(x[None]).shape == (1, 3) and label == 0
    with pytest.raises(ValueError, match="outputs 3 classes on a probe input, but num_classes"):
        load(files["torchscript"], sigma=0.5, num_classes=4, normalize=False)


# ---------------------------------------------------------------- npz arrays


def test_the_shared_cifar_subset_reads_as_npz(cifar_npz):
    info = dataset_info("npz", data_file=cifar_npz)
    assert (info.num_classes, info.channels, info.image_size) == (10, 3, 32)
    test = get_dataset("npz", "test", data_file=cifar_npz)
    with np.load(cifar_npz) as arrays:
        x, y = arrays["x_test"], arrays["y_test"]
    assert len(test) == len(y) and test.targets[:5] == y[:5].tolist()
    image, label = test[3]
    torch.testing.assert_close(image, torch.from_numpy(x[3]).permute(2, 0, 1).float() / 255)
    assert label == y[3]


def _save(path: Path, x_train, y_train, x_test=None, y_test=None) -> Path:
    x_test = x_train if x_test is None else x_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_train if y_test is None else y_test)
    return path


def test_float_nchw_arrays_and_classes_from_both_splits(tmp_path):
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    path = _save(tmp_path / "f.npz", x, np.array([0, 1, 1, 0]), x, np.array([0, 4, 2, 0]))
    info = dataset_info("npz", data_file=path, mean="auto", std="auto")
    assert (info.num_classes, info.channels, info.image_size) == (5, 1, 8)
    assert info.mean == pytest.approx([x.mean()]) and info.std == pytest.approx([x.std()])
    torch.testing.assert_close(get_dataset("npz", "train", data_file=path)[2][0],
                               torch.from_numpy(x[2]))


@pytest.mark.parametrize("arrays, message", [
    ((np.full((2, 1, 4, 4), 1.5, np.float32), np.array([0, 1])), r"floats outside \[0, 1\]"),
    ((np.zeros((2, 4, 4), np.uint8), np.array([0, 1])), r"must be 4-D"),
    ((np.zeros((2, 4, 4, 3), np.int32), np.array([0, 1])), r"must be uint8 NHWC or float NCHW"),
    ((np.zeros((2, 4, 6, 3), np.uint8), np.array([0, 1])), r"images must be square, got 4x6"),
    ((np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1, 1])), r"one label per image"),
    ((np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 0])), r"name 1 class\(es\)"),
])
def test_npz_arrays_that_do_not_fit_are_named(tmp_path, arrays, message):
    path = _save(tmp_path / "bad.npz", *arrays)
    with pytest.raises(ValueError, match=message) as err:
        dataset_info("npz", data_file=path)
    assert str(path) in _one_line(err)


def test_npz_refuses_another_image_size_and_a_missing_file(cifar_npz, tmp_path):
    with pytest.raises(ValueError, match=r"image_size: the images in .* are 32x32 \(arrays are "
                       r"not resized\); leave image_size out or give 32, got 28"):
        dataset_info("npz", data_file=cifar_npz, image_size=28)
    with pytest.raises(ValueError, match="data_file: --dataset npz needs --data-file"):
        get_dataset("npz", "test")
    with pytest.raises(FileNotFoundError, match="data_file: no such file"):
        get_dataset("npz", "test", data_file=tmp_path / "none.npz")
