"""train's options come from TrainConfig's typed fields; the listing commands; old spellings."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields

import pytest
from test_cli import cli as run
from test_imports import imported

from smoothcert.cli import build_parser
from smoothcert.io import read_checkpoint_state, save_checkpoint
from smoothcert.models import MODELS
from smoothcert.objectives import OBJECTIVES
from smoothcert.options import TRAIN_COMMAND_OPTIONS
from smoothcert.presets import PRESETS, TrainConfig, choices, resolve_config
from smoothcert.runner import RunConfig
from smoothcert.stats import MAX_SAMPLES
from smoothcert.train import CHECKPOINT, CONFIG, load_model, train

TINY = ["--epochs", "1", "--train-subset", "64", "--batch", "64", "--k", "2", "--eval-subset",
        "0", "--device", "cpu"]


def train_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = build_parser(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def test_every_train_option_is_a_config_field_and_every_field_an_option():
    options = {a.dest for a in train_parser()._actions} - {"help", "debug", "no_progress"}
    names = {f.name for f in fields(TrainConfig)}
    assert options - TRAIN_COMMAND_OPTIONS == names
    assert not TRAIN_COMMAND_OPTIONS & names


def test_categorical_options_offer_the_registries_as_choices():
    actions = {a.dest: a for a in train_parser()._actions if a.option_strings[0] != "--method"}
    accepted = choices()
    # --model takes a spec besides the registry's names (issue 23): checked by TrainConfig
    assert set(accepted) == {"dataset", "objective", "schedule", "amp"}
    assert accepted["objective"] == tuple(OBJECTIVES)
    for name, values in accepted.items():
        if name != "amp":  # amp also takes none (float32): tests/test_cli_vocabulary.py
            assert tuple(actions[name].choices) == values


@pytest.mark.parametrize("flag", ["--dataset", "--objective", "--schedule", "--amp"])
def test_a_value_outside_the_choices_is_a_usage_error(capsys, flag):
    code, _, err = run(capsys, "train", flag, "nope")
    assert code == 2 and f"argument {flag}: invalid choice: 'nope'" in err


def option_help(text: str, flag: str) -> str:
    """The help of `flag` in argparse's help text, on one line."""
    block = re.search(rf"^  {flag} \S+(.*?)(?=^  -)", text, re.M | re.S).group(1)
    return " ".join(block.split())


@pytest.mark.parametrize("argv", [["--preset", "mnist-lenet", "--help"],
                                  ["--help", "--preset=mnist-lenet"]])
def test_train_help_under_a_preset_shows_its_values(capsys, argv):
    code, out, _ = run(capsys, "train", *argv)
    assert code == 0
    assert option_help(out, "--epochs").endswith("(default 12, preset mnist-lenet)")
    assert option_help(out, "--lr").endswith("(default 0.05, preset mnist-lenet)")
    assert option_help(out, "--sigma").endswith("(default 0.25)")  # the preset keeps it


