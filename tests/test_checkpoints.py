"""Checkpoint loading: the field's formats against files their own code wrote, and bad files.

The fixtures in ../shared/interop were written by locuslab/smoothing, smoothing-consistency and
MACER themselves, each with the logits the original model returns on 8 inputs.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CIFAR_NPZ, CIFAR_SUBSET, INTEROP, needs_interop
from test_cli import cli
from torch import nn
from torchvision.models import resnet50

import smoothcert
from smoothcert import io as sc_io
from smoothcert.checkpoints import (
    ARCHITECTURES,
    FORMATS,
    detect_format,
    load_checkpoint,
    load_for_run,
)
from smoothcert.io import WEIGHTS_DIGEST, CheckpointError, weights_digest
from smoothcert.models import Standardize
from smoothcert.models.lenet_20_50 import lenet_20_50
from smoothcert.train import CHECKPOINT, load_model, train

COHEN_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# (file, format auto must find, arch to give, dataset, mean/std of the first layer)
FIXTURES = [
    ("cohen_cifar_resnet20.pth.tar", "cohen", None, "cifar10", COHEN_CIFAR),
    ("cohen_cifar_resnet110.pth.tar", "cohen", None, "cifar10", COHEN_CIFAR),
    ("consistency_lenet.pth.tar", "cohen", None, "mnist", ((0.0,), (1.0,))),
    ("macer_resnet110.pth", "macer", "resnet110", "cifar10", ((0.0,), (1.0,))),
    ("macer_lenet.pth", "macer", "lenet", "mnist", ((0.0,), (1.0,))),
]


def reference(name: str) -> dict[str, torch.Tensor]:
    stem = name.removesuffix(".tar").removesuffix(".pth")
    return torch.load(INTEROP / f"{stem}.reference.pt", weights_only=True)


def max_logit_error(model: nn.Module, ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Max abs difference from the reference logits, and the float32 tolerance for them.

    The tolerance is 1e-4, or a few float32 roundings of the largest logit where the random
    ResNet-110s produce logits of 1e11 (where one rounding step is already 1e4).
    """
    with torch.no_grad():
        logits = model(ref["x"])
    assert logits.shape == ref["logits"].shape
    scale = ref["logits"].abs().max().item()
    return (logits - ref["logits"]).abs().max().item(), max(1e-4, 1e-6 * scale)


# ---------------------------------------------------------------- the published formats


@needs_interop
@pytest.mark.parametrize(("name", "fmt", "arch", "dataset", "norm"), FIXTURES)
def test_every_fixture_reproduces_its_reference_logits(name, fmt, arch, dataset, norm):
    path = INTEROP / name
    assert detect_format(torch.load(path, weights_only=True), path) == fmt
    ref = reference(name)
    for given in ("auto", fmt):
        model = load_checkpoint(path, format=given, arch=arch)
        assert not model.training
        assert all(t.device.type == "cpu" for t in model.state_dict().values())
        standardize = model[0]
        assert isinstance(standardize, Standardize)
        assert standardize.mean.tolist() == pytest.approx(norm[0])
        assert standardize.std.tolist() == pytest.approx(norm[1])
        error, tolerance = max_logit_error(model, ref)
        assert error <= tolerance, f"{name}: max abs logit difference {error}"
    _, dataset_name, sigma = load_for_run(path, arch=arch, sigma=0.25)
    assert (dataset_name, sigma) == (dataset, 0.25)


@needs_interop
def test_cohen_mean_and_std_come_from_cohens_code_not_smoothcerts_cifar10():
    # smoothcert's own CIFAR-10 std (0.2470, ...) would move every logit: the fixture tells.
    model = load_checkpoint(INTEROP / "cohen_cifar_resnet20.pth.tar")
    ref = reference("cohen_cifar_resnet20.pth.tar")
    model[0] = Standardize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    error, tolerance = max_logit_error(model, ref)
    assert error > 100 * tolerance


def test_load_checkpoint_is_exported_lazily():
    assert smoothcert.load_checkpoint is load_checkpoint
    assert "load_checkpoint" in smoothcert.__all__


def test_one_name_per_checkpoint_reader():
    """load_checkpoint is the model of any checkpoint; io's verified state dict has its own name."""
    assert not hasattr(sc_io, "load_checkpoint")
    assert load_checkpoint.__module__ == "smoothcert.checkpoints"
    assert callable(sc_io.read_checkpoint_state)


