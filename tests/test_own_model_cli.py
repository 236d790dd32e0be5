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