def test_train_help_without_a_preset_shows_the_field_defaults(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    assert option_help(out, "--epochs").endswith("(default 10)")
    assert option_help(out, "--lr").endswith("(default 0.01)")
    assert option_help(out, "--amp").endswith("(default none)")


def test_presets_lists_each_preset_with_its_resolved_settings(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert list(lines) == list(PRESETS)
    for name, line in lines.items():
        cfg = resolve_config(name)
        for key in ("dataset", "model", "objective", "epochs", "batch", "lr"):
            assert f" {key}={getattr(cfg, key)}" in line
    assert " batch=256 " in lines["imagenet-resnet50"]  # 256 // k, as training resolves it


def test_models_and_objectives_list_their_registries(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and out.split() == list(MODELS)
    code, out, _ = run(capsys, "objectives")
    rows = [line.split(None, 1) for line in out.splitlines()]
    assert code == 0 and [name for name, _ in rows] == list(OBJECTIVES)
    assert dict(rows)["adre"] == "ADREREG (Feng 2020, Algorithm 1)."
    summaries = {line.index(summary) for line, (_, summary) in zip(out.splitlines(), rows,
                                                                     strict=True)}
    assert len(summaries) == 1  # one column, also after the longest name (denoiser-stability)


def test_the_old_method_option_still_trains_and_warns(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--preset", "mnist-lenet", "--method", "adre", "--lam",
                       "0.1", *TINY, "--out", str(out))
    assert code == 0
    assert "--method is deprecated" in err and "use --objective" in err
    assert json.loads((out / CONFIG).read_text())["objective"] == "adre"
    code, _, err = run(capsys, "train", "--method", "nope")
    assert code == 2 and "argument --method: invalid choice" in err


def test_global_options_also_work_after_the_command():
    args = build_parser().parse_args(["models", "--no-progress", "--debug"])
    assert args.no_progress and args.debug
    args = build_parser().parse_args(["models"])
    assert not args.no_progress and not args.debug


def test_a_run_written_with_the_old_method_key_loads_and_resumes(tmp_path):
    """config.json and checkpoints of earlier releases name the objective "method"."""
    out = tmp_path / "old"
    options = dict(sigma=0.25, k=2, batch=64, lr=0.05, train_subset=64, eval_subset=0,
                   device="cpu", out=str(out), objective="adre", lam=0.1)
    train(resolve_config("mnist-lenet", epochs=1, **options), progress=False)
    state = read_checkpoint_state(out / CHECKPOINT)
    config = state["config"]
    config["method"] = config.pop("objective")
    save_checkpoint(out / CHECKPOINT, state)
    (out / CONFIG).write_text(json.dumps(config))

    assert load_model(out / CHECKPOINT)[1]["objective"] == "adre"
    other = dict(options, objective="consistency")
    with pytest.raises(ValueError, match="different objective"):
        train(resolve_config("mnist-lenet", epochs=2, **other), resume=True, progress=False)
    train(resolve_config("mnist-lenet", epochs=2, **options), resume=True, progress=False)
    assert read_checkpoint_state(out / CHECKPOINT)["epoch"] == 2


def test_resolve_config_names_the_new_spelling_of_an_old_key():
    with pytest.raises(ValueError, match=r"unknown training option\(s\): method \(now objective\)"):
        resolve_config(method="adre")


# --- sample counts: at most stats.MAX_SAMPLES, refused while parsing ------------------------


@pytest.mark.parametrize("value", [str(MAX_SAMPLES + 1), "99999999999999999999999", "0", "1e6"])
@pytest.mark.parametrize(("command", "flag", "shown"), [
    ("certify", "--N", "--N"), ("certify", "--n", "--n"), ("certify", "--n0", "--n0"),
    ("certify", "--max-n", "--max-n"), ("predict", "--N", "--N"), ("demo", "--N", "--N"),
    ("demo", "--n0", "--n0"),
])
def test_a_sample_count_outside_the_validated_range_is_a_usage_error(capsys, tmp_path, command,
                                                                     flag, shown, value):
    where = [] if command == "demo" else [str(tmp_path / "missing.pt")]
    code, _, err = run(capsys, command, *where, "--out", str(tmp_path / "out"), flag, value)
    assert code == 2
    assert f"argument {shown}: must be an integer in [1, 10000000], got '{value}'" in err
    assert not any(tmp_path.iterdir())


def test_the_largest_validated_sample_counts_are_accepted():
    ten_million = str(MAX_SAMPLES)
    args = build_parser().parse_args(["certify", "c.pt", "--out", "o", "--N", ten_million,
                                      "--n0", ten_million, "--max-n", ten_million])
    assert args.n == args.n0 == args.max_n == MAX_SAMPLES == 10_000_000


def test_a_sample_count_is_refused_before_torch_is_imported(tmp_path):
    names, done = imported("-m", "smoothcert", "certify", str(tmp_path / "c.pt"), "--out",
                           str(tmp_path / "o"), "--N", "99999999999999999999999")
    assert done.returncode == 2 and "argument --N: must be an integer" in done.stderr
    assert not names & {"torch", "torchvision"}


@pytest.mark.parametrize("value", ["0", "10001", "99999999999999"])
def test_a_grid_outside_its_range_is_refused_before_torch_is_imported(tmp_path, value):
    names, done = imported("-m", "smoothcert", "certify", str(tmp_path / "c.pt"), "--out",
                           str(tmp_path / "o"), "--grid", value)
    assert done.returncode == 2
    assert f"argument --grid: must be an integer in [1, 10000], got '{value}'" in done.stderr
    assert not names & {"torch", "torchvision"}


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_a_missing_checkpoint_is_refused_before_torch_is_imported(tmp_path, command):
    names, done = imported("-m", "smoothcert", command, str(tmp_path / "c.pt"), "--out",
                           str(tmp_path / "o"), "--sigma", "0.25")
    assert done.returncode == 2
    assert f"checkpoint: no such file '{tmp_path / 'c.pt'}'" in done.stderr
    assert not names & {"torch", "torchvision"}


def test_run_config_refuses_a_grid_above_the_limit():
    with pytest.raises(ValueError, match=r"^grid must be an integer in \[1, 10000\], got 10001"):
        RunConfig(checkpoint="missing.pt", out="o", grid=10_001).validate()


@pytest.mark.parametrize("name", ["n0", "n", "max_n"])
def test_run_config_refuses_a_sample_count_above_the_limit(name):
    sampling = {"adaptive_n": True} if name == "max_n" else {}
    cfg = RunConfig(checkpoint="missing.pt", out="o", **sampling, **{name: MAX_SAMPLES + 1})
    with pytest.raises(ValueError, match=rf"^{name} must be an integer in \[1, 10000000\]"):
        cfg.validate()


def test_a_bonferroni_alpha_too_small_for_its_looks_exits_2_before_any_row(
        capsys, trained_checkpoint, tmp_path):
    out = tmp_path / "radii.tsv"
    code, _, err = run(capsys, "certify", str(trained_checkpoint), "--out", str(out), "--radii",
                       "0.25", "--max-n", "10000", "--batch", "100", "--confidence-sequence",
                       "bonferroni", "--alpha", "3e-100", "--max-examples", "1", "--device",
                       "cpu", "--final-share", "0")
    assert code == 2 and "Traceback" not in err
    assert ("error: alpha must be >= 8e-100 for certify with the bonferroni confidence "
            "sequence and final share 0") in err
    assert not out.exists()
