"""The certify/predict runner: file layout, full-precision values, resume, --max, checkpoints,
and the integrity of result files (rows of one run only, one writer, nothing foreign replaced)."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import smoothcert
from smoothcert import results
from smoothcert.data import get_dataset
from smoothcert.io import CheckpointError, OutputLockedError, read_checkpoint_state
from smoothcert.presets import resolve_config
from smoothcert.runner import (
    RunConfig,
    Runner,
    abstention_rate,
    run,
    selected_indices,
)
from smoothcert.stats import alpha_grid, certify_from_counts
from smoothcert.train import load_model, train

BOTH_COLUMNS = results.columns("certify", "both")
TIMEDELTA = re.compile(r"^(\d+):(\d\d):(\d\d(?:\.\d{6})?)$")
SIGMA = 0.5  # the shared checkpoint's
N0, N, COUNT = 10, 200, 6
METHOD_PREFIXES = {"certify": "", "tcertify": "tcertify_", "tcertify-strict": "strict_"}


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


def dense(text: str) -> np.ndarray:
    counts = np.zeros(10, dtype=np.int64)
    for cls, count in results.parse_counts(text).items():
        counts[cls] = count
    return counts


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def test_labels() -> list[int]:
    dataset = get_dataset("mnist", "test")
    return [int(dataset[i][1]) for i in range(COUNT)]


@pytest.fixture(scope="module")
def both_file(trained_checkpoint, tmp_path_factory) -> Path:
    """The reference result of method both on the first 6 test images (read-only)."""
    return certify(trained_checkpoint, tmp_path_factory.mktemp("both") / "both.tsv")


@pytest.fixture(scope="module")
def retrained_checkpoint(trained_checkpoint, tmp_path_factory) -> Path:
    """The shared run trained one epoch further (`--resume --epochs 3`): another model."""
    folder = tmp_path_factory.mktemp("retrained") / "run"
    shutil.copytree(trained_checkpoint.parent, folder)
    cfg = resolve_config("mnist-lenet", sigma=0.5, k=2, epochs=3, batch=64, train_subset=512,
                         eval_subset=0, device="cpu", out=str(folder))
    return train(cfg, resume=True, progress=False)


# ---------------------------------------------------------------- layout and values


def test_method_both_writes_the_full_layout(both_file, test_labels):
    text = both_file.read_text()
    assert text.startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\trun\t")
    assert text.endswith("\n")
    header, rows = read_table(both_file)
    assert header == BOTH_COLUMNS
    assert [int(r["idx"]) for r in rows] == list(range(COUNT))
    assert [int(r["label"]) for r in rows] == test_labels
    meta = json.loads(Path(f"{both_file}.json").read_text())
    assert {r["method"] for r in rows} == {"certify"}
    assert {r["run"] for r in rows} == {meta["run"]}
    grid = set(alpha_grid(0.001, 10).tolist())
    for r in rows:
        for prefix in ("", "tcertify_", "strict_"):
            predict, radius = int(r[prefix + "predict"]), float(r[prefix + "radius"])
            assert int(r[prefix + "correct"]) == int(predict == int(r["label"]))
            assert r[prefix + "radius"] == repr(radius)  # full precision, not "{:.3}"
            assert radius >= 0 and (predict == -1) == (radius == 0)
            assert float(r[prefix + "alpha_prime"]) in grid
            assert 0 <= float(r[prefix + "pb_upper"]) <= 1 - float(r[prefix + "pa_lower"])
        assert float(r["alpha_prime"]) == 0.001  # CERTIFY spends all of alpha on pA
        assert float(r["tcertify_radius"]) >= float(r["radius"])
        assert float(r["strict_radius"]) <= float(r["tcertify_radius"])
        hours, minutes, seconds = TIMEDELTA.match(r["time"]).groups()
        spent = datetime.timedelta(hours=int(hours), minutes=int(minutes), seconds=float(seconds))
        assert str(spent) == r["time"]  # Cohen's str(timedelta)
        selection, estimation = dense(r["selection_counts"]), dense(r["estimation_counts"])
        assert selection.sum() == int(r["n0"]) == N0 and estimation.sum() == int(r["n"]) == N
        top = int(np.argmax(selection))
        assert int(r["count_a"]) == estimation[top]
        assert int(r["count_b"]) == np.delete(estimation, top).max()
    # A model trained this briefly still certifies some images, at radii with many digits.
    certified = [r for r in rows if int(r["predict"]) != -1]
    assert certified
    assert any(len(r["radius"]) > 6 for r in certified)


def test_certificates_can_be_recomputed_from_the_written_counts(both_file):
    assert results.verify(both_file) == (COUNT, [])
    _, rows = read_table(both_file)
    for r in rows:
        selection, estimation = dense(r["selection_counts"]), dense(r["estimation_counts"])
        for method, prefix in METHOD_PREFIXES.items():
            cert = certify_from_counts(selection, estimation, SIGMA, 0.001, method, 10)
            assert cert.label == int(r[prefix + "predict"])
            for name in ("radius", "alpha_prime", "pa_lower", "pb_upper"):
                assert getattr(cert, name) == float(r[prefix + name]), (method, name)


@pytest.mark.parametrize(
    "method, main, prefixes",
    [("certify", "certify", []), ("tcertify", "tcertify", ["strict_"])],
)
def test_certify_and_tcertify_layouts(trained_checkpoint, both_file, tmp_path, method, main,
                                      prefixes):
    out = certify(trained_checkpoint, tmp_path / f"{method}.tsv", method=method, max=3)
    header, rows = read_table(out)
    groups = [p + f for p in prefixes for f in results.GROUP_FIELDS]
    assert header == [*results.COHEN_COLUMNS, "method", "run", *results.BOUND_COLUMNS, *groups,
                      *results.COUNT_COLUMNS]
    _, reference = read_table(both_file)
    assert len(rows) == 3
    for r, ref in zip(rows, reference[:3], strict=True):  # same seed: the same samples
        assert r["method"] == main
        for name in ("radius", "alpha_prime", "pa_lower", "pb_upper"):
            assert r[name] == ref[METHOD_PREFIXES[main] + name]
        assert r["estimation_counts"] == ref["estimation_counts"]
        for prefix in prefixes:
            assert r[prefix + "radius"] == ref[prefix + "radius"]
    assert results.verify(out) == (3, [])
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["method"] == main and meta["layout"] == method
    assert meta["sigma"] == SIGMA and meta["dataset"] == "mnist"
    assert "3 examples" in meta["protocol"] and "test split" in meta["protocol"]


def test_sidecar_states_the_protocol_and_the_checkpoint_content(trained_checkpoint, both_file):
    meta = json.loads(Path(f"{both_file}.json").read_text())
    assert meta["format"] == results.FORMAT
    assert meta["sigma"] == SIGMA
    assert meta["dataset"] == "mnist" and meta["num_classes"] == 10
    assert meta["method"] == "certify"  # what the six main columns hold
    assert meta["protocol"] == "test split, every 1th example from index 0, 6 examples"
    assert (meta["n0"], meta["n"], meta["alpha"], meta["grid"]) == (N0, N, 0.001, 10)
    assert meta["checkpoint_sha256"] == results.file_sha256(trained_checkpoint)
    assert meta["run"] == results.fingerprint(meta)


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
    "change, differs",
    [(dict(n=100, batch=100), "n (was 200, now 100)"), (dict(alpha=0.01), "alpha (was 0.001, "
     "now 0.01)"), (dict(seed=1), "seed (was 0, now 1)"), (dict(sigma=0.25), "sigma (was 0.5, "
     "now 0.25)"), (dict(n0=20), "n0 (was 10, now 20)")],
)
def test_resuming_with_other_settings_is_refused_naming_both_values(
    trained_checkpoint, both_file, tmp_path, change, differs
):
    out = copy_result(both_file, tmp_path / "other")
    with pytest.raises(ValueError, match=rf"written with different {re.escape(differs)};") as err:
        certify(trained_checkpoint, out, **change)
    assert "--out" in str(err.value)
    assert out.read_text() == both_file.read_text()


def test_a_sidecar_edited_to_this_runs_settings_is_refused_saying_so(trained_checkpoint,
                                                                     both_file, tmp_path):
    out = copy_result(both_file, tmp_path / "edited")
    sidecar = Path(f"{out}.json")
    meta = json.loads(sidecar.read_text())
    recorded = meta["run"]
    meta.update(n=100)  # the rows are n = 200's; the sidecar now claims n = 100
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"'{re.escape(str(sidecar))}' was edited: it records "
                       rf"run {recorded}, but its settings give {results.fingerprint(meta)}"):
        certify(trained_checkpoint, out, n=100, batch=100)
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


# ---------------------------------------------------------------- rows of one run only


def keep_rows(path: Path, count: int) -> str:
    """Cut a result file down to its header and first `count` rows; return the text."""
    lines = path.read_text().split("\n")
    path.write_text("\n".join(lines[: 1 + count]) + "\n")
    return path.read_text()


def test_a_changed_checkpoint_at_the_same_path_is_refused_or_recomputed(
    trained_checkpoint, retrained_checkpoint, both_file, tmp_path
):
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    shutil.copy(trained_checkpoint, checkpoint)
    out = certify(checkpoint, tmp_path / "res.tsv", max=3)
    before = out.read_text()
    shutil.copy(retrained_checkpoint, checkpoint)  # trained further, same path
    with pytest.raises(ValueError, match="another checkpoint") as err:
        certify(checkpoint, out)
    assert "--restart-stale" in str(err.value) and str(checkpoint) in str(err.value)
    assert out.read_text() == before  # neither kept as the new model's nor appended to
    certify(checkpoint, out, restart_if_stale=True)
    fresh = certify(retrained_checkpoint, tmp_path / "fresh.tsv")
    assert without_time(out) == without_time(fresh)
    assert Path(f"{out}.json").read_text() != Path(f"{fresh}.json").read_text()  # paths differ
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["checkpoint_sha256"] == results.file_sha256(retrained_checkpoint)
    # The two models certify differently: keeping the old rows would have been wrong.
    assert [r["radius"] for r in read_table(fresh)[1]] != [r["radius"]
                                                          for r in read_table(both_file)[1]]


def test_the_same_checkpoint_by_another_path_or_in_a_moved_folder_resumes(
    trained_checkpoint, both_file, tmp_path, monkeypatch
):
    out = copy_result(both_file, tmp_path / "moved_results")
    keep_rows(out, 2)
    moved = tmp_path / "moved_run" / "checkpoint.pt"
    moved.parent.mkdir()
    shutil.copy(trained_checkpoint, moved)
    monkeypatch.chdir(tmp_path)
    certify(Path("./moved_run/checkpoint.pt"), out, max=4)
    certify(Path("moved_run/checkpoint.pt"), out)
    assert without_time(out) == without_time(both_file)


def test_a_lone_result_file_is_never_mixed_with_another_run(trained_checkpoint, both_file,
                                                          tmp_path):
    out = copy_result(both_file, tmp_path / "lone")
    Path(f"{out}.json").unlink()  # copied without its sidecar
    before = keep_rows(out, 3)
    with pytest.raises(ValueError, match="another run") as err:
        certify(trained_checkpoint, out, sigma=0.25)
    assert "--out" in str(err.value)
    assert out.read_text() == before and not Path(f"{out}.json").exists()
    # The rows' fingerprint proves them this run's: resumed, and the sidecar is restored.
    certify(trained_checkpoint, out)
    assert without_time(out) == without_time(both_file)
    assert Path(f"{out}.json").read_text() == Path(f"{both_file}.json").read_text()


def test_restart_stale_replaces_a_result_of_other_settings(trained_checkpoint, both_file,
                                                          tmp_path, caplog):
    out = copy_result(both_file, tmp_path / "restart")
    certify(trained_checkpoint, out, method="certify", n=100, batch=100, max=2,
            restart_if_stale=True)
    assert f"discarding {COUNT} rows of another run" in caplog.text
    fresh = certify(trained_checkpoint, tmp_path / "fresh.tsv", method="certify", n=100,
                    batch=100, max=2)
    assert without_time(out) == without_time(fresh)
    assert Path(f"{out}.json").read_text() == Path(f"{fresh}.json").read_text()


def test_an_unrelated_json_beside_out_is_not_overwritten(trained_checkpoint, tmp_path):
    out = tmp_path / "results"
    sidecar = Path(f"{out}.json")
    for text, message in [('{"my": "notes"}', "not a smoothcert sidecar"),
                          ("notes, not JSON", "not valid JSON")]:
        sidecar.write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            certify(trained_checkpoint, out)
        assert str(sidecar) in str(err.value) and "--out" in str(err.value)
        assert sidecar.read_text() == text and not out.exists()


@pytest.mark.parametrize("first, second", [("r.json", "r"), ("r", "r.json")])
def test_a_run_whose_sidecar_is_a_running_runs_result_is_refused(trained_checkpoint, tmp_path,
                                                                 first, second):
    """`--out r.json` and `--out r` at once: r.json is the first's result and the second's
    sidecar (or the reverse); the later one is refused, the first keeps its files."""
    refused = []

    def start_the_other() -> None:
        if not refused:
            with pytest.raises(OutputLockedError, match="r.json' is being written"):
                certify(trained_checkpoint, tmp_path / second, method="certify", max=2)
            refused.append(second)

    out = run(RunConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path / first), n0=N0,
                        n=N, batch=N, max=3, device="cpu", method="certify"), progress=False,
              on_row=start_the_other)
    assert refused == [second]
    assert [int(r["idx"]) for r in read_table(out)[1]] == [0, 1, 2]
    assert results.read_sidecar(out)["run"] == read_table(out)[1][0]["run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, f"{first}.json"])


def test_a_hard_linked_out_is_refused(trained_checkpoint, both_file, tmp_path):
    out = copy_result(both_file, tmp_path / "linked")
    keep_rows(out, 2)
    os.link(out, tmp_path / "alias.tsv")
    before = out.read_text()
    for name in (out, tmp_path / "alias.tsv"):
        with pytest.raises(ValueError, match=rf"'{re.escape(str(name))}' has 2 hard links"):
            certify(trained_checkpoint, name)
    assert out.read_text() == before


@pytest.mark.parametrize("name, message", [
    (".", "is a folder, but --out names a file"),
    ("r.tsv.part0", "has the name of a torchrun part file of 'r.tsv'")])
def test_an_out_that_cannot_be_a_result_file_is_refused(trained_checkpoint, tmp_path, name,
                                                        message):
    with pytest.raises(ValueError, match=message):
        certify(trained_checkpoint, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_result_file_and_sidecar_starting_with_a_bom_resume(trained_checkpoint, both_file,
                                                              tmp_path):
    out = copy_result(both_file, tmp_path / "bom")
    keep_rows(out, 2)
    for path in (out, Path(f"{out}.json")):  # as a Windows editor saves them
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    certify(trained_checkpoint, out)
    assert without_time(out)[1:] == without_time(both_file)[1:]


def test_a_run_that_fails_before_its_first_row_leaves_no_file(trained_checkpoint, tmp_path,
                                                             monkeypatch):
    def reject(*args, **kwargs):
        raise ValueError("x: the base classifier rejected an input")

    monkeypatch.setattr("smoothcert.smooth.Smooth.certify_all", reject)
    with pytest.raises(ValueError, match="rejected"):
        certify(trained_checkpoint, tmp_path / "failed.tsv")
    assert list(tmp_path.iterdir()) == []  # not even its lock file


@pytest.mark.parametrize(
    "column, value, message",
    [("radius", "inf", "column 'radius' must be a finite number >= 0: 'inf'"),
     ("radius", "nan", "column 'radius' must be a finite number >= 0: 'nan'"),
     ("idx", "0", "duplicate idx 0 \\(first on line 2\\)")],
)
def test_bad_rows_in_out_are_refused_naming_file_and_line(trained_checkpoint, both_file,
                                                          tmp_path, column, value, message):
    out = copy_result(both_file, tmp_path / "bad")
    header, *rows = out.read_text().splitlines()
    fields = rows[1].split("\t")
    fields[header.split("\t").index(column)] = value
    rows[1] = "\t".join(fields)
    out.write_text("\n".join([header, *rows]) + "\n")
    before = out.read_text()
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}, line 3: {message}"):
        certify(trained_checkpoint, out)
    assert out.read_text() == before


def test_planning_reads_and_decides_but_writes_nothing(trained_checkpoint, both_file, tmp_path):
    out = copy_result(both_file, tmp_path / "plan")
    header, *rows = both_file.read_text().splitlines(keepends=True)
    out.write_text(header + rows[0] + rows[1])
    out.with_name(out.name + ".part0").write_text(header + rows[2])
    out.with_name(out.name + ".part1").write_text(header + rows[3] + rows[4][:20])  # cut off
    before = snapshot(out.parent)
    runner = Runner(RunConfig(checkpoint=str(trained_checkpoint), out=str(out), n0=N0, n=N,
                              batch=N, max=COUNT, device="cpu"), progress=False)
    plan = runner.plan()
    assert snapshot(out.parent) == before
    assert sorted(plan.keep) == [0, 1, 2, 3] and plan.todo == [4, 5] and plan.rewrite
    assert plan.keep[2] == rows[2].rstrip("\n")
    runner.execute(plan)
    assert without_time(out) == without_time(both_file)
    assert sorted(p.name for p in out.parent.iterdir()) == ["both.tsv", "both.tsv.json"]


PAUSED_RUN = """
import sys, time
from pathlib import Path
from smoothcert.cli import main
from smoothcert.runner import Runner
paused, release = Path(sys.argv[1]), Path(sys.argv[2])
original, rows = Runner._row, []
def row(self, idx):
    if len(rows) == 1:  # the first row is written: hold the output here until released
        paused.touch()
        while not release.exists():
            time.sleep(0.01)
    rows.append(idx)
    return original(self, idx)
