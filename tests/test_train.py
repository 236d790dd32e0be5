"""The trainer: loss goes down, exact resume, checkpoints, logs, validation and the presets."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ThresholdClassifier
from scipy.stats import norm
from torch.utils.data import TensorDataset

import smoothcert
from smoothcert import io as sc_io
from smoothcert import rng
from smoothcert.distributed import BatchTooLargeError
from smoothcert.models import build_model
from smoothcert.presets import TrainConfig, eps_at, lr_factor, resolve_config
from smoothcert.train import (
    CHECKPOINT,
    LOG,
    Trainer,
    draw_noise,
    evaluate,
    train,
    train_loader,
)

LOG_KEYS = {"epoch", "loss", "l_per", "train_acc", "batches", "lr", "time", "test_clean_acc",
            "test_noisy_acc"}


def tiny(out: Path, **overrides) -> TrainConfig:
    """A CPU run of one step per epoch: LeNet on the first 64 MNIST images, batch 64, k 2."""
    values = dict(sigma=0.25, k=2, epochs=1, batch=64, lr=0.05, train_subset=64, eval_subset=0,
                  device="cpu", out=str(out))
    values.update(overrides)
    return resolve_config("mnist-lenet", **values)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / LOG).read_text().splitlines()]


def assert_same_state(a, b, where: str = "state") -> None:
    """Exact equality of (nested) state dicts: every tensor bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def tmp_files(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def tiny_cifar(tmp_path) -> Path:
    """64 random 32x32 training images (and 8 test images) as a CIFAR-10 .npz subset."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny_cifar.npz"
    np.savez(path, x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 64), x_test=rng.integers(0, 256, (8, 32, 32, 3),
             dtype=np.uint8), y_test=rng.integers(0, 10, 8))
    return path


def tiny_cifar_run(out: Path, data: Path, **overrides) -> TrainConfig:
    """ResNet-20 on the tiny CIFAR subset (augmented), two steps of 32 per epoch, CPU."""
    values = dict(dataset="cifar10", model="cifar_resnet20", data_dir=str(data), sigma=0.25,
                  k=1, epochs=1, batch=32, lr=0.05, eval_subset=0, device="cpu", out=str(out))
    values.update(overrides)
    return resolve_config(**values)


def assert_same_runs(a: Path, b: Path) -> None:
    """Two run folders hold bit-identical checkpoints and log lines (wall times aside)."""
    state_a = torch.load(a / CHECKPOINT, weights_only=True)
    state_b = torch.load(b / CHECKPOINT, weights_only=True)
    assert state_a["epoch"] == state_b["epoch"]
    for part in ("model", "optimizer", "scheduler", "scaler"):
        assert_same_state(state_a[part], state_b[part], part)
    log_a, log_b = read_log(a), read_log(b)
    for record in (*log_a, *log_b):
        record.pop("time")
    assert log_a == log_b


# ---------------------------------------------------------------- training works


@pytest.mark.parametrize(
    "method, extra",
    [
        ("gaussian", {}),
        ("adre", dict(lam=0.2)),
        ("smoothadv", dict(eps=0.5, steps=1)),
        ("adreadv", dict(eps=0.5, steps=1, lam=0.2)),
    ],
)
def test_a_few_epochs_lower_the_loss(tmp_path, method, extra):
    # 3 epochs of 4 steps; eps_warmup 0 so the attack is equally strong in every epoch. At lr
    # 0.05 some seeds diverge in 12 steps (seed 0 for three methods); at 0.02 seeds 0-5 drop
    # the loss and l_per by 0.25 to 0.62 (seed 0: 0.40 to 0.62).
    cfg = tiny(tmp_path / method, objective=method, epochs=3, eps_warmup=0, train_subset=256,
               lr=0.02, **extra)
    train(cfg, progress=False)
    first, _, last = read_log(tmp_path / method)
    assert last["loss"] < first["loss"] - 0.3
    assert last["l_per"] < first["l_per"] - 0.3
    assert last["train_acc"] > first["train_acc"]
    if "lam" in extra:
        assert first["loss"] == pytest.approx(first["l_per"] - 0.2 * first["l_adre"], rel=1e-5)
    else:
        assert first["loss"] == pytest.approx(first["l_per"])
    if "eps" in extra:
        assert {r["eps"] for r in (first, last)} == {0.5}


# ---------------------------------------------------------------- resume


def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path):
    # ADREADV with an eps warm-up and a per-epoch evaluation: every per-epoch input is exercised.
    options = dict(objective="adreadv", lam=0.2, eps=0.5, steps=1, eps_warmup=2, eval_subset=32,
                   lr_step=2, lr_gamma=0.5, train_subset=128)  # 2 steps per epoch
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny(straight, epochs=3, **options), progress=False)

    train(tiny(interrupted, epochs=1, **options), progress=False)  # "killed" after epoch 1
    with open(interrupted / LOG, "a") as log:
        # A line of an epoch the checkpoint does not hold, then a line cut off mid-write.
        log.write(json.dumps({"epoch": 1, "loss": 99.0}) + "\n" + '{"epoch": 2, "lo')
    train(tiny(interrupted, epochs=3, **options), resume=True, progress=False)

    a = torch.load(straight / CHECKPOINT, weights_only=True)
    b = torch.load(interrupted / CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for part in ("model", "optimizer", "scheduler", "scaler"):
        assert_same_state(a[part], b[part], part)

    log_a, log_b = read_log(straight), read_log(interrupted)
    assert [r["epoch"] for r in log_b] == [0, 1, 2]
    assert all(r["loss"] != 99.0 for r in log_b)
    for ra, rb in zip(log_a, log_b, strict=True):
        ra.pop("time"), rb.pop("time")
        assert ra == rb  # loss, lr, eps, accuracies: all bit-identical


def test_a_kill_right_after_the_checkpoint_loses_no_log_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = Trainer._save

    def save_then_die(self, epoch):
        original(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # killed between the checkpoint and whatever follows it

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(run, epochs=2), progress=False)
    monkeypatch.undo()
    train(tiny(run, epochs=2), resume=True, progress=False)
    assert [r["epoch"] for r in read_log(run)] == [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_cifar_augmentation_equals_the_uninterrupted_run(tmp_path, tiny_cifar,
                                                                       workers):
    # Random crops and flips draw from torch's RNG in the main process or in the loader's
    # workers; both must be a function of (seed, epoch) for a resumed run to match.
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny_cifar_run(straight, tiny_cifar, epochs=3, workers=workers), progress=False)
    train(tiny_cifar_run(interrupted, tiny_cifar, epochs=1, workers=workers), progress=False)
    train(tiny_cifar_run(interrupted, tiny_cifar, epochs=3, workers=workers), resume=True,
          progress=False)
    assert_same_runs(straight, interrupted)


def test_loader_workers_do_not_change_the_run(tmp_path):
    train(tiny(tmp_path / "main", epochs=2, train_subset=128), progress=False)
    train(tiny(tmp_path / "workers", epochs=2, train_subset=128, workers=2), progress=False)
    assert_same_runs(tmp_path / "main", tmp_path / "workers")


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, epochs=2), progress=False)
    before = {name: (run / name).read_bytes() for name in (CHECKPOINT, "config.json", LOG)}
    with pytest.raises(ValueError, match=r"epochs: .* already trained 2 epochs; .*--epochs 2"):
        train(tiny(run, epochs=1), resume=True, progress=False)
    assert {name: (run / name).read_bytes() for name in before} == before
    train(tiny(run, epochs=2), resume=True, progress=False)  # as many as done: nothing to do
    assert (run / CHECKPOINT).read_bytes() == before[CHECKPOINT]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    train(tiny(tmp_path / "run"), resume=True, progress=False)
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [0]


# ---------------------------------------------------------------- checkpoint and log files


def test_checkpoint_contents_load_safely_and_are_written_atomically(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(run, epochs=2)
    path = train(cfg, progress=False)
    assert path == run / CHECKPOINT
    state = torch.load(path, weights_only=True)  # plain tensors and values only
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= state.keys()
    assert state["epoch"] == 2
    assert state["config"] == asdict(cfg)
    assert json.loads((run / "config.json").read_text()) == asdict(cfg)
    assert state["scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["state"]  # momentum buffers are saved
    build_model("lenet", "mnist").load_state_dict(state["model"])
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]
    assert tmp_files(run) == []


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny(run, epochs=1), progress=False)
    before = (run / CHECKPOINT).read_bytes()

    replace = sc_io.os.replace

    def crash_on_checkpoint(src, dst):
        if Path(dst).name == CHECKPOINT:
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(sc_io.os, "replace", crash_on_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(run, epochs=2), resume=True, progress=False)
    assert (run / CHECKPOINT).read_bytes() == before
    assert tmp_files(run) == []


def test_stale_temporaries_of_a_killed_save_are_removed_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    train(tiny(run), progress=False)
    # What a kill -9 during atomic_write_bytes leaves: its temporary, under its own naming (and
    # one named as tempfile.mkstemp named them before); files of other names are the user's.
    fd, left = sc_io._create_temporary(run / CHECKPOINT)
    os.close(fd)
    older = run / ".config.json.k_9xq2ab.tmp"
    kept = [run / ".checkpoint.pt.notes.tmp", run / "checkpoint.pt.abcdefgh.tmp",
            run / ".checkpoint.pt.abcdefgh.tmp.bak"]
    for path in (older, *kept):
        path.write_text("x")
    train(tiny(run, epochs=2), resume=True, progress=False)
    assert not left.exists() and not older.exists()
    assert all(path.exists() for path in kept)


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny(tmp_path / "run"), progress=False)
        os.umask(0o027)
        sc_io.atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    for name in (CHECKPOINT, "config.json", LOG):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o640


def test_log_lines_hold_the_training_and_evaluation_metrics(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, epochs=2, eval_subset=50, lr_step=1, lr_gamma=0.5), progress=False)
    log = read_log(run)
    assert [r["epoch"] for r in log] == [0, 1]
    for record in log:
        assert LOG_KEYS <= record.keys()
        assert all(math.isfinite(record[key]) for key in LOG_KEYS)
        for key in ("train_acc", "test_clean_acc", "test_noisy_acc"):
            assert 0 <= record[key] <= 1
        assert record["time"] > 0
        # a plain Gaussian run: no ADRE term, no attack; "steps" would read as PGD steps
        assert not {"l_adre", "eps", "steps"} & record.keys()
    assert [r["lr"] for r in log] == pytest.approx([0.05, 0.025])  # the step schedule


def test_eval_subset_zero_logs_no_test_metrics(tmp_path):
    train(tiny(tmp_path / "run"), progress=False)
    (record,) = read_log(tmp_path / "run")
    assert "test_clean_acc" not in record and "loss" in record


def test_a_batch_larger_than_the_training_split_is_refused_before_any_file(tmp_path):
    # drop_last would leave every epoch without a step: "trained" weights equal to the initial ones
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"batch must be at most the training split's size "
                                         r"\(64 examples\), got 65"):
        train(tiny(run, batch=65), progress=False)
    assert not run.exists() or not any(run.iterdir())


def test_init_starts_from_another_runs_weights_and_a_fresh_optimizer(tmp_path):
    first = tmp_path / "first"
    train(tiny(first, epochs=2), progress=False)
    saved = torch.load(first / CHECKPOINT, weights_only=True)
    with Trainer(tiny(tmp_path / "tuned", init=str(first / CHECKPOINT)), progress=False) as t:
        assert_same_state(t.model.state_dict(), saved["model"])
        assert t.start_epoch == 0 and not t.optimizer.state  # no momentum carried over
    with Trainer(tiny(tmp_path / "scratch"), progress=False) as t:
        assert not torch.equal(t.model.state_dict()["1.9.weight"], saved["model"]["1.9.weight"])


@pytest.mark.parametrize("overrides, message", [
    (dict(model="cifar_resnet20"), r"was trained with model 'lenet'; train with the same model "
                                   r"to start from it, got 'cifar_resnet20'"),
    (dict(init="missing.pt"), r"init: checkpoint: no such file 'missing.pt'"),
])
def test_init_refuses_another_model_or_a_missing_file_before_any_file(tmp_path, overrides,
                                                                       message):
    first = tmp_path / "first"
    train(tiny(first), progress=False)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        Trainer(tiny(run, **{"init": str(first / CHECKPOINT), **overrides}), progress=False)
    assert not run.exists() or not any(run.iterdir())


def test_init_takes_an_earlier_releases_checkpoint_without_model_kwargs(tmp_path):
    first = tmp_path / "first"
    train(tiny(first), progress=False)
    state = torch.load(first / CHECKPOINT, weights_only=True)
    del state["config"]["model_kwargs"]
    torch.save(state, tmp_path / "old.pt")
    with Trainer(tiny(tmp_path / "run", init=str(tmp_path / "old.pt")), progress=False) as t:
        assert_same_state(t.model.state_dict(), state["model"])


def test_init_refuses_weights_of_another_shape_naming_the_key(tmp_path):
    first = tmp_path / "first"
    train(tiny(first), progress=False)
    state = torch.load(first / CHECKPOINT, weights_only=True)
    state["model"]["1.9.weight"] = state["model"]["1.9.weight"][:5]
    state[sc_io.WEIGHTS_DIGEST] = sc_io.weights_digest(state["model"])
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"init: checkpoint: the weights in .*cut.pt' do not fit "
                                         r"this run's lenet: wrong shape '1.9.weight' \(5, 512\)"):
        Trainer(tiny(tmp_path / "run", init=str(tmp_path / "cut.pt")), progress=False)


# ---------------------------------------------------------------- refusing to clobber or mix runs


def test_a_fresh_run_into_a_finished_run_asks_for_resume(tmp_path):
    run = tmp_path / "run"
    train(tiny(run), progress=False)
    before = (run / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="--resume"):
        train(tiny(run), progress=False)
    assert (run / CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize(
    "change, field",
    [(dict(sigma=0.5), "sigma"), (dict(objective="adre", lam=0.1), "objective"), (dict(k=1), "k")],
)
def test_resuming_with_a_different_setting_names_it(tmp_path, change, field):
    run = tmp_path / "run"
    train(tiny(run), progress=False)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        train(tiny(run, epochs=2, **change), resume=True, progress=False)
    assert [r["epoch"] for r in read_log(run)] == [0]


@pytest.mark.parametrize(
    "name, content",
    [
        ("config.json", b'{"lr": 0.1, "layers": [64, 64]}\n'),  # another tool's config
        ("config.json", b"\x89PNG\r\n\x1a\n binary"),
        (LOG, b"my own notes\n"),
        (LOG, b'{"step": 1, "loss": 0.5}\n'),  # another tool's JSON lines
        (LOG, b"no newline at the end"),
        (LOG, b"\xff\xfe not text"),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_users_own_config_or_log_is_never_replaced(tmp_path, name, content, resume):
    run = tmp_path / "run"
    if resume:
        train(tiny(run), progress=False)
    run.mkdir(exist_ok=True)
    (run / name).write_bytes(content)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match=rf"out: '{run / name}' is not .* smoothcert wrote"):
        train(tiny(run, epochs=2), resume=resume, progress=False)
    assert (run / name).read_bytes() == content
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def die(self, epoch):
        raise KeyboardInterrupt  # killed after the log line, before the checkpoint

    monkeypatch.setattr(Trainer, "_save", die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(run), progress=False)
    monkeypatch.undo()
    assert [r["epoch"] for r in read_log(run)] == [0] and not (run / CHECKPOINT).exists()
    train(tiny(run), progress=False)  # its own config.json and log.jsonl are replaced
    assert [r["epoch"] for r in read_log(run)] == [0]


# A train process that takes the lock of its --out, says so, and waits for a line on stdin.
HOLD_THE_LOCK = """
import sys
from smoothcert import train
from smoothcert.cli import main

fit = train.Trainer.fit

def fit_when_told(self):
    print("locked", flush=True)
    sys.stdin.readline()
    return fit(self)

train.Trainer.fit = fit_when_told
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # two processes that each import torch: 10 to 25 s on 2 shared cores
def test_a_second_train_on_the_same_out_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    argv = ["--no-progress", "train", "--out", str(run), "--epochs", "1", "--train-subset",
            "64", "--batch", "64", "--eval-subset", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(smoothcert.__file__).parents[1]),
           "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, *argv], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline() == "locked\n"
        second = subprocess.run([sys.executable, "-m", "smoothcert", *argv], env=env, text=True,
                                capture_output=True, timeout=300)
        assert second.returncode == 2
        assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
        first.wait()
    assert [r["epoch"] for r in read_log(run)] == [0]  # one run's line, not two
    assert json.loads((run / "config.json").read_text())["out"] == str(run)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(objective="foo"), "objective"),
        (dict(model="foo"), "model"),
        (dict(dataset="foo"), "dataset"),
        (dict(lam=-0.1), "lam"),
        (dict(lam=float("nan")), "lam"),
        (dict(k=0), "k"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-0.5), "sigma"),
        (dict(eps=-0.1), "eps"),
        (dict(steps=0), "steps"),
        (dict(batch=0), "batch"),
        (dict(objective="smoothadv", eps=0.0), "eps"),
        (dict(objective="adreadv", lam=0.1), "eps"),  # eps defaults to 0
        (dict(epochs=0), "epochs"),
        (dict(schedule="linear"), "schedule"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(momentum=1.0), "momentum"),
        (dict(no_such_option=1), "no_such_option"),
        # Options the objective would ignore (gaussian is the default objective).
        (dict(lam=0.2), "lam"),
        (dict(objective="smoothadv", eps=0.5, lam=0.2), "lam"),
        (dict(eps=0.5), "eps"),
        (dict(objective="adre", lam=0.1, steps=3), "steps"),
        (dict(single_draw=True), "single_draw"),
    ],
)
def test_bad_options_are_rejected_by_name_before_any_work(tmp_path, options, name):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        resolve_config("mnist-lenet", out=str(out), **options)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        resolve_config(out=str(out), **options)  # no preset
    assert not out.exists()


