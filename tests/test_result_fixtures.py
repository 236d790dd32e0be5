"""Result files written before the protocol/sidecar reshape still read, verify and resume,
and a fresh run of the same protocol and seed writes the same rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from result_fixtures import CHECKPOINT, FIXTURES, RUNS, run_fixture

from smoothcert import results


def without_time(path: Path) -> list[list[str]]:
    """The fields of each line but the time column's, the only one two runs differ in."""
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    time = lines[0].index("time")
    return [fields[:time] + fields[time + 1:] for fields in lines]


def copy_fixtures(folder: Path, *names: str) -> None:
    for name in (CHECKPOINT, *names):
        shutil.copy(FIXTURES / name, folder / name)


@pytest.mark.parametrize("name", RUNS)
def test_an_old_file_reads_with_its_sidecar(name):
    table = results.read_results(FIXTURES / name)
    assert len(table.lines) == 4 and table.meta["run"] == results.fingerprint(table.meta)
    assert table.runs() == [table.meta["run"]] * 4


@pytest.mark.parametrize("name", [n for n in RUNS if n != "predict.tsv"])
def test_an_old_file_verifies(name):
    report = results.check_file(FIXTURES / name)
    assert (report.rows, report.problems) == (4, [])


@pytest.mark.parametrize("name", RUNS)
def test_a_finished_old_file_resumes_without_recomputing_a_row(name, tmp_path, monkeypatch):
    copy_fixtures(tmp_path, name, f"{name}.json")
    run_fixture(name, tmp_path, monkeypatch)
    for written in (name, f"{name}.json"):
        assert (tmp_path / written).read_bytes() == (FIXTURES / written).read_bytes()


@pytest.mark.parametrize("name", RUNS)
def test_the_same_protocol_and_seed_write_the_same_rows(name, tmp_path, monkeypatch):
    copy_fixtures(tmp_path)
    out = run_fixture(name, tmp_path, monkeypatch)
    assert without_time(out) == without_time(FIXTURES / name)
    assert Path(f"{out}.json").read_bytes() == (FIXTURES / f"{name}.json").read_bytes()


def test_an_old_radii_file_resumes_with_final_share_0_only(tmp_path, monkeypatch):
    # The default final look is another procedure than the one that wrote the file.
    copy_fixtures(tmp_path, "radii.tsv", "radii.tsv.json")
    monkeypatch.setitem(RUNS, "radii.tsv", {**RUNS["radii.tsv"], "final_share": None})
    with pytest.raises(ValueError, match=r"different final_share \(was None, now 0.5\)"):
        run_fixture("radii.tsv", tmp_path, monkeypatch)


def test_an_old_radii_file_resumes_without_futility_only(tmp_path, monkeypatch):
    # The default futility rule stops inputs earlier: another procedure than the file's.
    copy_fixtures(tmp_path, "radii.tsv", "radii.tsv.json")
    monkeypatch.setitem(RUNS, "radii.tsv", {**RUNS["radii.tsv"], "futility": None})
    with pytest.raises(ValueError, match=r"different futility \(was None, now 0.05\)"):
        run_fixture("radii.tsv", tmp_path, monkeypatch)
