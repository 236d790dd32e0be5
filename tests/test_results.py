"""The result-file format (smoothcert.results): schema, writer, reader, sidecar, verify.

The files here are written by the real writer from real certificates (stats.certify_from_counts
on sampled counts), so no torch is needed; the runner's own files are tested in test_runner.
"""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smoothcert import analyze as an
from smoothcert import results
from smoothcert.stats import METHODS, certify_from_counts

SIGMA, ALPHA, GRID, N0, N = 0.5, 0.001, 10, 100, 1000
RADII = np.arange(0, 2.01, 0.25)
SHIPPED_LABELS = Path(results.__file__).parent / "_data/MNIST/raw/t10k-labels-idx1-ubyte.gz"
# The MNIST test labels, read as the IDX format says: an 8-byte header, then one byte each.
MNIST_TEST_LABELS = np.frombuffer(gzip.open(SHIPPED_LABELS).read()[8:], np.uint8)


def settings(**changes) -> dict:
    meta = {
        "format": results.FORMAT, "mode": "certify", "method": "certify", "layout": "both",
        "split": "test", "n0": N0, "n": N, "alpha": ALPHA, "grid": GRID, "skip": 1,
        "max": 12, "seed": 0, "sigma": SIGMA, "dataset": "mnist", "amp": None,
        "num_classes": 10, "checkpoint": "run/checkpoint.pt", "checkpoint_sha256": "ab" * 32,
        "protocol": "test split, every 1th example from index 0, 12 examples",
    }
    meta.update(changes)
    return {**meta, "run": results.fingerprint(meta)}


def write_file(folder: Path, layout: str = "both", rows: int = 12, seed: int = 0,
               labels: np.ndarray = MNIST_TEST_LABELS, **changes) -> Path:
    """A result file as the runner writes it (the first `rows` examples of the MNIST test set,
    or of `labels`), from counts sampled around a peaked class."""
    rng = np.random.default_rng(seed)
    main = results.LAYOUTS[layout][0]
    meta = settings(method=main, layout=layout, **changes)
    path = folder / f"{layout}.tsv"
    results.write_sidecar(path, meta)
    with results.RowWriter(path, results.columns("certify", layout)) as writer:
        for idx in range(rows):
            label = int(labels[idx])
            top = label if idx % 4 else (label + 1) % 10  # every 4th one misclassified
            p = rng.dirichlet(np.full(10, 0.5))
            p[top] += rng.uniform(0.5, 30)
            p /= p.sum()
            selection, estimation = rng.multinomial(N0, p), rng.multinomial(N, p)
            certificates = {m: certify_from_counts(selection, estimation, SIGMA, ALPHA, m, GRID)
                            for m in METHODS}
            writer.write(results.certify_row(idx, label, 0.25 * idx, certificates, selection,
                                             estimation, layout, meta["run"]))
    return path


def edit_field(path: Path, row: int, column: str, value: str) -> None:
    header, *lines = path.read_text().splitlines()
    fields = lines[row].split("\t")
    fields[header.split("\t").index(column)] = value
    lines[row] = "\t".join(fields)
    path.write_text("\n".join([header, *lines]) + "\n")


# ---------------------------------------------------------------- schema and round trip


@pytest.mark.parametrize("layout", sorted(results.LAYOUTS))
def test_every_layout_starts_with_cohens_columns_and_names_its_method(tmp_path, layout):
    path = write_file(tmp_path, layout)
    header = path.read_text().splitlines()[0].split("\t")  # the first line: no comment line
    assert header[:8] == [*results.COHEN_COLUMNS, "method", "run"]
    assert header == results.columns("certify", layout)
    table = results.read_results(path)
    assert table.native and table.own and not table.rounded
    assert table.methods == [results.LAYOUTS[layout][0], *results.LAYOUTS[layout][1]]
    assert set(table.values["method"]) == {table.main}
    assert results.columns("predict") == ["idx", "label", "predict", "correct", "time",
                                          "method", "run"]