class CohenNormalize(nn.Module):
    """Cohen et al.'s NormalizeLayer as published: (x - mean) / std, with no state."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]


def test_imagenet_resnet50_in_cohens_dataparallel_layout(tmp_path):
    torch.manual_seed(0)
    net = resnet50(weights=None)
    for module in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    original = nn.Sequential(
        CohenNormalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), nn.DataParallel(net)
    ).eval()
    state = original.state_dict()
    assert next(iter(state)) == "1.module.conv1.weight"
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
    model = load_checkpoint(path)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-4)
    assert load_for_run(path, sigma=0.5)[1:] == ("imagenet", 0.5)


def test_a_cohen_file_without_arch_loads_with_format_and_arch(tmp_path):
    net = lenet_20_50()
    state = {f"1.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "no_arch.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="--checkpoint-format cohen --model"):
        load_checkpoint(path)
    model = load_checkpoint(path, format="cohen", arch="lenet")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


# ---------------------------------------------------------------- wrong arguments


@needs_interop
@pytest.mark.parametrize(
    ("name", "options", "error", "message"),
    [
        ("macer_lenet.pth", {}, ValueError, r"arch: .*give --model, one of resnet110, lenet"),
        ("macer_lenet.pth", {"arch": "vgg"}, ValueError, r"arch: .*resnet110, lenet; got 'vgg'"),
        ("macer_resnet110.pth", {"arch": "lenet"}, CheckpointError,
         r"do not fit macer architecture 'lenet': missing 'conv1.bias'.*unexpected 'bn1"),
        ("cohen_cifar_resnet20.pth.tar", {"arch": "lenet"}, ValueError,
         r"arch: .* names its architecture 'cifar_resnet20'"),
        ("cohen_cifar_resnet20.pth.tar", {"dataset": "mnist"}, ValueError,
         r"dataset: .* holds a 'cifar10' model"),
        ("cohen_cifar_resnet20.pth.tar", {"format": "macer"}, CheckpointError,
         r"not a macer-format checkpoint .* keys 'epoch', 'arch', 'state_dict', 'optimizer'"),
        ("cohen_cifar_resnet20.pth.tar", {"format": "smoothcert"}, CheckpointError,
         "not a smoothcert checkpoint"),
        ("cohen_cifar_resnet20.pth.tar", {"format": "caffe"}, ValueError,
         "format must be auto or one of smoothcert, cohen, macer"),
    ],
)
def test_wrong_arguments_are_named(name, options, error, message):
    with pytest.raises(error, match=message) as err:
        load_checkpoint(INTEROP / name, **options)
    assert name in str(err.value) or options.get("format") == "caffe"  # an argument, not a file


@needs_interop
def test_an_unsupported_cohen_architecture_lists_the_supported_ones(tmp_path):
    state = torch.load(INTEROP / "cohen_cifar_resnet20.pth.tar", weights_only=True)
    state["arch"] = "cifar_wrn"
    path = tmp_path / "wrn.pth.tar"
    torch.save(state, path)
    with pytest.raises(ValueError, match="cifar_resnet20, cifar_resnet110, resnet50, lenet; got "
                       "'cifar_wrn'"):
        load_checkpoint(path)


@needs_interop
def test_a_foreign_checkpoint_needs_sigma():
    with pytest.raises(ValueError, match=r"sigma: .*cohen_cifar_resnet20.* give --sigma"):
        load_for_run(INTEROP / "cohen_cifar_resnet20.pth.tar")


# ---------------------------------------------------------------- bad files


def test_an_unknown_layout_lists_the_formats_and_the_flag(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": {"w": torch.zeros(2)}, "step": 3}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert str(path) in text and "keys 'weights', 'step'" in text
    for fmt in FORMATS:
        assert fmt in text
    assert "--checkpoint-format" in text and "name it with --model SPEC" in text


@pytest.mark.parametrize(
    ("content", "expected", "wrong"),
    [
        (b"", "is empty (0 bytes)", "()"),
        (b"epoch 3, loss 0.2\nnot a checkpoint\n", "is not a PyTorch checkpoint (it is a text "
         "file", "objects other than tensors"),
        (b"\x00\x01\x02binary", "neither a zip archive nor a pickle stream", "text file"),
    ],
)
def test_files_that_are_no_checkpoint_at_all(tmp_path, content, expected, wrong):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    for load in (sc_io.read_checkpoint_state, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            load(path)
        text = str(err.value)
        assert expected in text and str(path) in text and wrong not in text
        assert not text.endswith("()")


@needs_interop
def test_a_truncated_foreign_checkpoint_says_so(tmp_path):
    data = (INTEROP / "macer_lenet.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"'.*cut\.pth' is truncated or corrupted"):
        load_checkpoint(path, arch="lenet")


@pytest.mark.parametrize("where", ["open", "torch.load"])
def test_a_permission_error_is_not_called_truncated(tmp_path, monkeypatch, where):
    # Tests run as root here, where chmod 000 does not stop a read: raise the error instead.
    path = tmp_path / "model.pt"
    torch.save({"model": {}, "config": {}}, path)
    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    if where == "open":
        monkeypatch.setattr(builtins, "open", refuse)
    else:
        monkeypatch.setattr(torch, "load", lambda file, **_: refuse(file))
    with pytest.raises(CheckpointError) as err:
        sc_io.read_checkpoint_state(path)
    assert f"cannot read '{path}': Permission denied" in str(err.value)
    assert "truncated" not in str(err.value)


def test_a_damaged_pickle_stream_is_corrupt_not_a_refusal(tmp_path):
    path = tmp_path / "damaged.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    data = bytearray(path.read_bytes())
    stream = data.find(b"\x80\x02", data.find(b"data.pkl"))  # the pickle inside the zip
    data[stream + 2] = 0xFF  # no pickle opcode
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"'{path}' is corrupted") as err:
        sc_io.read_checkpoint_state(path)
    assert "refusing" not in str(err.value)


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this would create a file: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_cohen_file_that_would_run_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth.tar"
    state = {f"1.{k}": v for k, v in lenet_20_50().state_dict().items()}
    torch.save({"arch": "lenet", "state_dict": state, "extra": Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="refusing to load it") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "Unsupported global" in str(err.value)
    assert "._touch" in str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


class SystemCall:
    """Unpickling this would run a shell command (os.system), as a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload", [SystemCall, Payload])