Runner._row = row
sys.exit(main(sys.argv[3:]))
"""


def subprocess_env() -> dict[str, str]:
    """This process's environment with this checkout's smoothcert first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    source = str(Path(smoothcert.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow  # two processes that each import torch
def test_a_second_process_on_the_same_out_is_refused_and_no_row_is_lost(trained_checkpoint,
                                                                         tmp_path):
    out, paused, release = tmp_path / "shared.tsv", tmp_path / "paused", tmp_path / "release"
    args = ["--no-progress", "certify", str(trained_checkpoint), "--out", str(out), "--n0",
            str(N0), "--N", str(N), "--batch", str(N), "--max-examples", str(COUNT),
            "--device", "cpu"]
    log = tmp_path / "first.log"
    with open(log, "w") as output:
        first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(paused), str(release),
                                  *args], env=subprocess_env(), stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the first run wrote no row"
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "smoothcert", *args], env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert [r["idx"] for r in read_table(out)[1]] == ["0"]  # the holder's file untouched
        release.touch()
        assert first.wait(timeout=120) == 0, log.read_text()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    _, rows = read_table(out)
    assert [int(r["idx"]) for r in rows] == list(range(COUNT))  # each row once, none lost
    assert len({r["run"] for r in rows}) == 1


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
    assert header == ["idx", "label", "predict", "correct", "time", "method", "run"]
    assert [int(r["label"]) for r in rows] == test_labels[:4]
    meta = json.loads(Path(f"{out}.json").read_text())
    for r in rows:
        assert int(r["correct"]) == int(int(r["predict"]) == int(r["label"]))
        assert TIMEDELTA.match(r["time"])
        assert (r["method"], r["run"]) == ("predict", meta["run"])
    expected = sum(int(r["predict"]) == -1 for r in rows) / len(rows)
    assert abstention_rate(out) == expected < 1
    assert meta["method"] == "predict" and meta["mode"] == "predict"
    # Resuming a predict run works (and changes nothing once finished).
    before = out.read_text()
    certify(trained_checkpoint, out, mode="predict", max=4)
    assert out.read_text() == before


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
            read_checkpoint_state(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value)
    out = tmp_path / "out.tsv"
    # certify reads a user's state_dict too (issue 23): it asks for its architecture
    user_weights = make is _other_dict
    with pytest.raises(ValueError if user_weights else CheckpointError,
                       match="does not say its architecture" if user_weights else message):
        certify(path, out)
    assert not out.exists()


def test_a_checkpoint_that_would_run_code_is_refused(trained_checkpoint, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    state = torch.load(trained_checkpoint, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refusing") as err:
        read_checkpoint_state(path)
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