def test_rows_read_back_as_written(tmp_path):
    path = write_file(tmp_path)
    table = results.read_results(path)
    assert table.values["idx"] == list(range(12))
    assert table.column("time").tolist() == [0.25 * i for i in range(12)]
    for i in range(12):
        selection = np.zeros(10, dtype=np.int64)
        estimation = np.zeros(10, dtype=np.int64)
        for cls, count in table.values["selection_counts"][i].items():
            selection[cls] = count
        for cls, count in table.values["estimation_counts"][i].items():
            estimation[cls] = count
        for method in METHODS:
            cert = certify_from_counts(selection, estimation, SIGMA, ALPHA, method, GRID)
            prefix = "" if method == "certify" else results.PREFIXES[method] + "_"
            assert table.values[prefix + "predict"][i] == cert.label
            for name in ("radius", "alpha_prime", "pa_lower", "pb_upper"):
                assert table.values[prefix + name][i] == getattr(cert, name)  # bit for bit
    assert sum(table.column("predict") != -1) >= 6  # the file holds real certificates


def test_the_writer_creates_the_file_only_with_its_first_row(tmp_path):
    path, calls = tmp_path / "lazy.tsv", []
    writer = results.RowWriter(path, ["idx", "x"], before_create=lambda: calls.append(1))
    assert not path.exists() and calls == []
    writer.write(["0", "a"])
    writer.write(["1", "b"])
    writer.close()
    assert path.read_text() == "idx\tx\n0\ta\n1\tb\n" and calls == [1]
    with results.RowWriter(path, ["idx", "x"], before_create=lambda: calls.append(2)) as again:
        again.write(["2", "c"])  # an existing file is appended to, its header kept
    assert path.read_text().endswith("1\tb\n2\tc\n") and calls == [1]


def test_a_cut_off_last_row_is_left_out_only_when_resuming(tmp_path):
    path = write_file(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) - 20])
    table = results.read_results(path, allow_cut=True)
    assert table.cut and table.values["idx"] == list(range(11))
    with pytest.raises(ValueError, match=r"both\.tsv, line 13: "):
        results.read_results(path)


def test_times_as_cohen_writes_them():
    assert results.parse_time("0:00:04.524886") == pytest.approx(4.524886)
    assert results.parse_time("1 day, 2:03:04") == 86400 + 7384
    assert results.parse_time(results.time_text(90061.5)) == 90061.5


def test_the_fingerprint_covers_every_identity_setting_and_not_the_path():
    base = settings()
    changes = {"mode": "predict", "method": "tcertify", "split": "train", "n0": 50, "n": 10,
               "alpha": 0.01, "grid": 5, "skip": 20, "seed": 1, "sigma": 0.25,
               "dataset": "cifar10", "amp": "bf16", "checkpoint_sha256": "cd" * 32}
    assert set(changes) == set(results.IDENTITY_KEYS)
    for key, value in changes.items():
        assert settings(**{key: value})["run"] != base["run"], key
    assert settings(checkpoint="/elsewhere/checkpoint.pt", max=3)["run"] == base["run"]


def test_results_is_torch_free():
    source = str(Path(results.__file__).resolve().parents[1])
    code = "import sys, smoothcert.results, smoothcert.analyze; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": source})


# ---------------------------------------------------------------- the peers' files