def test_a_refused_pickle_says_what_to_do_without_relaying_torchs_unsafe_advice(
        tmp_path, legacy, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as err:
        sc_io.read_checkpoint_state(path)
    message = str(err.value)
    assert "weights_only" not in message and "will likely succeed" not in message
    assert "safe_globals" not in message and "\n" not in message
    assert "Unsupported global: GLOBAL " in message  # names what it would call
    assert "never runs it" in message and "state_dict()" in message
    assert not marker.exists()


# ---------------------------------------------------------------- smoothcert's checksum


def test_weights_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    weights = {"b": torch.tensor([1.5, -2.0]), "a": torch.tensor(7, dtype=torch.int64)}
    expected = hashlib.sha256()
    expected.update(b"a|torch.int64|()\n" + (7).to_bytes(8, "little"))
    expected.update(b"b|torch.float32|(2,)\n" + bytes.fromhex("0000c03f000000c0"))
    assert weights_digest(weights) == expected.hexdigest()
    assert weights_digest(dict(reversed(weights.items()))) == expected.hexdigest()
    changed = [
        {**weights, "b": torch.tensor([1.5, -2.0000002])},
        {**weights, "b": torch.tensor([1.5, -2.0], dtype=torch.float64)},
        {**weights, "b": torch.tensor([[1.5, -2.0]])},
        {"c": weights["b"], "a": weights["a"]},
    ]
    assert len({weights_digest(w) for w in changed} | {expected.hexdigest()}) == 5


def test_a_trained_checkpoint_carries_the_checksum_of_its_weights(trained_checkpoint):
    state = torch.load(trained_checkpoint, weights_only=True)
    assert state[WEIGHTS_DIGEST] == weights_digest(state["model"])


def test_flipped_weight_bytes_are_caught(trained_checkpoint, tmp_path):
    state = torch.load(trained_checkpoint, weights_only=True)
    needle = state["model"]["1.3.weight"].numpy().tobytes()[:64]  # the 2nd conv's weights
    data = bytearray(trained_checkpoint.read_bytes())
    at = data.find(needle)
    assert at > 0 and data.find(needle, at + 1) == -1
    data[at + 5] ^= 0x10
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch itself notices nothing
    for load in (sc_io.read_checkpoint_state, load_model, load_checkpoint):
        with pytest.raises(CheckpointError, match=f"'{path}' is corrupted or was modified.*"
                           "do not match the weights_sha256 checksum"):
            load(path)


def test_a_checkpoint_without_checksum_still_loads(trained_checkpoint, tmp_path):
    state = torch.load(trained_checkpoint, weights_only=True)
    del state[WEIGHTS_DIGEST]  # as written before smoothcert stored it
    path = tmp_path / "old.pt"
    torch.save(state, path)
    model, config = load_model(path)
    assert config == state["config"] and not model.training
    load_checkpoint(path)


def test_resume_from_a_checkpoint_without_optimizer_state(tmp_path):
    from smoothcert.presets import resolve_config

    run = tmp_path / "run"
    cfg = resolve_config("mnist-lenet", sigma=0.25, k=1, epochs=1, batch=32, train_subset=32,
                         eval_subset=0, device="cpu", out=str(run))
    train(cfg, progress=False)
    state = torch.load(run / CHECKPOINT, weights_only=True)
    del state["optimizer"]
    torch.save(state, run / CHECKPOINT)
    cfg.epochs = 2
    with pytest.raises(CheckpointError, match=f"resume: '{run / CHECKPOINT}' holds the model but "
                       r"not the training state \(optimizer\)"):
        train(cfg, resume=True, progress=False)


# ---------------------------------------------------------------- the command line


@needs_interop
@pytest.mark.parametrize(
    ("name", "extra", "dataset"),
    [
        ("consistency_lenet.pth.tar", [], "mnist"),
        ("macer_lenet.pth", ["--format", "macer", "--arch", "lenet"], "mnist"),
        ("cohen_cifar_resnet20.pth.tar", ["--data-dir", str(CIFAR_SUBSET)], "cifar10"),
        pytest.param("cohen_cifar_resnet110.pth.tar", ["--data-dir", str(CIFAR_SUBSET)],
                     "cifar10", marks=pytest.mark.slow),
    ],
)
def test_certify_and_predict_a_published_checkpoint(capsys, tmp_path, name, extra, dataset):
    if dataset == "cifar10" and not CIFAR_NPZ.is_file():
        pytest.skip(f"{CIFAR_NPZ} is absent")
    out = tmp_path / "res.tsv"
    code, _, err = cli(capsys, "certify", str(INTEROP / name), "--sigma", "0.25", *extra,
                       "--out", str(out), "--n0", "10", "--N", "100", "--batch", "100",
                       "--max-examples", "2", "--device", "cpu")
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and "tcertify_radius" in lines[0] and "strict_radius" in lines[0]
    sidecar = json.loads(out.with_name("res.tsv.json").read_text())
    assert (sidecar["sigma"], sidecar["dataset"]) == (0.25, dataset)
    code, stdout, err = cli(capsys, "verify", str(out))
    assert code == 0 and "2 rows recomputed" in stdout + err, err
    code, stdout, err = cli(capsys, "predict", str(INTEROP / name), "--sigma", "0.25", *extra,
                            "--out", str(tmp_path / "p.tsv"), "--N", "100", "--batch", "100",
                            "--max-examples", "2", "--device", "cpu")
    assert code == 0 and "abstention rate" in stdout, err


@needs_interop
@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("cohen_cifar_resnet20.pth.tar", [], "error: sigma: "),
        ("macer_lenet.pth", ["--sigma", "0.5"], "error: arch: "),
        ("macer_lenet.pth", ["--sigma", "0.5", "--arch", "lenet", "--dataset", "cifar10"],
         "error: dataset: "),
    ],
)
def test_certify_of_a_published_checkpoint_without_what_it_needs(capsys, tmp_path, name, extra,
                                                                  message):
    out = tmp_path / "res.tsv"
    code, _, err = cli(capsys, "certify", str(INTEROP / name), *extra, "--out", str(out),
                       "--n0", "10", "--N", "10", "--max-examples", "1", "--device", "cpu")
    assert code == 2 and message in err and name in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_native_checkpoints_still_certify_with_format_smoothcert(capsys, trained_checkpoint,
                                                                 tmp_path):
    out = tmp_path / "res.tsv"
    code, _, err = cli(capsys, "certify", str(trained_checkpoint), "--format", "smoothcert",
                       "--out", str(out), "--n0", "10", "--N", "50", "--batch", "50",
                       "--max-examples", "1", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out.with_name("res.tsv.json").read_text())["sigma"] == 0.5
    code, _, err = cli(capsys, "certify", str(trained_checkpoint), "--format", "cohen",
                       "--sigma", "0.5", "--out", str(tmp_path / "x.tsv"))
    assert code == 2 and "not a cohen-format checkpoint" in err


def test_fixture_list_covers_every_architecture():
    covered = {(fmt, arch or {"cohen_cifar_resnet20.pth.tar": "cifar_resnet20",
                              "cohen_cifar_resnet110.pth.tar": "cifar_resnet110",
                              "consistency_lenet.pth.tar": "lenet"}[name])
               for name, fmt, arch, _, _ in FIXTURES}
    covered.add(("cohen", "resnet50"))  # test_imagenet_resnet50_in_cohens_dataparallel_layout
    assert covered == {(fmt, arch) for fmt, table in ARCHITECTURES.items() for arch in table}
