"""Ctrl-C (SIGINT) and SIGTERM during certify, predict and train: one line saying what is kept,
exit 130, no traceback; the same command then resumes. Each test starts a real run (one torch
start-up, seconds); the default suite has one per signal, the rest are marked slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_distributed import start_torchrun, stop

from smoothcert.cli import main
from smoothcert.io import read_checkpoint_state
from smoothcert.train import CHECKPOINT, LOG

# Slow enough rows (or epochs) that the signal arrives mid-run, not after it finished.
RUN = ["--N", "5000", "--batch", "500", "--device", "cpu"]
TRAIN = ["--preset", "mnist-lenet", "--sigma", "0.5", "--k", "1", "--batch", "32",
         "--train-subset", "256", "--eval-subset", "0", "--device", "cpu"]


def default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and the
    # child would inherit that: the run under test must see Ctrl-C however pytest started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def smoothcert(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "smoothcert", "--no-progress", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)


def interrupt_when(process: subprocess.Popen, ready: Callable[[], bool],
                   signum: int) -> tuple[int, str]:
    """Send `signum` once `ready()` holds; the exit code and output (stdout, stderr) of
    `process`."""
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never got ready"
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=20)
    finally:  # a failed test leaves no run behind, busy on the cores the next tests need
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, (stdout or "") + (stderr or "")


def rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:] if path.exists() else []


@pytest.mark.parametrize("mode, signum", [
    ("certify", signal.SIGINT),
    pytest.param("certify", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("predict", signal.SIGINT, marks=pytest.mark.slow),
], ids=["certify-SIGINT", "certify-SIGTERM", "predict-SIGINT"])
def test_an_interrupted_run_says_how_many_rows_it_kept_and_resumes(
        trained_checkpoint, tmp_path, signum, mode):
    out = tmp_path / "f.tsv"
    command = [mode, str(trained_checkpoint), "--out", str(out), *RUN]
    code, output = interrupt_when(smoothcert(*command, "--max-examples", "1000"),
                                  lambda: len(rows(out)) >= 2, signum)
    kept = rows(out)
    assert code == 130 and "Traceback" not in output
    assert output.splitlines() == [f"smoothcert {mode}: interrupted: {len(kept)} rows kept in "
                                   f"'{out}'; run the same command to resume"]
    assert main(["--no-progress", *command, "--max-examples", str(len(kept) + 1)]) == 0
    assert rows(out)[:-1] == kept and len(rows(out)) == len(kept) + 1  # one more row, no repeat


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_training_says_which_epoch_it_kept_and_resumes(tmp_path, signum):
    out = tmp_path / "run"
    command = ["train", *TRAIN, "--out", str(out)]
    code, output = interrupt_when(smoothcert(*command, "--epochs", "200"),
                                  lambda: (out / CHECKPOINT).exists(), signum)
    epoch = read_checkpoint_state(out / CHECKPOINT)["epoch"]
    assert code == 130 and "Traceback" not in output
    assert output.splitlines() == [
        f"smoothcert train: interrupted: checkpoint of epoch {epoch} kept in "
        f"'{out / CHECKPOINT}'; run it again with --resume to continue"]
    assert main(["--no-progress", *command, "--epochs", str(epoch + 1), "--resume"]) == 0
    logged = [json.loads(line)["epoch"] for line in (out / LOG).read_text().splitlines()]
    assert logged == list(range(epoch + 1))


@pytest.mark.slow
def test_a_training_interrupted_before_its_first_checkpoint_says_so(tmp_path):
    out = tmp_path / "run"
    code, output = interrupt_when(
        smoothcert("train", *TRAIN, "--train-subset", "60000", "--out", str(out)),
        lambda: (out / LOG).exists(), signal.SIGTERM)
    assert code == 130 and not (out / CHECKPOINT).exists()
    assert output.splitlines() == [f"smoothcert train: interrupted: no epoch finished: no "
                                   f"checkpoint in '{out}'; run it again to start over"]


@pytest.mark.slow
def test_each_torchrun_rank_says_what_it_kept(trained_checkpoint, tmp_path):
    out = tmp_path / "f.tsv"
    parts = [tmp_path / f"f.tsv.part{rank}" for rank in (0, 1)]
    command = ["certify", str(trained_checkpoint), "--out", str(out), *RUN]
    launch = start_torchrun([*command, "--max-examples", "1000"], tmp_path)
    try:  # torchrun passes the signal on to every rank, then raises its own SignalException
        _, output = interrupt_when(launch, lambda: all(len(rows(p)) >= 1 for p in parts),
                                   signal.SIGTERM)
    finally:
        stop(launch)
    for rank, part in enumerate(parts):
        line = (f"smoothcert certify: interrupted: {len(rows(part))} "
                f"row{'' if len(rows(part)) == 1 else 's'} kept by rank {rank} in '{out}' and "
                "its part files; run the same command to resume")
        assert line in output, output
    kept = rows(parts[0]) + rows(parts[1])
    total = len(kept) + 1
    assert main(["--no-progress", *command, "--max-examples", str(total)]) == 0
    indices = [int(row.split("\t")[0]) for row in rows(out)]
    assert set(kept) <= set(rows(out))  # kept as written
    assert len(set(indices)) == len(indices) and set(range(total)) <= set(indices)
