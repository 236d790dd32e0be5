"""`certify/predict CLASSIFIER --denoiser SPEC`: a smoothcert-trained DnCNN or a diffusers folder
in front of the classifier, recorded in the sidecar's identity, verifiable, resumable."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from test_cli import cli
from test_distributed import in_process, torchrun, without_time

from smoothcert import results
from smoothcert.denoise import Denoised
from smoothcert.io import weights_digest
from smoothcert.presets import resolve_config
from smoothcert.runner import RunConfig, Runner
from smoothcert.train import train

diffusers = pytest.importorskip("diffusers")

SMALL_CERTIFY = ["--n0", "10", "--N", "60", "--batch", "60", "--max-examples", "2",
                 "--device", "cpu"]


@pytest.fixture(scope="module")
def denoiser_checkpoint(tmp_path_factory) -> Path:
    """A dncnn_small trained with denoiser-mse for one epoch on 32 MNIST images."""
    cfg = resolve_config(model="dncnn_small", objective="denoiser-mse", sigma=0.5, epochs=1,
                         batch=16, lr=0.01, train_subset=32, eval_subset=0, device="cpu",
                         out=str(tmp_path_factory.mktemp("dncnn") / "run"))
    return train(cfg, progress=False)


def save_ddpm(folder: Path, seed: int = 0, channels: int = 1) -> Path:
    """A tiny random DDPM at 8x8 (the classifier's 28x28 images are resized)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    return save_ddpm(tmp_path_factory.mktemp("ddpm") / "flat")


def certify_and_verify(capsys, classifier: Path, denoiser: str, out: Path, *extra: str) -> dict:
    code, _, err = cli(capsys, "certify", str(classifier), "--denoiser", denoiser,
                       "--out", str(out), *SMALL_CERTIFY, *extra)
    assert code == 0, err
    code, _, err = cli(capsys, "verify", str(out))
    assert code == 0 and "every certificate matches" in err, err
    return json.loads(Path(f"{out}.json").read_text())


def test_certify_behind_a_trained_denoiser_verifies_and_records_it(
        capsys, trained_checkpoint, denoiser_checkpoint, tmp_path):
    meta = certify_and_verify(capsys, trained_checkpoint, str(denoiser_checkpoint),
                              tmp_path / "res.tsv")
    assert meta["denoiser"] == str(denoiser_checkpoint)
    assert meta["denoiser_sha256"] == results.file_sha256(denoiser_checkpoint)
    assert meta["checkpoint_sha256"] == results.file_sha256(trained_checkpoint)
    code, out, err = cli(capsys, "analyze", str(tmp_path / "res.tsv"))
    assert code == 0, err


def test_certify_behind_a_diffusers_folder_verifies_and_records_unet_and_timestep(
        capsys, trained_checkpoint, ddpm_folder, tmp_path):
    meta = certify_and_verify(capsys, trained_checkpoint, f"diffusers:{ddpm_folder}",
                              tmp_path / "res.tsv", "--layout", "certify")
    runner = Runner(RunConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path / "o.tsv"),
                              denoiser=f"diffusers:{ddpm_folder}", device="cpu"), progress=False)
    denoiser = runner.smooth.base_classifier.denoiser
    assert isinstance(runner.smooth.base_classifier, Denoised)
    assert denoiser.sigma == 0.5 and denoiser.timestep > 0  # the run's sigma (the checkpoint's)
    unet = weights_digest(denoiser.unet.state_dict())
    expected = hashlib.sha256(f"{unet}|timestep={denoiser.timestep}".encode()).hexdigest()
    assert meta["denoiser"] == f"diffusers:{ddpm_folder}" and meta["denoiser_sha256"] == expected


