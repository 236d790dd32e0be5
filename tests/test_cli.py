"""The `smoothcert` command, in-process through cli.main and once through `python -m`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoothcert.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
SMALL_TRAIN = ["--epochs", "1", "--train-subset", "64", "--batch", "64", "--k", "2",
               "--eval-subset", "20", "--device", "cpu"]
SMALL_CERTIFY = ["--n0", "10", "--n", "100", "--batch", "100", "--device", "cpu"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `smoothcert argv` (argparse's own exits included)."""
    try:
        code = main(["--no-progress", *argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def result_file(trained_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "res.tsv"
    code = main(["--no-progress", "certify", str(trained_checkpoint), "--out", str(out),
                 "--max", "4", *SMALL_CERTIFY])
    assert code == 0
    return out


# ---------------------------------------------------------------- entry point


def test_python_dash_m_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "smoothcert", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("train", "certify", "predict", "analyze", "demo"):
        assert command in done.stdout


def test_a_usage_error_in_a_subprocess_exits_2_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "smoothcert", "train", "--sigma", "0", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "sigma" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- train


def test_train_with_a_preset_and_overrides(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "train", "--preset", "mnist-lenet", "--method", "adre",
                          "--lam", "0.1", "--sigma", "0.5", "--out", str(out), *SMALL_TRAIN)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]
    assert str(out / "checkpoint.pt") in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "mnist-lenet"
    assert (config["lr"], config["lr_step"]) == (0.05, 8)  # from the preset
    assert (config["batch"], config["k"], config["method"], config["lam"]) == (64, 2, "adre", 0.1)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0] and "test_noisy_acc" in log[0]

    # Again without --resume: refused; with --resume and more epochs: continued.
    again = ["train", "--preset", "mnist-lenet", "--method", "adre", "--lam", "0.1", "--sigma",
             "0.5", "--out", str(out), *SMALL_TRAIN]
    code, _, stderr = cli(capsys, *again)
    assert code == 2 and "--resume" in stderr
    code, _, _ = cli(capsys, *again, "--resume", "--epochs", "2")
    assert code == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    code, _, stderr = cli(capsys, *again, "--resume", "--epochs", "3", "--sigma", "0.25")
    assert code == 2 and "sigma" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    "args, name",
    [
        (["--lam", "-1"], "error: lam must be"),
        (["--method", "foo"], "error: method must be one of"),  # checked by us, not argparse
        (["--sigma", "0"], "error: sigma must be"),
        (["--k", "0"], "error: k must be"),
        (["--k", "abc"], "argument --k: invalid int value"),  # argparse's own check
        (["--batch", "0"], "error: batch must be"),
        (["--method", "smoothadv"], "error: eps must be > 0"),  # eps defaults to 0
        (["--eps", "-0.5"], "error: eps must be"),
        (["--steps", "0"], "error: steps must be"),
        (["--model", "vgg"], "error: model must be one of"),
        (["--preset", "nope"], "argument --preset: invalid choice"),
    ],
)
def test_bad_train_options_exit_2_naming_the_argument(capsys, tmp_path, args, name):
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, "train", "--out", str(out), *args)
    assert code == 2
    assert name in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_missing_cifar10_exits_2_with_a_clear_message(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, "train", "--dataset", "cifar10", "--model", "cifar_resnet20",
                          "--data-dir", "/nonexistent", "--out", str(out))
    assert code == 2
    assert "CIFAR-10" in stderr and "not found" in stderr
    assert "/nonexistent" in stderr and "--data-dir" in stderr
    assert "Traceback" not in stderr
    assert not (out / "config.json").exists()  # nothing half-made left behind


# ---------------------------------------------------------------- certify, predict, analyze


def test_certify_writes_results_and_resumes(capsys, trained_checkpoint, result_file, tmp_path):
    lines = result_file.read_text().splitlines()
    assert lines[0].startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\trun\t")
    assert [line.split("\t")[0] for line in lines[1:]] == ["0", "1", "2", "3"]
    before = result_file.read_text()
    code, stdout, _ = cli(capsys, "certify", str(trained_checkpoint), "--out", str(result_file),
                          "--max", "4", *SMALL_CERTIFY)
    assert code == 0 and str(result_file) in stdout
    assert result_file.read_text() == before  # finished: nothing recomputed
    copy = tmp_path / result_file.name  # other settings on a copy of the shared file
    for suffix in ("", ".json"):
        shutil.copy(f"{result_file}{suffix}", f"{copy}{suffix}")
    other = ["certify", str(trained_checkpoint), "--out", str(copy), "--max", "4", "--n0", "10",
             "--n", "50", "--batch", "50", "--device", "cpu"]
    code, _, stderr = cli(capsys, *other)
    assert code == 2 and "different n" in stderr and "--restart-stale" in stderr
    assert copy.read_text() == before
    code, _, _ = cli(capsys, *other, "--restart-stale")
    assert code == 0 and copy.read_text() != before
    code, _, stderr = cli(capsys, "verify", str(copy))
    assert code == 0 and "every certificate matches" in stderr


