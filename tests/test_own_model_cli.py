"""certify/predict/verify/analyze of a user's own model on a user's own data, from the
command line and from Python (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import cli

import smoothcert
from smoothcert.in_memory import state_dict_sha256
from smoothcert.models.spec import build_from_spec

SPEC = "torchvision:resnet18"
CLASSES = ("ant", "bee", "cow")
SIZE = 16
TINY = ["--N", "20", "--n0", "4", "--batch", "20", "--sigma", "0.25", "--alpha", "0.1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, name in enumerate(CLASSES):
            where = root / split / name
            where.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels).save(where / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "resnet18.pt"
    torch.save(build_from_spec(SPEC, len(CLASSES)).state_dict(), path)
    return path


def _certify(capsys, weights: Path, folder: Path, out: Path, *more: str) -> tuple[int, str, str]:
    return cli(capsys, "certify", str(weights), "--model", SPEC, "--no-normalize",
               "--dataset", "imagefolder", "--data-dir", str(folder), "--out", str(out),
               *TINY, *more)


def test_certify_a_torchvision_state_dict_on_an_imagefolder(capsys, weights, folder, tmp_path):
    out = tmp_path / "r.tsv"
    code, _, err = _certify(capsys, weights, folder, out, "--max-examples", "3")
    assert code == 0, err
    sidecar = json.loads(out.with_name("r.tsv.json").read_text())
    assert sidecar["model"] == SPEC and sidecar["normalization"] == "none"
    assert sidecar["classes"] == list(CLASSES) and sidecar["num_classes"] == 3
    code, text, err = cli(capsys, "verify", str(out), "--data-dir", str(folder))
    assert code == 0, text + err
    assert "labels checked" in text + err
    code, text, _ = cli(capsys, "analyze", str(out))
    assert code == 0 and "T-CERTIFY" in text
    # resumed: the same run, nothing left to do; more normalisation is another run
    assert _certify(capsys, weights, folder, out, "--max-examples", "3")[0] == 0
    code, _, err = cli(capsys, "certify", str(weights), "--model", SPEC, "--mean", "0.5",
                       "--std", "0.5", "--dataset", "imagefolder", "--data-dir", str(folder),
                       "--out", str(out), *TINY, "--max-examples", "3")
    assert code == 2 and "normalization" in err


@pytest.mark.parametrize(("more", "message"), [
    (["--model", "torchvision:resnet34", "--no-normalize"], "model"),
    (["--model", SPEC, "--no-normalize", "--model-kwargs", '{"num_classes": 5}'], "classes"),
    (["--model", SPEC, "--mean", "0.5,0.5", "--std", "0.2,0.2"], "mean"),
    (["--model", SPEC, "--no-normalize", "--image-size", "0"], "--image-size"),
    (["--model", SPEC], "mean/std"),
    (["--no-normalize"], "--model"),
])
def test_mistakes_are_one_line_usage_errors(capsys, weights, folder, tmp_path, more, message):
    code, _, err = cli(capsys, "certify", str(weights), "--dataset", "imagefolder",
                       "--data-dir", str(folder), "--out", str(tmp_path / "r.tsv"), *TINY,
                       "--max-examples", "1", *more)
    assert code == 2, err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1]
    assert not (tmp_path / "r.tsv").exists()


# ---------------------------------------------------------------- from Python


class _Pairs(torch.utils.data.Dataset):
    """Ten 1x8x8 images in [0, 1] with labels 0..2."""

    def __init__(self) -> None:
        self.x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], i % 3


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))


SMALL = dict(n0=4, n=20, batch=20, alpha=0.1)


def test_certify_dataset_writes_a_verifiable_resumable_file(tmp_path):
    from smoothcert.verify import verify

    out = tmp_path / "mem.tsv"
    model = _small_model()
    assert smoothcert.certify_dataset(model, _Pairs(), sigma=0.25, out=out, max=4,
                                      **SMALL) == out
    sidecar = json.loads(out.with_name("mem.tsv.json").read_text())
    assert sidecar["checkpoint_sha256"] == state_dict_sha256(model)
    assert sidecar["num_classes"] == 3 and sidecar["dataset"] == "_Pairs"
    rows = out.read_text().splitlines()
    assert len(rows) == 5
    # resumed: the four rows are kept as written, six more certified
    smoothcert.certify_dataset(model, _Pairs(), sigma=0.25, out=out, **SMALL)
    assert out.read_text().splitlines()[:5] == rows and len(out.read_text().splitlines()) == 11
    assert verify(out) == (10, [])
    with torch.no_grad():
        model[1].bias += 1  # other weights: another run's rows
    with pytest.raises(ValueError, match="another checkpoint"):
        smoothcert.certify_dataset(model, _Pairs(), sigma=0.25, out=out, **SMALL)
    predicted = smoothcert.predict_dataset(model, _Pairs(), sigma=0.25, out=tmp_path / "p.tsv",
                                           max=2, n=20, batch=20, alpha=0.1)
    assert len(predicted.read_text().splitlines()) == 3


def test_certify_dataset_refuses_a_file_option_and_a_wrong_class_count(tmp_path):
    with pytest.raises(TypeError, match="dataset_dir|data_dir"):
        smoothcert.certify_dataset(_small_model(), _Pairs(), sigma=0.25, out=tmp_path / "r",
                                   data_dir="x")
    with pytest.raises(ValueError, match="outputs 3 classes, num_classes is 10"):
        smoothcert.certify_dataset(_small_model(), _Pairs(), sigma=0.25, out=tmp_path / "r",
                                   num_classes=10)


def test_smooth_certify_refuses_a_batch_and_names_certify_dataset():
    smooth = smoothcert.Smooth(_small_model(), 3, 0.25)
    with pytest.raises(ValueError, match="one example.*certify_dataset"):
        smooth.certify(torch.rand(2, 1, 8, 8), 4, 20, 0.1, 20)
    assert smooth.certify(torch.rand(1, 8, 8), 4, 20, 0.1, 20)[1] >= 0  # 1-channel image


# ---------------------------------------------------------------- train


def _train(capsys, folder: Path, out: Path, model: str, *more: str) -> tuple[int, str, str]:
    return cli(capsys, "train", "--model", model, "--dataset", "imagefolder", "--data-dir",
               str(folder), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--epochs", "1",
               "--batch", "9", "--eval-subset", "0", "--sigma", "0.25", "--out", str(out), *more)


def test_train_on_an_imagefolder_then_certify_and_resume(capsys, folder, tmp_path):
    run = tmp_path / "run"
    code, _, err = _train(capsys, folder, run, SPEC)
    assert code == 0, err
    built = json.loads((run / "config.json").read_text())["built_for"]
    assert built["classes"] == list(CLASSES) and built["num_classes"] == 3
    assert built["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    out = tmp_path / "r.tsv"
    code, _, err = cli(capsys, "certify", str(run / "checkpoint.pt"), "--data-dir", str(folder),
                       "--out", str(out), *TINY, "--max-examples", "2")
    assert code == 0, err
    sidecar = json.loads(out.with_name("r.tsv.json").read_text())
    assert sidecar["dataset"] == "imagefolder" and sidecar["classes"] == list(CLASSES)
    code, _, err = _train(capsys, folder, run, "torchvision:resnet34", "--resume",
                          "--epochs", "2")
    assert code == 2 and "different model" in err.strip().splitlines()[-1]


def test_train_refuses_data_options_of_another_dataset(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--dataset", "mnist", "--mean", "0.5", "--std", "0.2",
                       "--out", str(tmp_path / "run"))
    assert code == 2 and "mean applies to dataset imagefolder or npz" in err
    assert not (tmp_path / "run").exists()


def test_verify_checks_npz_labels_against_the_data_file(capsys, weights, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1])
    arrays, relabelled = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(arrays, x_train=x, y_train=y, x_test=x, y_test=y)
    np.savez(relabelled, x_train=x, y_train=y, x_test=x, y_test=np.array([0, 1, 2, 2]))
    out = tmp_path / "r.tsv"
    code, _, err = cli(capsys, "certify", str(weights), "--model", SPEC, "--no-normalize",
                       "--dataset", "npz", "--data-file", str(arrays), "--out", str(out), *TINY)
    assert code == 0, err
    code, _, err = cli(capsys, "verify", str(out), "--data-file", str(arrays))
    assert code == 0 and f"labels checked against npz test ({arrays})" in err
    code, text, _ = cli(capsys, "verify", str(out), "--data-file", str(relabelled))
    assert code == 1 and "(idx 3): label 1, but npz test" in text
    assert "labels example 3 as 2" in text
    code, _, err = cli(capsys, "verify", str(out))
    assert code == 0 and "labels not checked: the npz labels need --data-file" in err


def test_user_keys_enter_the_fingerprint_only_where_set():
    from smoothcert.sidecar import IDENTITY_KEYS, Sidecar

    base = Sidecar.build({}, mode="certify", n=100, sigma=0.25)
    assert set(base.identity()) == set(IDENTITY_KEYS)  # as before issue 23: old runs keep theirs
    assert Sidecar.build({}, mode="certify", n=100, sigma=0.25, model=None).run == base.run
    other = Sidecar.build({}, mode="certify", n=100, sigma=0.25, normalization="none")
    assert other.run != base.run and "normalization" not in base.to_json()
    assert "normalization (was None, now 'none')" in base.differences(other)
