"""The demo: a tiny run through the same code path as the full one, its report and its resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import PNG, cli

import smoothcert.data
from smoothcert.cli import build_parser
from smoothcert.demo import conclusions, render_report
from smoothcert.train import Trainer

TINY = ["--epochs", "1", "--train-subset", "256", "--certify", "6", "--skip", "50", "--n0", "20",
        "--N", "200", "--k", "2", "--amp", "none"]


def rows_without_time(path) -> list[list[str]]:
    """The rows without the time and the run fingerprint (which hashes the checkpoint file,
    whose saved config holds its own folder)."""
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    drop = {lines[0].index("time"), lines[0].index("run")}
    return [[v for i, v in enumerate(line) if i not in drop] for line in lines]


def test_demo_reports_both_comparisons_and_resumes_without_recomputing(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, stderr = cli(capsys, "demo", "--out", str(out), *TINY)
    assert code == 0, stderr
    report = (out / "report.md").read_text()
    for heading in ("## Conclusion (computed from this run's numbers)", "## Paired differences",
                    "| ADREREG − Basic |", "T-CERTIFY (paper mode) − CERTIFY"):
        assert heading in report
    for label in ("Basic", "ADREREG λ=0.2"):
        for method in ("CERTIFY", "T-CERTIFY (paper mode)", "T-CERTIFY (strict)"):
            assert f"| {label}: {method} |" in report
    for picture in ("certified_accuracy.png", "examples.png"):
        assert (out / picture).read_bytes().startswith(PNG)
        assert f"]({picture})" in report
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["adre_minus_basic"]["mean"]) == len(summary["radii"])
    for line in summary["conclusion"]:  # the conclusion is the report's, and it is logged
        assert f"- {line}" in report and line in stderr
    assert "training Basic" in stderr and stdout == ""
    for name in ("basic", "adre"):
        assert len((out / f"{name}.tsv").read_text().splitlines()) == 1 + 6

    # The same command again: nothing is trained or certified again.
    files = {p: p.read_bytes() for p in (out / "basic.tsv", out / "adre.tsv",
                                         out / "basic" / "checkpoint.pt")}
    code, _, stderr = cli(capsys, "demo", "--out", str(out), *TINY)
    assert code == 0, stderr
    assert {p: p.read_bytes() for p in files} == files

    # More epochs into the same folder: training resumes, certification is redone, not mixed.
    longer = [*TINY[:1], "2", *TINY[2:]]
    code, _, stderr = cli(capsys, "demo", "--out", str(out), *longer)
    assert code == 0, stderr
    for name in ("basic", "adre"):
        tsv = out / f"{name}.tsv"
        meta = json.loads(tsv.with_name(tsv.name + ".json").read_text())
        assert len(tsv.read_text().splitlines()) == 1 + 6
        assert tsv.read_bytes() != files[tsv]  # recertified with the 2-epoch model
        assert {line.split("\t")[7] for line in tsv.read_text().splitlines()[1:]} == {meta["run"]}

    # Deterministic: a fresh folder, trained without a break, gives the same rows.
    again = tmp_path / "again"
    code, _, stderr = cli(capsys, "demo", "--out", str(again), *longer)
    assert code == 0, stderr
    for name in ("basic", "adre"):
        assert rows_without_time(again / f"{name}.tsv") == rows_without_time(out / f"{name}.tsv")


def test_conclusions_follow_the_numbers():
    radii = np.array([0.0, 1.0, 2.0])
    gain = (np.array([-0.05, 0.001, 0.09]), np.array([0.01, 0.01, 0.02]))
    lines = conclusions(radii, gain, {"basic": (0.10, 0.01), "adre": (0.01, 0.02)},
                        {"basic": (0.08, 0.01), "adre": (0.0, 0.01)},
                        {"basic": "Basic", "adre": "ADREREG"})
    assert "ADREREG certifies 9.0 ± 2.0 points more than Basic at r = 2.00" in lines[0]
    assert "5.0 ± 1.0 points fewer than Basic at r = 0.00" in lines[1]
    assert "At r = 1.00 the difference" in lines[2] and "not significant" in lines[2]
    assert "Basic: T-CERTIFY raises the average certified radius by 0.100 ± 0.010" in lines[3]
    assert "(beyond two standard errors)" in lines[3]
    assert "ADREREG: T-CERTIFY" in lines[4] and "(within two standard errors)" in lines[4]


@pytest.mark.parametrize("args, message", [
    (["--certify", "0"], "--max-examples must be an integer in [1, 250] (every 40th of the 10,000 "
                         "test images), got 0"),
    (["--max-examples", "51", "--skip", "200"], "--max-examples must be an integer in [1, 50]"),
    (["--skip", "0"], "--skip must be an integer in [1, 10,000], got 0"),
    (["--train-subset", "-1"], "--train-subset must be an integer in [0, 60,000] (0: all)"),
    (["--train-subset", "60001"], "--train-subset must be an integer in [0, 60,000]"),
    (["--lam", "-1"], "lam must be a finite number >= 0, got -1"),
    (["--lam", "nan"], "lam must be a finite number"),
    (["--k", "0"], "k must be an integer >= 1, got 0"),
    (["--sigma", "0"], "sigma must be a finite number > 0"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--lr", "0"], "lr must be > 0"),
    (["--n0", "0"], "argument --n0: must be an integer in [1, 10000000]"),
    (["--N", "0"], "argument --N: must be an integer in [1, 10000000]"),
    (["--alpha", "1"], "alpha must be a number in"),
    (["--batch", "0"], "batch must be an integer >= 1"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
])
def test_every_demo_option_is_checked_before_anything_loads(capsys, monkeypatch, tmp_path,
                                                            args, message):
    def no_data(*args, **kwargs):
        raise AssertionError("a dataset was loaded before the options were checked")

    monkeypatch.setattr(smoothcert.data, "get_dataset", no_data)
    out = tmp_path / "demo"
    code, _, stderr = cli(capsys, "demo", "--out", str(out), *args)
    assert code == 2 and "Traceback" not in stderr
    assert f"smoothcert demo: error: {message}" in stderr
    assert not out.exists()


def test_an_interrupted_demo_says_what_it_kept(capsys, monkeypatch, tmp_path):
    train_epoch = Trainer.train_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # what Ctrl-C or SIGTERM raises
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted_in_epoch_2)
    out = tmp_path / "demo"
    code, _, stderr = cli(capsys, "demo", "--out", str(out), *TINY, "--epochs", "2")
    assert code == 130 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"smoothcert demo: interrupted: checkpoint of epoch 1 kept in "
        f"'{out / 'basic' / 'checkpoint.pt'}'; run the same command to resume")


@pytest.mark.parametrize("amp, said", [("bf16", "bf16 autocast"), ("fp16", "fp16 autocast"),
                                       ("none", "Fast paths used: float32"),
                                       (None, "Fast paths used: float32")])
def test_the_report_names_the_autocast_dtype_the_demo_ran_with(amp, said):
    args = build_parser(["demo"]).parse_args(["demo"])
    args.amp = amp
    report = render_report(args, [], {}, np.array([0.5]), (np.zeros(1), np.zeros(1)), {}, {},
                           [], 60.0)
    assert said in " ".join(report.split())


def test_examples_png_says_which_t_certify_mode_it_shows(monkeypatch, tmp_path):
    import argparse

    import torch

    from smoothcert import demo
    from smoothcert.analyze import ResultCurve

    figures: list = []
    monkeypatch.setattr(demo, "save_figure", lambda fig, path: figures.append(fig))
    monkeypatch.setattr(smoothcert.data, "get_dataset",
                        lambda name, split: [(torch.zeros(1, 4, 4), 3)] * 50)
    models = [demo.DemoModel("basic", "Basic", {})]
    curve = ResultCurve("x", np.linspace(0, 1, 5), np.ones(5, bool), method="tcertify")
    args = argparse.Namespace(skip=10, num_certify=5, seed=0, sigma=1.0)
    demo.plot_examples(args, models, {"basic": {"tcertify": curve}}, tmp_path / "e.png")
    title = figures[0].get_suptitle()
    assert "T-CERTIFY (paper mode)" in title and "2α − α/grid" in title