@pytest.mark.parametrize(
    "preset, options, name",
    [("nope", {}, "preset"), ("imagenet-resnet50", dict(k=0), "k")],
)
def test_bad_preset_or_preset_option(tmp_path, preset, options, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        resolve_config(preset, out=str(tmp_path / "run"), **options)


def test_the_trainer_validates_a_hand_built_config_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"\blam\b"):
        Trainer(TrainConfig(lam=-1.0, device="cpu", out=str(out)), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- presets


def test_cifar10_preset_is_the_papers_recipe():
    cfg = resolve_config("cifar10-resnet110")
    assert (cfg.dataset, cfg.model) == ("cifar10", "cifar_resnet110")
    assert (cfg.batch, cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.epochs) == (400, 0.1, 50, 0.1, 150)
    assert (cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.k) == (0.9, 1e-4, "step", 8)
    factors = [lr_factor(cfg, e) for e in (0, 49, 50, 99, 100, 149)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("k, batch", [(1, 256), (2, 128), (4, 64)])
def test_imagenet_preset_batch_follows_k(k, batch):
    cfg = resolve_config("imagenet-resnet50", k=k)
    assert cfg.batch == batch
    assert (cfg.dataset, cfg.model, cfg.epochs, cfg.lr) == ("imagenet", "resnet50", 50, 0.1)
    assert cfg.momentum == 0.875
    assert cfg.weight_decay == 1 / 32768
    assert cfg.label_smoothing == 0.1
    assert (cfg.schedule, cfg.warmup_epochs) == ("cosine", 8)


def test_explicit_overrides_beat_the_preset():
    assert resolve_config("imagenet-resnet50", k=4, batch=100).batch == 100
    cfg = resolve_config("cifar10-resnet110", lr=0.05, epochs=3, k=2, objective="adre", lam=0.1)
    assert (cfg.lr, cfg.epochs, cfg.k, cfg.objective, cfg.lam) == (0.05, 3, 2, "adre", 0.1)
    assert cfg.batch == 400  # untouched preset values stay
    # None means "not given" (as argparse passes it), not "set to None".
    assert resolve_config("cifar10-resnet110", batch=None).batch == 400


def test_imagenet_learning_rate_schedule():
    cfg = resolve_config("imagenet-resnet50")
    for epoch in range(50):
        expected = (
            0.1 * (epoch + 1) / 8 if epoch < 8
            else 0.05 * (1 + math.cos(math.pi * (epoch - 8) / 42))
        )
        assert cfg.lr * lr_factor(cfg, epoch) == pytest.approx(expected, abs=1e-12), epoch


def test_the_trainer_warms_up_then_follows_the_cosine(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, epochs=6, warmup_epochs=3, schedule="cosine"), progress=False)
    # lr 0.05: 1/3, 2/3, 3/3 of it, then 0.05 * (1 + cos(pi * t / 3)) / 2 for t = 0, 1, 2.
    assert [r["lr"] for r in read_log(run)] == pytest.approx(
        [0.05 / 3, 0.1 / 3, 0.05, 0.05, 0.0375, 0.0125], abs=1e-12
    )
    resumed = torch.load(run / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"][0]
    assert resumed["lr"] == pytest.approx(0.0, abs=1e-12)  # what a 7th epoch would use: cos(pi)


def test_the_trainer_hands_each_epoch_its_warmed_up_attack(tmp_path):
    cfg = tiny(tmp_path / "run", objective="smoothadv", eps=0.6, steps=1, eps_warmup=3, epochs=4)
    seen = []
    with Trainer(cfg, progress=False) as trainer:
        objective = trainer.objective

        def spy(model, x, y, noise, objective_cfg):
            seen.append((objective_cfg.eps, objective_cfg.warmup))
            return objective(model, x, y, noise, objective_cfg)

        trainer.objective = spy
        trainer.fit()
    # eps 0.6 reached linearly over 3 epochs, then kept: what the objective got and the log says.
    expected = [(0.2, 1 / 3), (0.4, 2 / 3), (0.6, 1.0), (0.6, 1.0)]
    assert seen == [pytest.approx(pair, abs=1e-12) for pair in expected]
    assert [r["eps"] for r in read_log(tmp_path / "run")] == pytest.approx([0.2, 0.4, 0.6, 0.6])


# ---------------------------------------------------------------- options inside the trainer


def test_label_smoothing_reaches_the_trained_loss(tmp_path):
    cfg = tiny(tmp_path / "run", label_smoothing=0.2)
    with Trainer(cfg, progress=False) as trainer:
        # The first step's batch and noise, drawn as train_epoch draws them, on the initial model.
        x, y = next(iter(train_loader(trainer.train_set, cfg, trainer.ctx, 0)))
        noise = draw_noise(cfg, trainer.ctx, x, rng.generator(cfg.seed, "training-noise", 0))
        with torch.no_grad():
            log_p = trainer.model((x[:, None] + noise).flatten(0, 1)).log_softmax(-1)
        nll = -log_p.gather(1, y.repeat_interleave(cfg.k)[:, None]).mean()
        uniform = -log_p.mean()  # cross-entropy against the uniform distribution over classes
        trainer.fit()
    (record,) = read_log(tmp_path / "run")
    assert record["l_per"] == pytest.approx(float(0.8 * nll + 0.2 * uniform), rel=1e-5)
    assert abs(record["l_per"] - float(nll)) > 1e-3


def test_fp16_training_scales_the_loss(tmp_path, monkeypatch):
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, loss: scaled.append(self.get_scale()) or original(self, loss))
    half, full = tmp_path / "fp16", tmp_path / "fp32"
    with Trainer(tiny(half, amp="fp16"), progress=False) as trainer:
        logits = []
        trainer.model.register_forward_hook(lambda module, args, out: logits.append(out.dtype))
        trainer.fit()
    train(tiny(full), progress=False)
    state = torch.load(half / CHECKPOINT, weights_only=True)
    assert logits == [torch.float16]  # the one step's forward ran under fp16 autocast (CPU too)
    assert scaled[0] == 65536.0  # the fp16 run scaled its loss before backward
    assert state["scaler"]["_growth_tracker"] == 1  # one step taken with finite gradients
    # The step used the unscaled gradients: its update matches the fp32 run's.
    torch.manual_seed(0)  # the trainer's initial weights: build_model after seeding with cfg.seed
    start = build_model("lenet", "mnist").state_dict()
    update = {k: state["model"][k] - start[k] for k in start}
    reference = torch.load(full / CHECKPOINT, weights_only=True)["model"]
    for key, delta in update.items():
        expected = reference[key] - start[key]
        assert torch.linalg.norm(delta - expected) <= 0.05 * torch.linalg.norm(expected), key


def test_channels_last_reaches_the_model_and_trains_alike(tmp_path, tiny_cifar):
    runs = {}
    for channels_last in (True, False):
        cfg = tiny_cifar_run(tmp_path / str(channels_last), tiny_cifar, batch=64,
                             channels_last=channels_last)
        with Trainer(cfg, progress=False) as trainer:
            seen = []
            trainer.model.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(
                args[0].is_contiguous(memory_format=torch.channels_last)))
            trainer.fit()
            first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
            assert first_conv.weight.is_contiguous(memory_format=torch.channels_last) is \
                channels_last
        assert seen == [channels_last]  # the one step's input
        runs[channels_last] = torch.load(Path(cfg.out) / CHECKPOINT, weights_only=True)["model"]
    # Other conv kernels round differently (1.3% of the step at most, measured): the same step.
    torch.manual_seed(0)
    start = build_model("cifar_resnet20", "cifar10").state_dict()
    for key, value in runs[True].items():
        step = runs[False][key] - start[key]
        if value.is_floating_point() and step.any():
            assert torch.linalg.norm(value - runs[False][key]) <= 0.1 * torch.linalg.norm(step)


