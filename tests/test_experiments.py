"""The reproduction-study scripts, end to end at smoke size, in a temporary root."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SMOKE = ["--sigmas", "0.5", "--lams", "0.1", "--control-sigmas", "0.5", "--epochs", "1",
         "--lr-step", "1", "--train-subset", "256", "--skip", "1000", "--max", "3",
         "--n0", "20", "--n", "200", "--batch", "100", "--amp", "none", "--no-progress"]


def run_study(root: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "mnist_table1.py"), *SMOKE, "--root", str(root)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_mnist_table1_trains_certifies_summarises_and_resumes(tmp_path: Path) -> None:
    out = run_study(tmp_path)
    results = tmp_path / "results" / "mnist_table1"
    names = ["basic_s0.5", "basic_k8_s0.5", "adre_s0.5_l0.1"]
    for name in names:
        rows = (results / f"{name}.tsv").read_text().splitlines()
        assert len(rows) == 1 + 3, name  # header + the 3 selected test images
        assert (results / f"{name}.train.json").exists()
        assert (tmp_path / "runs" / "mnist_table1" / name / "checkpoint.pt").exists()
    summary = (results / "summary.md").read_text()
    assert "| basic_s0.5 → |" in summary  # ADREREG and the control against Basic
    assert "| basic_k8_s0.5 → |" in summary  # ADREREG against the compute control
    assert "| adre_s0.5_l0.1 |" in summary
    assert (results / "table1_sigma0.5.png").stat().st_size > 0
    assert (results / "fig2.png").stat().st_size > 0
    assert "complete, skipped" not in out

    again = run_study(tmp_path)
    assert again.count("complete, skipped") == len(names)
    assert "training" not in again


@pytest.mark.slow  # three processes that each import torch
def test_bad_settings_stop_the_study_before_any_training(tmp_path: Path) -> None:
    for flag, value, message in [("--lams", "-0.5", "lam must be"),
                                 ("--n", "0", "n must be"),
                                 ("--control-sigmas", "0.3", "--control-sigmas must be among")]:
        args = [*SMOKE, "--root", str(tmp_path), flag, value]
        done = subprocess.run([sys.executable, str(EXPERIMENTS / "mnist_table1.py"), *args],
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode != 0, flag
        assert message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


BASELINES_SMOKE = ["--sigmas", "0.5", "--epochs", "1", "--lr-step", "1", "--train-subset", "128",
                   "--skip", "1000", "--max", "2", "--n0", "10", "--n", "100", "--batch", "100",
                   "--amp", "none", "--no-progress"]


def run_baselines(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "mnist_baselines.py"), *BASELINES_SMOKE, *args],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_mnist_baselines_trains_each_baseline_and_reuses_matching_runs(tmp_path: Path) -> None:
    first = tmp_path / "first"
    out = run_baselines("--root", str(first))
    assert "basic_s0.5: trained here" in out and "differs in" in out  # not the committed runs
    results = first / "results" / "mnist_baselines_train128"  # part of the training set
    names = ["basic_s0.5", "adre_s0.5_l0.2", "macer_s0.5", "consistency_s0.5",
             "consistency_adre_s0.5_l0.2", "smoothmix_s0.5"]
    for name in names:
        assert len((results / f"{name}.tsv").read_text().splitlines()) == 1 + 2, name
    summary = (results / "summary.md").read_text()
    for baseline in ("basic_s0.5", "adre_s0.5_l0.2", "consistency_s0.5"):
        assert f"| {baseline} → |" in summary

    # Same settings, other root: Basic's and ADREREG's rows are copied, not trained again.
    second = tmp_path / "second"
    copied = second / "results" / "mnist_baselines_train128"
    out = run_baselines("--root", str(second), "--reuse-from", str(results))
    for name in ("basic_s0.5", "adre_s0.5_l0.2"):
        assert f"{name}: rows from" in out
        assert (copied / f"{name}.tsv").read_text() == (results / f"{name}.tsv").read_text()
    assert "basic_s0.5: training" not in out and "smoothmix_s0.5: training" in out


def test_cifar_subset_runs_are_valid_and_differ_only_in_the_objective(monkeypatch) -> None:
    # bench_sequential trains its CIFAR-10 model from these runs; no training here.
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import cifar_subset

    from smoothcert.presets import resolve_config

    basic, adre = cifar_subset.runs(cifar_subset.parser().parse_args(["--lam", "0.3"]))
    assert (basic.name, adre.name) == ("basic", "adre_l0.3")
    configs = [resolve_config(**run.train) for run in (basic, adre)]
    assert [c.objective for c in configs] == ["gaussian", "adre"]
    assert [c.lam for c in configs] == [0.0, 0.3]
    shared = [{k: v for k, v in vars(c).items() if k not in ("objective", "lam")}
              for c in configs]
    assert shared[0] == shared[1]
    assert configs[0].model == "cifar_resnet20" and configs[0].lr_step == 10


DENOISED_SMOKE = ["--sigmas", "0.5", "--epochs", "1", "--lr-step", "1", "--denoiser-epochs", "1",
                  "--train-subset", "128", "--skip", "1000", "--max", "2", "--n0", "10", "--n",
                  "100", "--batch", "100", "--amp", "none", "--no-progress"]


@pytest.mark.slow
def test_mnist_denoised_certifies_the_clean_lenet_alone_and_behind_each_denoiser(
        tmp_path: Path) -> None:
    def study() -> str:
        done = subprocess.run([sys.executable, str(EXPERIMENTS / "mnist_denoised.py"),
                               *DENOISED_SMOKE, "--root", str(tmp_path)],
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    study()
    results, runs = tmp_path / "results" / "mnist_denoised", tmp_path / "runs" / "mnist_denoised"
    clean = str(runs / "clean_s0.5" / "checkpoint.pt")
    for name, denoiser in [("clean_s0.5", None), ("basic_s0.5", None),
                           ("mse_s0.5", "mse_s0.5"), ("stability_s0.5", "stability_s0.5")]:
        meta = json.loads((results / f"{name}.tsv.json").read_text())
        assert meta["sigma"] == 0.5 and len((results / f"{name}.tsv").read_text().splitlines()) == 3
        if denoiser:
            assert meta["checkpoint"] == clean
            assert meta["denoiser"] == str(runs / denoiser / "checkpoint.pt")
        else:
            assert "denoiser" not in meta
    assert "| clean_s0.5 → |" in (results / "summary.md").read_text()
    assert study().count("complete, skipped") == 4