def test_predict_the_other_protocols_and_bf16_take_a_denoiser(
        capsys, trained_checkpoint, denoiser_checkpoint, tmp_path):
    code, out, err = cli(capsys, "predict", str(trained_checkpoint), "--denoiser",
                         str(denoiser_checkpoint), "--out", str(tmp_path / "p.tsv"),
                         "--N", "60", "--batch", "60", "--max-examples", "2", "--device", "cpu")
    assert code == 0 and "abstention rate" in out, err
    for name, options in [("radii", ("--radii", "0.25", "--max-n", "200")),
                          ("adaptive", ("--adaptive-n", "--max-n", "200")),
                          ("bf16", ("--amp", "bf16", "--no-channels-last"))]:
        certify_and_verify(capsys, trained_checkpoint, str(denoiser_checkpoint),
                           tmp_path / f"{name}.tsv", *options)


def test_the_run_fingerprint_covers_the_denoiser_and_resume_refuses_another(
        capsys, trained_checkpoint, denoiser_checkpoint, ddpm_folder, tmp_path):
    out = tmp_path / "res.tsv"
    certify_and_verify(capsys, trained_checkpoint, f"diffusers:{ddpm_folder}", out)
    other = save_ddpm(tmp_path / "other", seed=1)
    for denoiser in (f"diffusers:{other}", str(denoiser_checkpoint)):
        code, _, err = cli(capsys, "certify", str(trained_checkpoint), "--denoiser", denoiser,
                           "--out", str(out), *SMALL_CERTIFY)
        assert code == 2 and "holds results of another denoiser" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "certify", str(trained_checkpoint), "--out", str(out),
                       *SMALL_CERTIFY)
    assert code == 2 and "another denoiser" in err and "now none" not in err, err
    assert "this run's is none" in err


def test_without_a_denoiser_the_sidecar_has_no_denoiser_keys(capsys, trained_checkpoint,
                                                              tmp_path):
    code, _, err = cli(capsys, "certify", str(trained_checkpoint), "--out",
                       str(tmp_path / "res.tsv"), *SMALL_CERTIFY)
    assert code == 0, err
    meta = json.loads((tmp_path / "res.tsv.json").read_text())
    assert "denoiser" not in meta and "denoiser_sha256" not in meta


def test_a_denoiser_as_the_classifier_or_a_classifier_as_the_denoiser_is_one_line(
        capsys, trained_checkpoint, denoiser_checkpoint, tmp_path):
    cases = [
        ((str(denoiser_checkpoint),), "is a denoiser, not a classifier"),
        ((str(trained_checkpoint), "--denoiser", str(trained_checkpoint)),
         "denoiser: .* is a classifier"),
        ((str(trained_checkpoint), "--denoiser", str(tmp_path / "missing.pt")),
         "denoiser: .*missing.pt' is not a file"),
        ((str(trained_checkpoint), "--denoiser", f"diffusers:{tmp_path}"),
         "denoiser: .* holds neither config.json"),
        ((str(trained_checkpoint), "--denoiser",
          f"diffusers:{save_ddpm(tmp_path / 'rgb', channels=3)}"),
         "denoiser: .* denoises 3-channel images, but the classifier reads 1-channel ones"),
    ]
    for argv, message in cases:
        code, _, err = cli(capsys, "certify", *argv, "--out", str(tmp_path / "r.tsv"),
                           *SMALL_CERTIFY)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(message, err), err


@pytest.mark.slow  # a torchrun launch: two processes that import torch
def test_two_processes_certify_behind_a_denoiser_the_rows_of_one(
        trained_checkpoint, denoiser_checkpoint, tmp_path):
    args = [str(trained_checkpoint), "--denoiser", str(denoiser_checkpoint), "--n0", "10",
            "--N", "60", "--batch", "60", "--max-examples", "4"]
    in_process(["certify", *args, "--out", str(tmp_path / "one.tsv")])
    torchrun(["certify", *args, "--out", "two.tsv"], tmp_path)
    assert without_time(tmp_path / "two.tsv") == without_time(tmp_path / "one.tsv")