def test_a_batch_that_does_not_fit_in_memory_names_a_smaller_batch(tmp_path):
    # 64 examples x 2**30 noisy copies of 28x28 floats: 215 PB, more than any address space.
    run = tmp_path / "run"
    with pytest.raises(BatchTooLargeError, match=r"batch: a batch of 64 .* try --batch 32 or"):
        train(tiny(run, k=2**30), progress=False)
    assert not (run / CHECKPOINT).exists()


def test_eps_warms_up_linearly():
    cfg = resolve_config(objective="smoothadv", eps=0.5, eps_warmup=10)
    assert [eps_at(cfg, e) for e in range(12)] == pytest.approx(
        [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5, 0.5]
    )
    assert eps_at(resolve_config(objective="smoothadv", eps=0.5, eps_warmup=0), 0) == 0.5


def test_the_logged_noisy_accuracy_is_measured_on_noisy_inputs():
    """Every input sits 0.1 below the model's only threshold: clean accuracy is 1, accuracy
    under N(0, sigma^2) noise is exactly Phi(0.1 / sigma) = 0.655."""
    n, sigma = 2_000, 0.25
    x = torch.full((n, 1, 2, 2), 0.4)
    dataset = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    accuracy = evaluate(ThresholdClassifier([0.5]), dataset, sigma, torch.device("cpu"), 500, 0)
    exact = norm.cdf(0.1 / sigma)
    assert accuracy["test_clean_acc"] == 1.0
    assert abs(accuracy["test_noisy_acc"] - exact) < 4 * math.sqrt(exact * (1 - exact) / n)