def cohen_approximate_accuracy(path: Path, radii: np.ndarray) -> np.ndarray:
    """Cohen et al.'s analyze.py ApproximateAccuracy without pandas: the file is read as
    read_csv(sep="\\t") reads it (header on the first line, every row as long as the header),
    and accuracy at r is mean(correct & (radius >= r)) over all rows."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    assert all(len(row) == len(header) for row in body)
    column = {name: i for i, name in enumerate(header)}
    correct = np.array([int(row[column["correct"]]) for row in body])
    radius = np.array([float(row[column["radius"]]) for row in body])
    return np.array([np.mean((correct == 1) & (radius >= r)) for r in radii])


def test_cohens_analyze_reads_our_files_as_we_do(tmp_path):
    path = write_file(tmp_path)
    (ours, *_) = an.load_results(path)
    theirs = cohen_approximate_accuracy(path, RADII)
    np.testing.assert_array_equal(an.certified_accuracy(ours, RADII), theirs)
    assert 0 < theirs[0] < 1 and theirs[2] > 0  # a curve worth comparing


def test_a_cohen_file_is_read_and_its_rounding_noted(tmp_path):
    path = tmp_path / "sigma_0.25"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t3\t3\t0.616\t1\t0:00:04.524886\n2\t8\t-1\t0.0\t0\t0:00:03.475385\n")
    table = results.read_results(path)
    assert (table.kind, table.main, table.groups) == ("certify", "certify", [])
    assert table.own is False and table.rounded
    path.write_text(path.read_text().replace("0.616", "0.6163342811"))
    assert not results.read_results(path).rounded


# ---------------------------------------------------------------- verify


def test_verify_accepts_a_file_as_written(tmp_path):
    for layout in results.LAYOUTS:
        checked, problems = results.verify(write_file(tmp_path, layout))
        assert (checked, problems) == (12, [])


def test_verify_catches_a_hand_edited_radius(tmp_path):
    path = write_file(tmp_path)
    radius = results.read_results(path).values["tcertify_radius"][5]
    edit_field(path, 5, "tcertify_radius", repr(radius * 1.01))
    checked, problems = results.verify(path)
    assert checked == 12 and len(problems) == 1
    assert problems[0].startswith(f"{path}, line 7 (idx 5): tcertify_radius ")


def test_verify_catches_a_hand_edited_count(tmp_path):
    path = write_file(tmp_path)
    table = results.read_results(path)
    row = next(i for i in range(12) if table.values["predict"][i] != -1)
    counts = table.values["estimation_counts"][row]
    top = table.values["predict"][row]
    other = next(c for c in counts if c != top)
    counts = {**counts, top: counts[top] + 3, other: counts[other] - 3}  # n unchanged
    edit_field(path, row, "estimation_counts",
               ",".join(f"{c}:{v}" for c, v in sorted(counts.items()) if v))
    _, problems = results.verify(path)
    assert len(problems) == 1 and f"line {row + 2} (idx {row})" in problems[0]
    assert "count_a" in problems[0] and "pa_lower" in problems[0]


@pytest.mark.parametrize("column", ["selection_counts", "estimation_counts"])
def test_a_class_listed_twice_in_the_counts_is_refused(tmp_path, column):
    # "3:10,3:5" once read as {3: 5}: verify then recomputed from counts nobody wrote.
    with pytest.raises(ValueError, match="each class"):
        results.parse_counts("3:10,3:5")
    assert results.parse_counts("3:10,5:3") == {3: 10, 5: 3}
    path = write_file(tmp_path)
    counts = results.read_results(path).values[column][0]
    cls, count = next(iter(counts.items()))
    listed = ",".join(f"{c}:{v}" for c, v in counts.items())
    edit_field(path, 0, column, f"{listed},{cls}:{count}")
    with pytest.raises(ValueError, match=rf"both\.tsv, line 2: column '{column}' must list "
                                         r"class:count pairs, each class \(>= 0\) once"):
        results.read_results(path)


def test_verify_catches_a_changed_alpha_in_the_sidecar(tmp_path):
    path = write_file(tmp_path)
    sidecar = results.sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "alpha": 0.002}))
    _, problems = results.verify(path)
    assert "settings give" in problems[0]  # the recorded fingerprint no longer fits
    rows = problems[1:]
    assert len(rows) == 12
    assert all("pa_lower" in p for p in rows)  # every bound recomputed at the sidecar's alpha


def test_verify_refuses_what_it_cannot_check(tmp_path):
    cohen = tmp_path / "cohen.tsv"
    cohen.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n")
    with pytest.raises(ValueError, match="no selection counts"):
        results.verify(cohen)
    path = write_file(tmp_path)
    results.sidecar_path(path).unlink()
    with pytest.raises(ValueError, match=r"without its sidecar .*both\.tsv\.json"):
        results.verify(path)


def test_smoothcert_verify_exits_0_when_all_match_and_1_otherwise(tmp_path, capsys):
    from smoothcert.cli import main

    path = write_file(tmp_path)
    assert main(["verify", str(path)]) == 0
    assert "every certificate matches" in capsys.readouterr().err
    edit_field(path, 2, "radius", "0.75")
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{path}, line 4 (idx 2): radius '0.75'"[:-6])
    assert main(["verify", str(tmp_path / "missing.tsv")]) == 2


def rewrite_rows(path: Path, change) -> None:
    """Replace the rows of `path` by `change(rows)` (each row a list of fields)."""
    header, *lines = path.read_text().splitlines()
    rows = change([line.split("\t") for line in lines])
    path.write_text("\n".join([header, *("\t".join(row) for row in rows)]) + "\n")


def column(name: str) -> int:
    return results.columns("certify", "both").index(name)


def test_verify_reports_a_row_deleted_in_the_middle(tmp_path):
    path = write_file(tmp_path)
    rewrite_rows(path, lambda rows: rows[:5] + rows[8:])
    report = results.check_file(path)
    assert report.rows == 9 and report.notes == []
    assert report.problems == [f"{path}: rows missing: 5–7 (3 rows) while later rows are "
                               "present: rows were deleted; run the same certify command to "
                               "recompute them"]


def test_verify_reports_missing_last_rows_as_an_unfinished_run(tmp_path, capsys):
    from smoothcert.cli import main

    path = write_file(tmp_path)
    rewrite_rows(path, lambda rows: rows[:9])
    assert main(["verify", str(path)]) == 0  # not an error: re-running certify resumes
    err = capsys.readouterr().err
    assert (f"{path}: rows missing: 9–11 (3 rows): an unfinished run; run the same certify "
            "command to resume") in err
    assert "row set: 9 of 12 rows (idx 0..11 step 1)" in err


def test_verify_catches_swapped_indices_and_a_relabelled_wrong_row(tmp_path):
    path = write_file(tmp_path)
    table = results.read_results(path)
    assert MNIST_TEST_LABELS[0] != MNIST_TEST_LABELS[1]
    predict, label = table.values["predict"], table.values["label"]
    wrong = next(i for i in range(2, 12) if predict[i] not in (-1, label[i]))  # certified, wrong

    def tamper(rows):
        rows[0][0], rows[1][0] = rows[1][0], rows[0][0]
        rows[wrong][column("label")] = str(predict[wrong])
        for prefix in ("", "tcertify_", "strict_"):  # correct = 1 wherever predict = label
            rows[wrong][column(prefix + "correct")] = str(int(
                rows[wrong][column(prefix + "predict")] == str(predict[wrong])))
        return rows

    rewrite_rows(path, tamper)
    source = "MNIST test (the shipped copy)"
    assert results.check_file(path).problems == [
        f"{path}, line 2 (idx 1): label {label[0]}, but {source} labels example 1 as {label[1]}",
        f"{path}, line 3 (idx 0): label {label[1]}, but {source} labels example 0 as {label[0]}",
        f"{path}, line {wrong + 2} (idx {wrong}): label {predict[wrong]}, but {source} labels "
        f"example {wrong} as {label[wrong]}"]


def test_verify_refuses_a_row_outside_the_protocol(tmp_path):
    path = write_file(tmp_path, skip=2, max=6, rows=6,
                      protocol="test split, every 2th example from index 0, 6 examples")
    # write_file numbers its rows 0..5: with skip 2 the protocol's are 0, 2, ..., 10.
    rewrite_rows(path, lambda rows: [[str(2 * int(r[0])), *r[1:]] for r in rows[:5]]
                 + [[str(3), *rows[1][1:]], [str(12), *rows[2][1:]]])
    problems = results.check_file(path).problems
    assert f"{path}: idx 3, 12 not in the protocol (idx 0..10 step 2, 6 examples)" in problems
    # a copy of a row under another idx: the idx outside the protocol, or its label wrong.
    duplicate = tmp_path / "dup"
    duplicate.mkdir()
    path = write_file(duplicate)
    rewrite_rows(path, lambda rows: [*rows, [str(12), *rows[3][1:]]])
    problems = results.check_file(path).problems
    assert f"{path}: idx 12 not in the protocol (idx 0..11 step 1, 12 examples)" in problems


def test_verify_says_what_it_checked_and_what_it_could_not(tmp_path, capsys):
    from smoothcert.cli import main

    path = write_file(tmp_path)
    assert main(["verify", str(path)]) == 0
    assert capsys.readouterr().err == (
        f"{path}: 12 rows recomputed from their counts and sidecar: every certificate matches; "
        "labels checked against MNIST test (the shipped copy), no duplicates, row set complete "
        "(idx 0..11 step 1)\n")
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    path = write_file(cifar, dataset="cifar10")
    assert main(["verify", str(path)]) == 0
    err = capsys.readouterr().err
    assert (f"{path}: labels not checked: the cifar10 labels need --data-dir (the dataset's "
            "folder)") in err
    assert "(idx 0..11 step 1)" in err  # the row set from the protocol's count of examples


def test_verify_refuses_a_data_dir_that_does_not_exist(tmp_path, capsys):
    from smoothcert.cli import main

    path = write_file(tmp_path)
    assert main(["verify", str(path), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (f"smoothcert verify: error: data_dir: "
                                       f"'{tmp_path / 'nowhere'}' does not exist\n")


def test_verify_checks_cifar_labels_from_the_data_dir(tmp_path, capsys, cifar_npz):
    from smoothcert.cli import main

    npz = cifar_npz
    labels = np.load(npz)["y_test"]
    path = write_file(tmp_path, dataset="cifar10", labels=labels)
    assert main(["verify", str(path), "--data-dir", str(npz)]) == 0
    assert f"labels checked against cifar10 test ({npz})" in capsys.readouterr().err
    edit_field(path, 3, "label", str((labels[3] + 1) % 10))
    edit_field(path, 3, "correct", "0")
    assert main(["verify", str(path), "--data-dir", str(npz)]) == 1
    assert f"labels example 3 as {labels[3]}" in capsys.readouterr().out


def test_verify_checks_a_torchrun_part_file_with_its_outs_sidecar(tmp_path):
    path = write_file(tmp_path)
    header, *lines = path.read_text().splitlines(keepends=True)
    for rank in (0, 1):
        path.with_name(f"{path.name}.part{rank}").write_text(header + "".join(lines[rank::2]))
    # What an earlier run had merged: a torchrun run's rows need not be a prefix.
    path.write_text(header + "".join(lines[:2] + lines[5:6]))
    part = path.with_name(f"{path.name}.part1")
    report = results.check_file(part)
    assert (report.rows, report.problems) == (6, [])
    assert report.notes == [f"{part}: a torchrun part file holds one process's rows: the row "
                            f"set is checked on {path} once the same certify command merged "
                            "the parts"]
    report = results.check_file(path)  # rows missing: in the parts, not deleted
    assert report.problems == [] and report.notes == [
        f"{path}: rows missing: 2–4, 6–11 (9 rows): an unfinished run (torchrun part files beside "
        f"it: {path.name}.part0, {path.name}.part1); run the same certify command to resume"]


def test_verify_reads_mnist_labels_without_torch(tmp_path):
    path = write_file(tmp_path)
    source = str(Path(results.__file__).resolve().parents[1])
    code = ("import sys; from smoothcert.cli import main; assert main(['verify', sys.argv[1]]) "
            "== 0; assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env={"PYTHONPATH": source})
    assert done.returncode == 0, done.stderr
    assert "labels checked against MNIST test" in done.stderr


def test_sampling_settings_join_the_fingerprint_only_when_set():
    base = settings()
    assert base["run"] == settings(sampling=None, radii=None, tolerance=None)["run"]
    changes = {"sampling": "sequential", "radii": [0.0, 0.5], "max_n": 10_000,
               "confidence_sequence": "mixture", "batch": 500, "tolerance": 0.02,
               "final_share": 0.5, "precision": 0.25, "futility": 0.05}
    assert set(changes) == set(results.SAMPLING_KEYS)
    for key, value in changes.items():
        assert settings(**{key: value})["run"] != base["run"], key


def radii_file(folder: Path, cert, label: int = int(MNIST_TEST_LABELS[0]), **changes) -> Path:
    """A radii file of one row (MNIST's first test example) holding `cert`, with the sidecar of
    its settings (and `changes` to them)."""
    meta = settings(method="certify", layout="radii", n=None, grid=None, sampling="sequential",
                    radii=list(cert.radii), max_n=1000, confidence_sequence="mixture",
                    batch=200, max=1, protocol="test split, every 1th example from index 0, "
                    "1 examples", **changes)
    path = folder / "radii.tsv"
    results.write_sidecar(path, meta)
    with results.RowWriter(path, results.radii_columns(cert.radii)) as writer:
        writer.write(results.radii_row(0, label, 1.0, cert, "certify", meta["run"]))
    return path


def per_class(count_a: int, n: int) -> tuple[int, ...]:
    """Ten classes' counts: count_a for class 3, the rest of n for class 4."""
    return (0, 0, 0, count_a, n - count_a, 0, 0, 0, 0, 0)


def test_verify_recomputes_a_radii_certificate_at_its_look(tmp_path):
    from smoothcert.sequential import RadiiCertificate

    # 200 of 200 votes: the mixture's pA bound at alpha is about 0.96 > Phi(0.5 / 0.5) = 0.84.
    right = RadiiCertificate(
        label=3, radii=(0.0, 0.25, 0.5), certified=(True, True, True), samples_used=300,
        n=200, count_a=200, decided_at=(100, 200, 200), selection_counts=per_class(100, 100),
        estimation_counts=per_class(200, 200), certifying_counts=per_class(200, 200))
    (tmp_path / "right").mkdir()
    (tmp_path / "wrong").mkdir()
    assert results.verify(radii_file(tmp_path / "right", right)) == (1, [])
    # The same claims from 150 of 200 votes (pA about 0.75 at most): every column agrees with
    # the counts, only the certificate does not follow from them.
    wrong = RadiiCertificate(**{**right.as_dict(), "count_a": 150,
                                "estimation_counts": per_class(150, 200),
                                "certifying_counts": per_class(150, 200)})
    _, problems = results.verify(radii_file(tmp_path / "wrong", wrong))
    assert len(problems) == 1 and "radius 0.5 is not certified by certifying_counts" in problems[0]
    # A row whose run column is not the sidecar's run, its certificate untouched.
    (tmp_path / "edited").mkdir()
    path = radii_file(tmp_path / "edited", right)
    edit_field(path, 0, "run", "0123456789ab")
    _, problems = results.verify(path)
    assert problems == [f"{path}, line 2 (idx 0): run 0123456789ab, but the sidecar's settings "
                        f"give {results.read_sidecar(path)['run']}"]


def test_verify_recomputes_a_certificate_of_the_final_look(tmp_path):
    from smoothcert.sequential import RadiiCertificate

    # 880 of max_n = 1000 votes: Clopper-Pearson at the final look's half of alpha certifies
    # 0.5 (its bound 0.85 > Phi(1) = 0.841), the mixture at the other half only 0.25.
    cert = RadiiCertificate(
        label=3, radii=(0.0, 0.25, 0.5), certified=(True, True, True), samples_used=1100,
        n=1000, count_a=880, decided_at=(1000, 1000, 1000), selection_counts=per_class(100, 100),
        estimation_counts=per_class(880, 1000), certifying_counts=per_class(880, 1000))
    for name, changes in [("final", dict(final_share=0.5)), ("older", {})]:
        (tmp_path / name).mkdir()
        _, problems = results.verify(radii_file(tmp_path / name, cert, **changes))
        if name == "final":
            assert problems == []
        else:  # a file written before the final look: its procedure had none
            assert len(problems) == 1 and "radius 0.5 is not certified" in problems[0]


def test_verify_names_a_fixed_n_row_of_another_run(tmp_path):
    path = write_file(tmp_path)
    edit_field(path, 3, "run", "0123456789ab")
    _, problems = results.verify(path)
    assert len(problems) == 1 and problems[0].startswith(
        f"{path}, line 5 (idx 3): run 0123456789ab, but the sidecar's settings give ")


# ---------------------------------------------------------------- sidecar and protocols


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["both", "tcertify", "predict", "radii", "adaptive"])
def test_every_sidecar_written_so_far_reads_and_writes_back_unchanged(name, tmp_path):
    data = json.loads((FIXTURES / f"{name}.tsv.json").read_text())
    sidecar = results.Sidecar.from_json(data)
    assert sidecar.to_json() == data and sidecar.fingerprint() == data["run"]
    results.write_sidecar(tmp_path / "r.tsv", sidecar)
    assert (tmp_path / "r.tsv.json").read_text() == (FIXTURES / f"{name}.tsv.json").read_text()


