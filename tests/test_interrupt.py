"""Ctrl-C (SIGINT) and SIGTERM during certify, predict and train: one line saying what is kept,
exit 130, no traceback; the same command then resumes."""

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

from smoothcert.io import load_checkpoint
from smoothcert.train import CHECKPOINT, LOG

SIGNALS = [signal.SIGINT, signal.SIGTERM]
# Slow enough rows (or epochs) that the signal arrives mid-run, not after it finished.
RUN = ["--N", "5000", "--batch", "500", "--device", "cpu"]
TRAIN = ["--preset", "mnist-lenet", "--sigma", "0.5", "--k", "1", "--batch", "32",
         "--train-subset", "256", "--eval-subset", "0", "--device", "cpu"]


def smoothcert(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "smoothcert", "--no-progress", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def interrupt_when(process: subprocess.Popen, ready: Callable[[], bool],
                   signum: int) -> tuple[int, str]:
    """Send `signum` once `ready()` holds; the exit code and stderr of `process`."""
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got ready"
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=20)
    return process.returncode, stderr


def rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:] if path.exists() else []


@pytest.mark.parametrize("mode, signum", [("certify", signal.SIGINT), ("certify", signal.SIGTERM),
                                           ("predict", signal.SIGINT)],
                         ids=["certify-SIGINT", "certify-SIGTERM", "predict-SIGINT"])
def test_an_interrupted_run_says_how_many_rows_it_kept_and_resumes(
        trained_checkpoint, tmp_path, signum, mode):
    out = tmp_path / "f.tsv"
    command = [mode, str(trained_checkpoint), "--out", str(out), *RUN]
    code, stderr = interrupt_when(smoothcert(*command, "--max-examples", "1000"),
                                  lambda: len(rows(out)) >= 2, signum)
    kept = rows(out)
    assert code == 130 and "Traceback" not in stderr
    assert stderr.splitlines() == [f"smoothcert {mode}: interrupted: {len(kept)} rows kept in "
                                   f"'{out}'; run the same command to resume"]
    done = smoothcert(*command, "--max-examples", str(len(kept) + 1))
    _, stderr = done.communicate(timeout=120)
    assert done.returncode == 0, stderr
    assert rows(out)[:-1] == kept and len(rows(out)) == len(kept) + 1  # one more row, no repeat


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_training_says_which_epoch_it_kept_and_resumes(tmp_path, signum):
    out = tmp_path / "run"
    command = ["train", *TRAIN, "--out", str(out)]
    code, stderr = interrupt_when(smoothcert(*command, "--epochs", "200"),
                                  lambda: (out / CHECKPOINT).exists(), signum)
    epoch = load_checkpoint(out / CHECKPOINT)["epoch"]
    assert code == 130 and "Traceback" not in stderr
    assert stderr.splitlines() == [
        f"smoothcert train: interrupted: checkpoint of epoch {epoch} kept in "
        f"'{out / CHECKPOINT}'; run it again with --resume to continue"]
    done = smoothcert(*command, "--epochs", str(epoch + 1), "--resume")
    _, stderr = done.communicate(timeout=120)
    assert done.returncode == 0, stderr
    logged = [json.loads(line)["epoch"] for line in (out / LOG).read_text().splitlines()]
    assert logged == list(range(epoch + 1))


def test_a_training_interrupted_before_its_first_checkpoint_says_so(tmp_path):
    out = tmp_path / "run"
    code, stderr = interrupt_when(
        smoothcert("train", *TRAIN, "--train-subset", "60000", "--out", str(out)),
        lambda: (out / LOG).exists(), signal.SIGTERM)
    assert code == 130 and not (out / CHECKPOINT).exists()
    assert stderr.splitlines() == [f"smoothcert train: interrupted: no epoch finished: no "
                                   f"checkpoint in '{out}'; run it again to start over"]
