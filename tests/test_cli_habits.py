"""The command line as a researcher expects it: every default in --help, --version, one
result line under torchrun."""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

import smoothcert
from smoothcert import cli


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser(list(argv)).parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps at the width


@pytest.mark.parametrize("argv, shown", [
    (["certify"], ["--N N estimation samples (alias: --n) (default: 100000)",
                   "--alpha ALPHA failure probability (default: 0.001)",
                   "--batch BATCH noisy samples per forward (default: 1000)",
                   "--n0 N0 selection samples (default: 100)",
                   "--skip SKIP certify every skip-th example (default: 1)",
                   "--split SPLIT the dataset's split (default: test)",
                   "--seed SEED seed of the noise draws (default: 0)",
                   "--grid GRID T-CERTIFY alpha' grid size (default: 10)",
                   "--device DEVICE auto (a GPU if any), cpu, cuda, cuda:N or mps "
                   "(default: auto)"]),
    (["predict"], ["(alias: --n) (default: 100000)", "--alpha ALPHA failure probability "
                   "(default: 0.001)"]),
    (["demo"], ["--alpha ALPHA failure probability (default: 0.001)",
                "--seed SEED seed of training and noise draws (default: 0)",
                "--N N estimation samples (default 5,000)"]),  # its own wording kept, not twice
    (["train"], ["--sigma SIGMA", "(default 0.25)", "--lr LR"]),
])
def test_every_help_shows_the_defaults(capsys, argv, shown):
    text = help_text(capsys, *argv)
    for entry in shown:
        assert entry in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default[ :][^)]*\) \(default: ", text)  # never two defaults


def test_every_option_of_every_command_shows_its_default_and_no_flag_a_value():
    parser = cli.build_parser(["train"])
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for name, command in commands.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.help is argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
                assert "(default: " not in text, (name, action.option_strings)  # --no-normalize
            elif action.default is not None:
                assert "default" in text, (name, action.option_strings)
                checked += 1
    assert checked > 30  # certify's, predict's and demo's


def test_train_help_shows_each_default_once(capsys):
    text = help_text(capsys, "train")
    assert "(default: " not in text  # train's help names its (preset's) values itself


def test_version_prints_the_installed_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"smoothcert {importlib.metadata.version('smoothcert')}\n"

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)  # a source tree, not installed
    assert cli.version() == smoothcert.__version__


@pytest.mark.parametrize("command, printed", [
    ("certify", "results: r.tsv\n"),
    ("predict", "results: r.tsv\nabstention rate: 0.2500\n"),
    ("train", "checkpoint: c.pt\n"),
])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_only_rank_0_prints_the_result_line(capsys, monkeypatch, tmp_path, rank,
                                                            command, printed):
    from smoothcert import runner, train

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(runner, "run", lambda cfg, progress: "r.tsv")
    monkeypatch.setattr(runner, "abstention_rate", lambda path: 0.25)
    monkeypatch.setattr(train, "train", lambda cfg, resume, progress: "c.pt")
    (tmp_path / "c.pt").touch()  # certify and predict refuse a missing checkpoint first
    argv = ["--out", str(tmp_path / "run")] if command == "train" else \
        [str(tmp_path / "c.pt"), "--out", "r.tsv"]
    assert cli.main(["--no-progress", command, *argv]) == 0
    assert capsys.readouterr().out == (printed if rank == "0" else "")


@pytest.mark.parametrize("argv, message", [
    (["certify", "c.pt", "--out", "o.tsv", "--checkpoint-format", "cohen"],
     "smoothcert certify: error: sigma: a cohen checkpoint does not record the noise level"),
    (["predict", "c.pt", "--out", "o.tsv", "--format", "macer"], "give --sigma"),
    (["certify", "c.pt", "--out", "o.tsv", "--sigma", "-0.5"],
     "argument --sigma: must be a positive finite number, got '-0.5'"),
    (["certify", "c.pt", "--out", "o.tsv", "--sigma", "nan"], "positive finite"),
    (["objectives", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_refused_before_torch_is_imported(tmp_path, argv, message):
    from test_imports import imported

    names, done = imported("-m", "smoothcert", *argv)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not names & {"torch", "torchvision"}