def test_a_sidecar_of_an_older_version_keeps_what_it_lacks_absent(tmp_path):
    old = {"mode": "certify", "method": "certify", "protocol": "p", "n": 100, "notes": "x"}
    sidecar = results.Sidecar.from_json(old)
    assert sidecar.to_json() == old and sidecar.is_own and sidecar.extra == {"notes": "x"}
    assert sidecar.lacks("n", "grid", "num_classes") == ["grid", "num_classes"]
    assert results.fingerprint(old) == sidecar.fingerprint()
    assert not results.Sidecar.from_json({"mode": "certify"}).is_own


def test_a_sidecar_built_with_a_misspelt_setting_is_refused():
    with pytest.raises(TypeError, match="no field sigmma"):
        results.Sidecar.build({}, sigmma=0.5)


@pytest.mark.parametrize("name, protocol", [("both", "fixed-n"), ("tcertify", "fixed-n"),
                                            ("predict", "predict"), ("radii", "radii"),
                                            ("adaptive", "adaptive-n")])
def test_each_file_is_read_with_its_protocol(name, protocol):
    assert results.read_results(FIXTURES / f"{name}.tsv").protocol.name == protocol
    data = json.loads((FIXTURES / f"{name}.tsv.json").read_text())
    assert results.protocol_of(results.Sidecar.from_json(data)) is results.PROTOCOLS[protocol]