def test_predict_prints_the_abstention_rate(capsys, trained_checkpoint, tmp_path):
    out = tmp_path / "pred.tsv"
    code, stdout, _ = cli(capsys, "predict", str(trained_checkpoint), "--out", str(out),
                          "--max", "3", "--n", "5", "--batch", "5", "--device", "cpu")
    assert code == 0
    assert "abstention rate: 1.0000" in stdout  # 5 votes can never reject at alpha 0.001
    header, *rows = (line.split("\t") for line in out.read_text().splitlines())
    assert header == ["idx", "label", "predict", "correct", "time", "method", "run"]
    assert len(rows) == 3 and all(row[2:4] == ["-1", "0"] for row in rows)


@pytest.mark.parametrize(
    "args, message",
    [(["--n", "0"], "error: n must be"), (["--alpha", "2"], "error: alpha must be"),
     (["--method", "foo"], "argument --method: invalid choice"),
     (["--sigma", "-1"], "error: sigma must be")],
)
def test_bad_certify_options_exit_2(capsys, trained_checkpoint, tmp_path, args, message):
    out = tmp_path / "x.tsv"
    code, _, stderr = cli(capsys, "certify", str(trained_checkpoint), "--out", str(out), *args)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_certify_with_a_bad_checkpoint_exits_2(capsys, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "config": {"lr": 0.1}}, foreign)
    for path in (tmp_path / "missing.pt", broken, foreign):
        code, _, stderr = cli(capsys, "certify", str(path), "--out", str(tmp_path / "o.tsv"))
        assert code == 2
        assert "checkpoint" in stderr and str(path) in stderr and "Traceback" not in stderr


def test_analyze_prints_a_markdown_table_with_acr(capsys, result_file):
    code, stdout, _ = cli(capsys, "analyze", str(result_file))
    assert code == 0
    assert "ACR" in stdout
    assert "| res: CERTIFY |" in stdout and "| res: T-CERTIFY (paper mode) |" in stdout
    assert "| res: T-CERTIFY (strict) |" in stdout
    assert "4 examples" in stdout  # the protocol note from the sidecar


def test_analyze_latex_and_csv(capsys, result_file):
    code, stdout, _ = cli(capsys, "analyze", "--latex", str(result_file))
    assert code == 0
    assert r"\begin{tabular}" in stdout and "ACR" in stdout and r"\bottomrule" in stdout
    code, stdout, _ = cli(capsys, "analyze", "--csv", str(result_file))
    assert code == 0
    rows = stdout.rstrip("\n").splitlines()
    assert rows[0].startswith("method,0.0,0.25,") and rows[0].endswith(",ACR,n")
    assert rows[1].startswith("res: CERTIFY,") and len(rows) == 4
    code, _, stderr = cli(capsys, "analyze", "--csv", "--latex", str(result_file))
    assert code == 2 and "not allowed" in stderr


def test_analyze_plot_writes_a_png(capsys, result_file, tmp_path):
    plot = tmp_path / "x.png"
    code, stdout, stderr = cli(capsys, "analyze", str(result_file), "--plot", str(plot))
    assert code == 0 and "ACR" in stdout and str(plot) in stderr
    assert plot.read_bytes().startswith(PNG)


def test_analyze_of_a_missing_file_exits_2(capsys, tmp_path):
    code, _, stderr = cli(capsys, "analyze", str(tmp_path / "none.tsv"))
    assert code == 2
    assert "none.tsv" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------- demo


def test_demo_runs_end_to_end_and_resumes(capsys, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--epochs", "1", "--train-subset", "256", "--certify",
            "5", "--n", "100", "--k", "2"]
    code, stdout, _ = cli(capsys, *args)
    assert code == 0
    report = (out / "report.md").read_text()
    assert "ACR" in report
    for name in ("basic", "adre"):
        for method in ("CERTIFY", "T-CERTIFY (paper mode)", "T-CERTIFY (strict)"):
            assert f"| {name}: {method} |" in report
        assert (out / name / "checkpoint.pt").is_file()
        assert len((out / f"{name}.tsv").read_text().splitlines()) == 1 + 5
    assert "![certified accuracy](certified_accuracy.png)" in report
    assert (out / "certified_accuracy.png").read_bytes().startswith(PNG)
    assert "ACR" in stdout

    # Re-running the same command resumes every stage: nothing is trained or certified again.
    results = {name: (out / f"{name}.tsv").read_text() for name in ("basic", "adre")}
    checkpoint = (out / "basic" / "checkpoint.pt").read_bytes()
    code, _, stderr = cli(capsys, *args)
    assert code == 0, stderr
    assert {name: (out / f"{name}.tsv").read_text() for name in results} == results
    assert (out / "basic" / "checkpoint.pt").read_bytes() == checkpoint
