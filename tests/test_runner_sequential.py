"""Sequential (at radii) and input-specific-n certification over a dataset: the result files,
their sidecars, verify, analyze, resume, and the refusal to mix protocols in one --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from smoothcert import results, sequential
from smoothcert.analyze import DEFAULT_RADII, analyze
from smoothcert.data import get_dataset
from smoothcert.rng import generator
from smoothcert.runner import RunConfig, run
from smoothcert.smooth import Smooth
from smoothcert.train import load_model

SIGMA, N0, COUNT, BATCH, MAX_N = 0.5, 20, 6, 200, 1000
RADII = (0.0, 0.25, 0.5)


def certify(checkpoint: Path, out: Path, **options) -> Path:
    values = dict(checkpoint=str(checkpoint), out=str(out), n0=N0, batch=BATCH, max=COUNT,
                  device="cpu", max_n=MAX_N)
    values.update(options)
    return run(RunConfig(**values), progress=False)


def rows(path: Path) -> list[dict[str, str]]:
    header, *lines = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]


def without_time(path: Path) -> list[list[str]]:
    return [[f for i, f in enumerate(line.split("\t")) if i != 5]
            for line in path.read_text().splitlines()]


def edit(path: Path, idx: int, **changes: str) -> None:
    header, *lines = path.read_text().splitlines()
    names = header.split("\t")
    fields = lines[idx].split("\t")
    for name, text in changes.items():
        fields[names.index(name)] = text
    lines[idx] = "\t".join(fields)
    path.write_text("\n".join([header, *lines]) + "\n")


def api_certificates(checkpoint: Path, path: Path, **options):
    """Each row of a radii file with Smooth.certify_radii's certificate of its input, drawn
    from the run's streams (options: certify_radii's)."""
    model, _ = load_model(checkpoint)
    smooth = Smooth(model, 10, SIGMA)
    data = get_dataset("mnist", "test", augment=False)
    for row in rows(path):
        idx = int(row["idx"])
        yield row, smooth.certify_radii(
            data[idx][0], radii=RADII, alpha=0.001, max_n=MAX_N, batch_size=BATCH, n0=N0,
            generator=generator(0, "selection", idx),
            estimation_generator=generator(0, "estimation", idx), **options)


@pytest.fixture(scope="module")
def radii_file(trained_checkpoint, tmp_path_factory) -> Path:
    return certify(trained_checkpoint, tmp_path_factory.mktemp("radii") / "radii.tsv",
                   radii=RADII, method="tcertify")


@pytest.fixture(scope="module")
def adaptive_file(trained_checkpoint, tmp_path_factory) -> Path:
    return certify(trained_checkpoint, tmp_path_factory.mktemp("adaptive") / "adaptive.tsv",
                   adaptive_n=True, method="certify", tolerance=0.05)


def test_radii_rows_are_the_api_s_certificates_on_the_run_s_streams(trained_checkpoint,
                                                                     radii_file):
    header = radii_file.read_text().splitlines()[0].split("\t")
    assert header == results.radii_columns(RADII)
    meta = json.loads(Path(f"{radii_file}.json").read_text())
    assert {k: meta[k] for k in ("sampling", "radii", "max_n", "confidence_sequence", "batch",
                                 "method", "n", "alpha", "sigma")} == {
        "sampling": "sequential", "radii": list(RADII), "max_n": MAX_N,
        "confidence_sequence": "mixture", "batch": BATCH, "method": "tcertify", "n": None,
        "alpha": 0.001, "sigma": SIGMA}
    for row, cert in api_certificates(trained_checkpoint, radii_file, method="tcertify"):
        assert [int(row[f"certified_{r!r}"]) for r in RADII] == list(cert.certified)
        assert [int(row[f"decided_{r!r}"]) for r in RADII] == list(cert.decided_at)
        assert int(row["samples_used"]) == cert.samples_used == N0 + int(row["n"])
        assert int(row["predict"]) == cert.label
        certified = [r for r, c in zip(RADII, cert.certified, strict=True) if c]
        assert float(row["radius"]) == max(certified, default=0.0)
    assert any(int(r["n"]) < MAX_N for r in rows(radii_file))  # some input stopped early
    assert results.verify(radii_file) == (COUNT, [])


def test_verify_recomputes_radii_rows_from_their_counts(radii_file, tmp_path):
    certified = next(i for i, r in enumerate(rows(radii_file)) if r["certified_0.0"] == "1")
    row = rows(radii_file)[certified]
    cases = {
        "claims a radius": {"certified_0.5": "1", "certified_0.25": "1", "radius": "0.5"},
        "certifying counts edited": {"certifying_counts": row["certifying_counts"].replace(
            f"{row['predict']}:", f"{row['predict']}:1", 1)},
        "not a prefix": {"certified_0.0": "0"},
    }
    if row["certified_0.5"] == "1":  # then drop it instead: the final counts certify it
        cases["claims a radius"] = {"certified_0.5": "0", "radius": "0.25"}
    for name, changes in cases.items():
        path = tmp_path / f"{name}.tsv"
        path.write_text(radii_file.read_text())
        Path(f"{path}.json").write_text(Path(f"{radii_file}.json").read_text())
        edit(path, certified, **changes)
        checked, problems = results.verify(path)
        assert checked == COUNT and len(problems) == 1, (name, problems)
        assert f"idx {row['idx']}" in problems[0]


def test_adaptive_rows_are_certify_rows_with_n_chosen_from_the_selection(adaptive_file,
                                                                        tmp_path):
    assert adaptive_file.read_text().splitlines()[0].split("\t") == results.columns(
        "certify", "certify")
    meta = json.loads(Path(f"{adaptive_file}.json").read_text())
    assert (meta["sampling"], meta["max_n"], meta["tolerance"], meta["n"]) == (
        "adaptive", MAX_N, 0.05, None)
    table = results.read_results(adaptive_file)
    ns = []
    for text in table.values["selection_counts"]:
        selection = np.zeros(10, dtype=np.int64)
        for cls, count in text.items():
            selection[cls] = count
        ns.append(sequential.choose_n(selection, MAX_N, SIGMA, 0.001, 0.05))
    assert table.values["n"] == ns and min(ns) < MAX_N
    assert results.verify(adaptive_file) == (COUNT, [])
    # An n the selection counts do not choose is caught even with consistent certificates.
    path = tmp_path / "edited.tsv"
    path.write_text(adaptive_file.read_text())
    Path(f"{path}.json").write_text(json.dumps({**meta, "tolerance": 0.5}))
    _, problems = results.verify(path)
    assert any("the selection counts choose" in p for p in problems)


def test_runs_resume_and_never_mix_protocols(trained_checkpoint, radii_file, adaptive_file,
                                             tmp_path):
    out = tmp_path / "cut.tsv"
    text = radii_file.read_text()
    out.write_text(text[: len(text) - 30])  # killed mid-row
    certify(trained_checkpoint, out, radii=RADII, method="tcertify")
    assert without_time(out) == without_time(radii_file)
    with pytest.raises(ValueError, match=r"holds certify at given radii \(sequential\) results"):
        certify(trained_checkpoint, out, max_n=None)  # fixed n onto radii rows
    with pytest.raises(ValueError, match="other columns"):
        certify(trained_checkpoint, out, radii=(0.0, 0.5), method="tcertify")
    with pytest.raises(ValueError, match=r"holds certify \(radius per input\) results"):
        certify(trained_checkpoint, adaptive_file, radii=RADII)
    with pytest.raises(ValueError, match="different .*sampling.*tolerance"):
        certify(trained_checkpoint, adaptive_file, method="certify", max_n=None, n=MAX_N)
    assert without_time(out) == without_time(radii_file)


def test_analyze_puts_radii_and_adaptive_files_beside_each_other(radii_file, adaptive_file):
    table = analyze([radii_file, adaptive_file], radii=DEFAULT_RADII)  # every Table-1 radius
    lines = table.splitlines()
    sequential_row = next(line for line in lines if "T-CERTIFY, sequential" in line)
    cells = [c.strip() for c in sequential_row.split("|")[1:-1]]
    accuracy = [np.mean([r[f"certified_{r0!r}"] == "1" and r["correct"] == "1"
                         for r in rows(radii_file)]) for r0 in RADII]
    assert cells[1:4] == [f"{a:.2f}" for a in accuracy]
    assert cells[4:-1] == ["-"] * 11  # radii not asked about; no ACR
    assert any("CERTIFY, adaptive n" in line for line in lines)
    samples = [int(r["samples_used"]) for r in rows(radii_file)]
    assert (f"radii: forward passes per input (sequential n0 + n): mean {np.mean(samples):.0f},"
            f" median {np.median(samples):.0f}, max {max(samples)}") in lines


def test_default_radii_are_the_table_1_radii_max_n_can_reach(trained_checkpoint, tmp_path):
    out = certify(trained_checkpoint, tmp_path / "default.tsv", max=1)
    got = results.header_radii(out.read_text().split("\n")[0].split("\t"))
    # With every sample for the label, the mixture's bound lies between its point-mass part
    # alone, (alpha/3)^(1/n), and fixed-n Clopper-Pearson at alpha, alpha^(1/n).
    low, high = (SIGMA * norm.ppf(level ** (1 / MAX_N)) for level in (0.001 / 3, 0.001))
    table = list(sequential.TABLE1_RADII)
    assert [r for r in table if r < low] == got[: len([r for r in table if r < low])]
    assert got == [r for r in table if r <= high] and got[-1] == 1.0


@pytest.mark.parametrize("options, match", [
    (dict(tolerance=0.02), "tolerance"),
    (dict(adaptive_n=True, radii=RADII), "radii"),
    (dict(radii=RADII, method="both"), "method"),
    (dict(radii=(0.5, 0.25)), "radii"),
    (dict(confidence_sequence="betting"), "confidence_sequence"),
    (dict(mode="predict"), "certify only"),
    (dict(max_n=100), "max_n"),
    (dict(final_share=1.0), r"final_share must be a number in \[0, 1\)"),
    (dict(final_share=-0.5), "final_share"),
    (dict(precision=0.0), "precision must be a finite number > 0"),
    (dict(precision=float("nan")), "precision"),
    (dict(adaptive_n=True, precision=0.25), "precision"),
    (dict(adaptive_n=True, final_share=0.25), "final_share"),
    (dict(mode="predict", precision=0.25), "certify only"),
    (dict(futility=1.0), r"futility must be a number in \(0, 1\)"),
    (dict(futility="some"), "futility must be"),
    (dict(adaptive_n=True, futility=0.1), "futility"),
    (dict(mode="predict", futility=0.1), "certify only"),
])
def test_bad_sequential_options_are_refused_before_any_work(trained_checkpoint, tmp_path,
                                                            options, match):
    with pytest.raises(ValueError, match=match):
        certify(trained_checkpoint, tmp_path / "bad.tsv", **options)
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_a_final_share_and_a_precision_records_them_and_verifies(
        trained_checkpoint, radii_file, tmp_path):
    assert json.loads(Path(f"{radii_file}.json").read_text())["final_share"] == \
        sequential.FINAL_SHARE
    assert "precision" not in json.loads(Path(f"{radii_file}.json").read_text())
    out = certify(trained_checkpoint, tmp_path / "precise.tsv", radii=RADII, final_share=0.2,
                  precision=0.25)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert (meta["final_share"], meta["precision"]) == (0.2, 0.25)
    assert meta["run"] != json.loads(Path(f"{radii_file}.json").read_text())["run"]
    for row, cert in api_certificates(trained_checkpoint, out, final_share=0.2,
                                      precision=0.25):
        assert [int(row[f"certified_{r!r}"]) for r in RADII] == list(cert.certified)
        assert int(row["n"]) == cert.n
    assert results.verify(out) == (COUNT, [])


def test_futility_is_recorded_and_none_turns_it_off(trained_checkpoint, radii_file, tmp_path):
    default = json.loads(Path(f"{radii_file}.json").read_text())
    assert default["futility"] == sequential.FUTILITY
    out = certify(trained_checkpoint, tmp_path / "patient.tsv", radii=RADII, futility="none")
    meta = json.loads(Path(f"{out}.json").read_text())
    assert "futility" not in meta and meta["run"] != default["run"]
    for row, cert in api_certificates(trained_checkpoint, out, futility=None):
        assert [int(row[f"certified_{r!r}"]) for r in RADII] == list(cert.certified)
        assert int(row["n"]) == cert.n
    assert results.verify(out) == (COUNT, [])


def test_the_command_line_writes_what_the_api_writes(trained_checkpoint, radii_file,
                                                     adaptive_file, tmp_path, capsys):
    from smoothcert.cli import main

    common = [str(trained_checkpoint), "--n0", str(N0), "--batch", str(BATCH),
              "--max-examples", str(COUNT), "--max-n", str(MAX_N)]
    radii = tmp_path / "radii.tsv"
    assert main(["--no-progress", "certify", *common, "--out", str(radii), "--radii",
                 "0,0.25,0.5", "--method", "tcertify"]) == 0
    assert without_time(radii) == without_time(radii_file)
    adaptive = tmp_path / "adaptive.tsv"
    assert main(["--no-progress", "certify", *common, "--out", str(adaptive), "--adaptive-n",
                 "--tolerance", "0.05", "--method", "certify"]) == 0
    assert without_time(adaptive) == without_time(adaptive_file)
    assert main(["verify", str(radii), str(adaptive)]) == 0
    capsys.readouterr()
    assert main(["certify", *common, "--out", str(tmp_path / "bad.tsv"), "--tolerance",
                 "0.1"]) == 2
    assert "smoothcert certify: error: tolerance applies to adaptive_n" in capsys.readouterr().err
    for flag, value, message in [("--final-share", "1.5", "final_share must be a number in "
                                  "[0, 1), got 1.5"),
                                 ("--precision", "-1", "precision must be a finite number > 0")]:
        assert main(["certify", *common, "--out", str(tmp_path / "bad.tsv"), flag, value]) == 2
        assert f"smoothcert certify: error: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["certify", *common, "--out", str(tmp_path / "bad.tsv"), "--futility", "1"])
    assert exited.value.code == 2
    assert "argument --futility: expected a level in (0, 1) or none, got '1'" in \
        capsys.readouterr().err