def test_two_protocols_of_one_mode_and_sampling_are_refused():
    with pytest.raises(ValueError, match="is taken"):
        results.register(type("Again", (results.PROTOCOLS["radii"].__class__,), {"name": "x"}))


class EqualN(results.PROTOCOLS["fixed-n"].__class__):
    """A toy protocol: fixed-n's rows, with as many estimation samples as selection samples."""

    name = "toy-equal-n"
    sampling = "equal"

    def _n_problems(self, selection, estimation, sidecar):
        return [] if estimation.sum() == selection.sum() else [
            f"n {int(estimation.sum())}, but this protocol's n is n0 {int(selection.sum())}"]


@pytest.fixture
def toy_protocol():
    results.register(EqualN)
    yield results.PROTOCOLS[EqualN.name]
    del results.PROTOCOLS[EqualN.name]


def test_a_protocol_registered_in_one_place_is_written_read_verified_and_analysed(
        toy_protocol, tmp_path):
    from smoothcert.smooth import CertifyAllResult

    sidecar = results.Sidecar.build({}, **{**settings(n=N0, max=3), "sampling": "equal"})
    path = tmp_path / "toy.tsv"
    results.write_sidecar(path, sidecar)
    rng = np.random.default_rng(0)
    with results.RowWriter(path, toy_protocol.header(sidecar)) as writer:
        for idx in range(3):
            label = int(MNIST_TEST_LABELS[idx])
            counts = rng.multinomial(N0, np.eye(10)[label] * 0.9 + 0.01)
            result = CertifyAllResult.from_counts(counts, counts, SIGMA, ALPHA, GRID)
            writer.write(toy_protocol.row(idx, label, 0.1, result, sidecar)[0])
    table = results.read_results(path)
    assert table.protocol is toy_protocol and table.runs() == [sidecar.run] * 3
    assert results.check_file(path).problems == []
    assert [c.name for c in an.load_results(path)][0] == "toy: CERTIFY"
    edit_field(path, 1, "n", "200")
    problems = results.check_file(path).problems
    assert len(problems) == 1 and "n 200, the counts give 100" in problems[0]
    edit_field(path, 1, "n", "100")
    edit_field(path, 1, "estimation_counts", results.read_results(path).lines[1].split("\t")[-1]
               .replace(":", ":1", 1))  # one class's count times ten or more: n is not n0
    assert "but this protocol's n is n0 100" in " ".join(results.check_file(path).problems)
