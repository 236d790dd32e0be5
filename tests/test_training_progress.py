"""The training bar: epoch, step, running loss and accuracy, refreshed every REFRESH_SECONDS,
shown by rank 0 only."""

from __future__ import annotations

import re

import torch
from test_train import tiny

from smoothcert import training_progress
from smoothcert.distributed import DistContext
from smoothcert.train import Trainer
from smoothcert.training_progress import REFRESH_SECONDS, EpochBar


def run_bar(monkeypatch, steps: int, seconds_per_step: float) -> list[str]:
    """The postfixes an EpochBar shows over `steps` steps of `seconds_per_step` each (on a fake
    clock), each step adding loss 2 and accuracy 0.5 to the sums."""
    clock = [100.0]
    monkeypatch.setattr(training_progress, "monotonic", lambda: clock[0])
    shown = []
    with EpochBar(steps, 2, 5, enabled=True) as bar:
        monkeypatch.setattr(bar.bar, "set_postfix",
                            lambda postfix, refresh: shown.append((postfix, bar.steps_done)))
        sums = {"loss": torch.tensor(0.0), "acc": torch.tensor(0.0), "l_per": torch.tensor(0.0)}
        for _ in range(steps):
            clock[0] += seconds_per_step
            sums = {name: value + {"loss": 2.0, "acc": 0.5}.get(name, 1.0)
                    for name, value in sums.items()}
            bar.step(sums)
    return shown


def test_a_fast_loop_formats_the_bar_once_per_interval(monkeypatch):
    shown = run_bar(monkeypatch, steps=640, seconds_per_step=REFRESH_SECONDS / 64)  # exact
    assert [steps for _, steps in shown] == list(range(1, 640, 64))  # 10 of 640 steps
    assert all(postfix == {"loss": "2.0000", "acc": "0.5000"} for postfix, _ in shown)


def test_every_slow_step_refreshes_the_bar(monkeypatch):
    shown = run_bar(monkeypatch, steps=5, seconds_per_step=5 * REFRESH_SECONDS)
    assert [steps for _, steps in shown] == [1, 2, 3, 4, 5]


def test_the_training_bar_shows_epoch_step_loss_and_accuracy_on_rank_0_only(tmp_path, capsys,
                                                                              monkeypatch):
    with Trainer(tiny(tmp_path / "run", train_subset=128, epochs=3), progress=True) as trainer:
        capsys.readouterr()
        trainer.train_epoch(1)
        shown = capsys.readouterr().err
        # tqdm writes each refresh after a carriage return; the first step is shown at once
        assert re.search(r"epoch 2/3: +50%.* 1/2 \[.*, loss=\d\.\d{4}, acc=0\.\d{4}\]", shown)
        monkeypatch.setattr(DistContext, "is_main", property(lambda ctx: False))  # rank 1
        trainer.train_epoch(1)
        assert capsys.readouterr().err == ""


def test_no_progress_shows_no_bar(tmp_path, capsys):
    with Trainer(tiny(tmp_path / "run"), progress=False) as trainer:
        capsys.readouterr()
        trainer.train_epoch(0)
        assert capsys.readouterr().err == ""
