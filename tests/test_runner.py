"""The certify/predict runner: file layout, full-precision values, resume, --max, checkpoints."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothcert.data import get_dataset
from smoothcert.io import CheckpointError, load_checkpoint
from smoothcert.runner import (
    COHEN_COLUMNS,
    COUNT_COLUMNS,
    PREDICT_COLUMNS,
    RunConfig,
    Runner,
    abstention_rate,
    run,
    selected_indices,
)
from smoothcert.stats import alpha_grid, certify_from_counts
from smoothcert.train import load_model

GROUP = ["predict", "radius", "correct", "alpha", "pa_lower", "pb_upper"]
BOTH_COLUMNS = (
    COHEN_COLUMNS + [f"tcertify_{f}" for f in GROUP] + [f"strict_{f}" for f in GROUP]
    + COUNT_COLUMNS
)
TIMEDELTA = re.compile(r"^(\d+):(\d\d):(\d\d(?:\.\d{6})?)$")
SIGMA = 0.5  # the shared checkpoint's
N0, N, COUNT = 10, 200, 6


def certify(checkpoint: Path, out: Path, **options) -> Path:
    values = dict(checkpoint=str(checkpoint), out=str(out), n0=N0, n=N, batch=N, max=COUNT,
                  device="cpu")
    values.update(options)
    return run(RunConfig(**values), progress=False)


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    return header, rows


def without_time(path: Path) -> list[list[str]]:
    lines = path.read_text().split("\n")
    return [[f for i, f in enumerate(line.split("\t")) if i != 5] for line in lines]


def parse_counts(text: str) -> dict[int, int]:
    return {int(c): int(v) for c, v in (item.split(":") for item in text.split(","))}


@pytest.fixture(scope="module")
def test_labels() -> list[int]:
    dataset = get_dataset("mnist", "test")
    return [int(dataset[i][1]) for i in range(COUNT)]


@pytest.fixture(scope="module")
def both_file(trained_checkpoint, tmp_path_factory) -> Path:
    """The reference result of method both on the first 6 test images (read-only)."""
    return certify(trained_checkpoint, tmp_path_factory.mktemp("both") / "both.tsv")


# ---------------------------------------------------------------- layout and values


def test_method_both_writes_the_full_layout(both_file, test_labels):
    text = both_file.read_text()
    assert text.startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime\t")
    assert text.endswith("\n")
    header, rows = read_table(both_file)
    assert header == BOTH_COLUMNS
    assert [int(r["idx"]) for r in rows] == list(range(COUNT))
    assert [int(r["label"]) for r in rows] == test_labels
    grid = set(alpha_grid(0.001, 10).tolist())
    for r in rows:
        for prefix in ("", "tcertify_", "strict_"):
            predict, radius = int(r[prefix + "predict"]), float(r[prefix + "radius"])
            assert int(r[prefix + "correct"]) == int(predict == int(r["label"]))
            assert r[prefix + "radius"] == repr(radius)  # full precision, not "{:.3}"
            assert radius >= 0 and (predict == -1) == (radius == 0)
        assert float(r["tcertify_radius"]) >= float(r["radius"])
        assert float(r["strict_radius"]) <= float(r["tcertify_radius"])
        assert float(r["tcertify_alpha"]) in grid and float(r["strict_alpha"]) in grid
        assert TIMEDELTA.match(r["time"]), r["time"]
        counts = parse_counts(r["counts"])
        assert sum(counts.values()) == int(r["n"]) == N
        assert int(r["n0"]) == N0
        assert int(r["count_a"]) + int(r["count_b"]) <= N
        assert int(r["count_b"]) <= N - int(r["count_a"])
        if int(r["predict"]) != -1:
            assert int(r["count_a"]) == counts[int(r["predict"])]
    # A model trained this briefly still certifies some images, at radii with many digits.
    certified = [r for r in rows if int(r["predict"]) != -1]
    assert certified
    assert any(len(r["radius"]) > 6 for r in certified)


def test_certificates_can_be_recomputed_from_the_written_counts(both_file):
    _, rows = read_table(both_file)
    for r in rows:
        top = int(r["predict"])
        if top == -1:
            continue
        estimation = np.zeros(10, dtype=np.int64)
        for c, v in parse_counts(r["counts"]).items():
            estimation[c] = v
        selection = np.zeros(10, dtype=np.int64)
        selection[top] = N0  # only the selected class matters for these two methods
        for method, prefix in (("certify", ""), ("tcertify", "tcertify_")):
            cert = certify_from_counts(selection, estimation, SIGMA, 0.001, method, 10)
            assert (cert.label, cert.radius) == (top, float(r[prefix + "radius"]))


def test_time_column_is_a_timedelta(both_file):
    _, rows = read_table(both_file)
    for r in rows:
        hours, minutes, seconds = TIMEDELTA.match(r["time"]).groups()
        spent = datetime.timedelta(hours=int(hours), minutes=int(minutes), seconds=float(seconds))
        assert str(spent) == r["time"]


@pytest.mark.parametrize(
    "method, columns",
    [
        ("certify", COHEN_COLUMNS + COUNT_COLUMNS),
        ("tcertify", COHEN_COLUMNS + [f"strict_{f}" for f in GROUP] + COUNT_COLUMNS),
    ],
)
def test_certify_and_tcertify_layouts(trained_checkpoint, both_file, tmp_path, method, columns):
    out = certify(trained_checkpoint, tmp_path / f"{method}.tsv", method=method, max=3)
    header, rows = read_table(out)
    assert header == columns
    _, reference = read_table(both_file)
    main = "radius" if method == "certify" else "tcertify_radius"
    for r, ref in zip(rows, reference[:3], strict=False):  # same seed: the same samples
        assert r["radius"] == ref[main]
        assert r["counts"] == ref["counts"]
        if method == "tcertify":
            assert r["strict_radius"] == ref["strict_radius"]
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["method"] == method
    assert meta["sigma"] == SIGMA and meta["dataset"] == "mnist"
    assert "3 examples" in meta["protocol"] and "test split" in meta["protocol"]


def test_sidecar_states_the_protocol(both_file):
    meta = json.loads(Path(f"{both_file}.json").read_text())
    assert meta["sigma"] == SIGMA
    assert meta["dataset"] == "mnist"
    assert meta["method"] == "certify"  # what the six main columns hold
    assert meta["protocol"] == "test split, every 1th example from index 0, 6 examples"
    assert (meta["n0"], meta["n"], meta["alpha"]) == (N0, N, 0.001)


# ---------------------------------------------------------------- resume


def copy_result(source: Path, folder: Path) -> Path:
    folder.mkdir()
    target = folder / source.name
    shutil.copy(source, target)
    shutil.copy(f"{source}.json", f"{target}.json")
    return target


@pytest.mark.parametrize("keep_rows", [5, 2])
def test_a_file_cut_mid_row_resumes_without_losing_or_duplicating_rows(
    trained_checkpoint, both_file, tmp_path, keep_rows
):
    out = copy_result(both_file, tmp_path / "cut")
    lines = both_file.read_text().split("\n")
    half_row = lines[1 + keep_rows][: len(lines[1 + keep_rows]) // 2]
    out.write_text("\n".join(lines[: 1 + keep_rows]) + "\n" + half_row)
    certify(trained_checkpoint, out)
    _, rows = read_table(out)
    assert [int(r["idx"]) for r in rows] == list(range(COUNT))
    assert without_time(out) == without_time(both_file)  # identical certificates
    # The rows that were complete are kept as they were, time included.
    assert out.read_text().split("\n")[: 1 + keep_rows] == lines[: 1 + keep_rows]


def test_a_killed_run_resumes_to_the_uninterrupted_result(
    trained_checkpoint, both_file, tmp_path, monkeypatch
):
    out = tmp_path / "killed.tsv"
    original = Runner._row

    def row_or_die(self, idx):
        if idx == 3:
            raise KeyboardInterrupt
        return original(self, idx)

    monkeypatch.setattr(Runner, "_row", row_or_die)
    with pytest.raises(KeyboardInterrupt):
        certify(trained_checkpoint, out)
    monkeypatch.undo()
    assert [int(r["idx"]) for r in read_table(out)[1]] == [0, 1, 2]  # flushed as produced
    certify(trained_checkpoint, out)
    assert without_time(out) == without_time(both_file)


def test_rerunning_a_finished_run_changes_nothing(trained_checkpoint, both_file, tmp_path):
    out = copy_result(both_file, tmp_path / "again")
    certify(trained_checkpoint, out)
    assert out.read_text() == both_file.read_text()


def test_a_larger_max_extends_a_run(trained_checkpoint, both_file, tmp_path):
    out = certify(trained_checkpoint, tmp_path / "grow.tsv", max=2)
    certify(trained_checkpoint, out, max=4)
    assert without_time(out) == without_time(both_file)[:5] + [[""]]


@pytest.mark.parametrize(
    "change, name",
    [(dict(n=100, batch=100), "n"), (dict(alpha=0.01), "alpha"), (dict(seed=1), "seed"),
     (dict(sigma=0.25), "sigma"), (dict(n0=20), "n0")],
)
def test_resuming_with_other_settings_is_refused(
    trained_checkpoint, both_file, tmp_path, change, name
):
    out = copy_result(both_file, tmp_path / "other")
    with pytest.raises(ValueError, match=rf"\b{name}\b") as err:
        certify(trained_checkpoint, out, **change)
    assert "--out" in str(err.value)
    assert out.read_text() == both_file.read_text()


@pytest.mark.parametrize("method", ["certify", "tcertify"])
def test_a_file_with_other_columns_is_refused(trained_checkpoint, both_file, tmp_path, method):
    out = copy_result(both_file, tmp_path / "layout")
    with pytest.raises(ValueError, match="--out"):
        certify(trained_checkpoint, out, method=method)
    assert out.read_text() == both_file.read_text()


def test_a_foreign_file_is_refused_and_left_alone(trained_checkpoint, tmp_path):
    out = tmp_path / "sigma_0.25"  # e.g. one of Cohen et al.'s result files
    out.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t7\t7\t0.5\t1\t0:00:01\n")
    before = out.read_text()
    with pytest.raises(ValueError, match="--out"):
        certify(trained_checkpoint, out)
    assert out.read_text() == before
    assert not Path(f"{out}.json").exists()  # no sidecar that would mislabel it


# ---------------------------------------------------------------- selection and predict


def test_max_is_a_count_and_skip_a_stride(trained_checkpoint, tmp_path):
    out = certify(trained_checkpoint, tmp_path / "sel.tsv", method="certify", n=50, batch=50,
                  max=3, skip=2)
    assert [int(r["idx"]) for r in read_table(out)[1]] == [0, 2, 4]
    assert selected_indices(10, 3, 2) == [0, 3]
    assert selected_indices(10, 3, None) == [0, 3, 6, 9]
    assert selected_indices(10, 1, 0) == []
    cfg = RunConfig(checkpoint="c.pt", out="o.tsv", max=-1).validate()
    assert cfg.max is None  # Cohen's -1: no limit


def test_predict_layout_and_abstention_rate(trained_checkpoint, tmp_path, test_labels):
    out = certify(trained_checkpoint, tmp_path / "pred.tsv", mode="predict", max=4)
    header, rows = read_table(out)
    assert header == PREDICT_COLUMNS == ["idx", "label", "predict", "correct", "time"]
    assert [int(r["label"]) for r in rows] == test_labels[:4]
    for r in rows:
        assert int(r["correct"]) == int(int(r["predict"]) == int(r["label"]))
        assert TIMEDELTA.match(r["time"])
    expected = sum(int(r["predict"]) == -1 for r in rows) / len(rows)
    assert abstention_rate(out) == expected < 1
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["method"] == "predict" and meta["mode"] == "predict"
    # Resuming a predict run works (and changes nothing once finished).
    before = out.read_text()
    certify(trained_checkpoint, out, mode="predict", max=4)
    assert out.read_text() == before


def test_predict_abstains_when_n_is_too_small_for_alpha(trained_checkpoint, tmp_path):
    # 5 of 5 votes has a two-sided p-value of 1/16 > alpha: PREDICT must abstain.
    out = certify(trained_checkpoint, tmp_path / "few.tsv", mode="predict", n=5, batch=5, max=3)
    assert abstention_rate(out) == 1.0
    assert all(r["predict"] == "-1" and r["correct"] == "0" for r in read_table(out)[1])


def test_abstention_rate_of_a_handwritten_file(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:00\n"
                    "1\t2\t-1\t0\t0:00:00\n2\t3\t-1\t0\t0:00:00\n3\t4\t5\t0\t0:00:00\n")
    assert abstention_rate(path) == 0.5


@pytest.mark.parametrize(
    "options, name",
    [(dict(n0=0), "n0"), (dict(n=0), "n"), (dict(alpha=1.5), "alpha"), (dict(batch=0), "batch"),
     (dict(skip=0), "skip"), (dict(grid=0), "grid"), (dict(method="foo"), "method"),
     (dict(mode="foo"), "mode"), (dict(sigma=0.0), "sigma")],
)
def test_bad_run_options_are_rejected_before_any_work(trained_checkpoint, tmp_path, options,
                                                      name):
    out = tmp_path / "bad.tsv"
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        certify(trained_checkpoint, out, **options)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- checkpoints


def _touch_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this calls _touch_marker: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch_marker, (str(self.marker),)


def _missing(path: Path, checkpoint: Path) -> None:
    pass


def _truncated(path: Path, checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path, checkpoint: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path, checkpoint: Path) -> None:
    path.write_text("this is not a checkpoint\n")


def _other_dict(path: Path, checkpoint: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)


def _a_list(path: Path, checkpoint: Path) -> None:
    torch.save([torch.zeros(2)], path)


def _foreign_config(path: Path, checkpoint: Path) -> None:
    # Another project's checkpoint in the common {"model", "config"} layout.
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "config": {"lr": 0.1}}, path)


def _wrong_weights(path: Path, checkpoint: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {"fc.weight": torch.zeros(2, 2)}
    del state["weights_sha256"]  # else the checksum catches it first (tests/test_checkpoints.py)
    torch.save(state, path)


@pytest.mark.parametrize(
    "make, message",
    [
        (_missing, "no such file"),
        (_truncated, "truncated"),
        (_empty, "checkpoint"),
        (_text, "checkpoint"),
        (_other_dict, "not a smoothcert checkpoint"),
        (_a_list, "not a smoothcert checkpoint"),
        (_foreign_config, "not a smoothcert checkpoint"),
        (_wrong_weights, "not a smoothcert checkpoint"),
    ],
)
def test_bad_checkpoints_raise_checkpoint_error(trained_checkpoint, tmp_path, make, message):
    path = tmp_path / "model.pt"
    make(path, trained_checkpoint)
    if make not in (_foreign_config, _wrong_weights):  # these have the expected keys
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value)
    out = tmp_path / "out.tsv"
    with pytest.raises(CheckpointError, match=message):
        certify(path, out)
    assert not out.exists()


def test_a_checkpoint_that_would_run_code_is_refused(trained_checkpoint, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    state = torch.load(trained_checkpoint, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refusing") as err:
        load_checkpoint(path)
    assert isinstance(err.value, ValueError)
    with pytest.raises(CheckpointError):
        certify(path, tmp_path / "out.tsv")
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_the_shared_checkpoint_loads_as_a_model(trained_checkpoint):
    model, config = load_model(trained_checkpoint)
    assert not model.training
    assert config["sigma"] == SIGMA and config["dataset"] == "mnist"
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
