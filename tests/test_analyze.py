"""Tests for smoothcert.analyze; every expected number below is worked out by hand from the rows."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smoothcert import analyze as an

RADII = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])

GROUP_COLUMNS = [
    f"{m}_{c}"
    for m in ("tcertify", "strict")
    for c in ("predict", "radius", "correct", "alpha", "pa_lower", "pb_upper")
]
RUNNER_HEADER = [
    "idx",
    "label",
    "predict",
    "radius",
    "correct",
    "time",
    *GROUP_COLUMNS,
    "pa_lower",
    "n0",
    "n",
    "count_a",
    "count_b",
    "counts",
]
# idx label predict radius correct time | tcertify p r c alpha pa pb | strict p r c alpha pa pb
# | pa_lower n0 n count_a count_b counts
RUNNER_ROWS = [
    "0 3 3 0.25 1 1.5 3 0.6 1 0.0004 0.6 0.3 3 0.5 1 0.0005 0.6 0.3 0.6 100 1000 600 300 -",
    "20 1 1 0.2499 1 1.4 1 0.3 1 0.0003 0.5 0.4 1 0.2499 1 0.001 0.5 0.5 0.5 100 1000 550 400 -",
    "40 2 -1 0.0 0 1.6 -1 0.0 0 0.001 0.4 0.6 -1 0.0 0 0.001 0.4 0.6 0.4 100 1000 450 420 -",
    "60 0 5 1.1 0 1.2 5 1.4 0 0.0002 0.9 0.1 5 1.2 0 0.0002 0.9 0.1 0.9 100 1000 950 20 -",
    "80 7 7 0.8 1 1.3 7 1.25 1 0.0001 0.8 0.1 7 1.0 1 0.0002 0.8 0.1 0.8 100 1000 900 50 -",
]
SIDECAR = {
    "method": "certify",
    "label": "adre_s0.5",
    "protocol": "every 20th test image (500 points)",
}

# Cohen et al.'s certify.py output: six columns, time as str(datetime.timedelta), radius {:.3}.
# The last row is inconsistent on purpose (abstained yet correct=1): it must count as wrong.
COHEN_TEXT = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t3\t3\t0.512\t1\t0:00:01.234567\n"
    "20\t8\t8\t0.25\t1\t0:00:01.100000\n"
    "40\t1\t-1\t0.0\t0\t0:00:00.900000\n"
    "60\t4\t4\t1.03\t1\t0:00:01.300000\n"
    "80\t2\t-1\t0.0\t1\t0:00:01.000000\n"
)


def write_runner(folder: Path, name: str = "run1.tsv", sidecar: dict | None = SIDECAR) -> Path:
    path = folder / name
    lines = ["\t".join(RUNNER_HEADER)] + ["\t".join(row.split()) for row in RUNNER_ROWS]
    path.write_text("\n".join(lines) + "\n")
    if sidecar is not None:
        Path(f"{path}.json").write_text(json.dumps(sidecar))
    return path


def write_cohen(folder: Path) -> Path:
    path = folder / "sigma_0.25"  # Cohen's naming: the ".25" is not an extension
    path.write_text(COHEN_TEXT)
    return path


def by_name(curves: list[an.ResultCurve]) -> dict[str, an.ResultCurve]:
    return {c.name: c for c in curves}


# ---------------------------------------------------------------- loading


def test_runner_file_gives_one_curve_per_method(tmp_path):
    curves = by_name(an.load_results(write_runner(tmp_path)))
    assert list(curves) == [
        "adre_s0.5: certify",
        "adre_s0.5: tcertify",
        "adre_s0.5: tcertify-strict",
    ]
    main = curves["adre_s0.5: certify"]
    np.testing.assert_array_equal(main.radius, [0.25, 0.2499, 0.0, 1.1, 0.8])
    np.testing.assert_array_equal(main.correct, [True, True, False, False, True])
    np.testing.assert_array_equal(curves["adre_s0.5: tcertify"].radius, [0.6, 0.3, 0, 1.4, 1.25])


def test_label_defaults_to_file_stem_and_method_comes_from_sidecar(tmp_path):
    names = [c.name for c in an.load_results(write_runner(tmp_path, "basic.tsv", sidecar=None))]
    assert names[0] == "basic: certify"
    path = write_runner(tmp_path, "tc.tsv", sidecar={"method": "tcertify"})
    assert an.load_results(path)[0].name == "tc: tcertify"


def test_cohen_file_with_timedelta_times(tmp_path):
    (curve,) = an.load_results(write_cohen(tmp_path))
    assert curve.name == "sigma_0.25: certify"
    np.testing.assert_array_equal(curve.correct, [True, True, False, True, False])
    # correct: 0.512, 0.25, 1.03 out of 5 rows
    np.testing.assert_allclose(
        an.certified_accuracy(curve, RADII), [0.6, 0.6, 0.4, 0.2, 0.2, 0.0, 0.0]
    )
    assert an.average_certified_radius(curve) == pytest.approx((0.512 + 0.25 + 1.03) / 5)


def test_header_only_file_gives_empty_curves(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("\t".join(RUNNER_HEADER) + "\n")
    curves = an.load_results(path)
    assert len(curves) == 3 and all(c.radius.size == 0 for c in curves)
    assert np.all(np.isnan(an.certified_accuracy(curves[0], RADII)))
    assert np.isnan(an.average_certified_radius(curves[0]))
    row = an.format_table(curves[:1], RADII).splitlines()[2]
    assert row == "| empty: certify | " + " | ".join(["-"] * len(RADII)) + " | - | 0 |"


# ---------------------------------------------------------------- statistics


def test_certified_accuracy_and_acr_by_hand(tmp_path):
    curves = by_name(an.load_results(write_runner(tmp_path)))
    # certify: correct radii 0.25, 0.2499, 0.8 (0.2499 < 0.25; abstention and wrong 1.1 never)
    np.testing.assert_allclose(
        an.certified_accuracy(curves["adre_s0.5: certify"], RADII),
        [0.6, 0.4, 0.2, 0.2, 0.0, 0.0, 0.0],
    )
    # tcertify: correct radii 0.6, 0.3, 1.25 (1.25 counts at r = 1.25 exactly)
    np.testing.assert_allclose(
        an.certified_accuracy(curves["adre_s0.5: tcertify"], RADII),
        [0.6, 0.6, 0.4, 0.2, 0.2, 0.2, 0.0],
    )
    # strict: correct radii 0.5, 0.2499, 1.0
    np.testing.assert_allclose(
        an.certified_accuracy(curves["adre_s0.5: tcertify-strict"], RADII),
        [0.6, 0.4, 0.4, 0.2, 0.2, 0.0, 0.0],
    )
    assert an.average_certified_radius(curves["adre_s0.5: certify"]) == pytest.approx(0.25998)
    assert an.average_certified_radius(curves["adre_s0.5: tcertify"]) == pytest.approx(0.43)
    assert an.average_certified_radius(curves["adre_s0.5: tcertify-strict"]) == pytest.approx(
        0.34998
    )


def test_radius_exactly_at_table_radius_counts_and_just_below_does_not():
    acc = an.certified_accuracy((np.array([0.25, 0.2499]), np.array([True, True])), [0.25])
    np.testing.assert_array_equal(acc, [0.5])


def test_default_radii_are_the_papers():
    np.testing.assert_allclose(an.DEFAULT_RADII, np.linspace(0, 3, 13))


def test_bad_radii_rejected():
    curve = an.ResultCurve("x", np.array([1.0]), np.array([True]))
    with pytest.raises(ValueError, match="radii"):
        an.certified_accuracy(curve, [-0.5])


# ---------------------------------------------------------------- tables


def test_markdown_table(tmp_path):
    curves = an.load_results(write_runner(tmp_path)) + an.load_results(write_cohen(tmp_path))
    lines = an.format_table(curves, an.DEFAULT_RADII).splitlines()
    assert lines[0].startswith("| Method") and lines[0].endswith("| 3.00 | ACR | n |")
    assert "| 0.00 | 0.25 | 0.50 |" in lines[0]
    assert lines[1].startswith("|---|---:|") and lines[1].count("|") == lines[0].count("|")
    assert lines[2] == (
        "| adre_s0.5: certify | 0.60 | 0.40 | 0.20 | 0.20 | "
        + " | ".join(["0.00"] * 9)
        + " | 0.260 | 5 |"
    )
    assert lines[3].startswith("| adre_s0.5: tcertify | 0.60 | 0.60 | 0.40 | 0.20 | 0.20 | 0.20 |")
    assert lines[3].endswith("| 0.430 | 5 |")
    assert lines[5].startswith("| sigma_0.25: certify | 0.60 | 0.60 | 0.40 | 0.20 | 0.20 | 0.00")
    assert len(lines) == 6


def test_latex_table_escapes_names(tmp_path):
    curves = an.load_results(write_runner(tmp_path, sidecar={"label": "adre_λ0.1 100%"}))
    text = an.format_table(curves[:1], RADII, fmt="latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in text
    assert r"adre\_λ0.1 100\%: certify & 0.60 & 0.40 & 0.20 & 0.20 & 0.00" in text
    assert r"& 0.260 & 5 \\" in text


def test_csv_table_full_precision(tmp_path):
    curves = an.load_results(write_runner(tmp_path))
    rows = list(csv.reader(io.StringIO(an.format_table(curves, RADII, fmt="csv"))))
    assert rows[0] == ["method", "0.0", "0.25", "0.5", "0.75", "1.0", "1.25", "1.5", "ACR", "n"]
    assert rows[1][0] == "adre_s0.5: certify"
    np.testing.assert_allclose([float(v) for v in rows[1][1:8]], [0.6, 0.4, 0.2, 0.2, 0, 0, 0])
    assert float(rows[1][8]) == pytest.approx(0.25998, abs=1e-15)
    assert rows[1][9] == "5" and len(rows) == 4


def test_unknown_format_rejected(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        an.format_table(an.load_results(write_cohen(tmp_path)), RADII, fmt="html")


# ---------------------------------------------------------------- plots and analyze()


def test_plot_writes_png(tmp_path):
    curves = an.load_results(write_runner(tmp_path)) + an.load_results(write_cohen(tmp_path))
    out = tmp_path / "plots" / "curves.png"
    an.plot_curves(curves, out, title="CIFAR-10, σ = 0.5")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary left over


def test_analyze_notes_protocol_and_plots(tmp_path):
    out = tmp_path / "fig.png"
    text = an.analyze([write_runner(tmp_path), write_cohen(tmp_path)], plot=str(out))
    lines = text.splitlines()
    assert lines[0] == "adre_s0.5: every 20th test image (500 points)"
    assert lines[1] == "" and lines[2].startswith("| Method")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    bare = an.analyze([write_cohen(tmp_path)], fmt="latex", protocol_note=False)
    assert bare.startswith(r"\begin{tabular}")


def test_analyze_warns_when_protocols_differ(tmp_path):
    a = write_runner(tmp_path, "a.tsv", sidecar={"protocol": "every 20th test image"})
    b = write_runner(tmp_path, "b.tsv", sidecar={"protocol": "all 10,000 test images"})
    text = an.analyze([a, b], fmt="csv")
    assert text.startswith("# a: every 20th test image\n# b: all 10,000 test images\n# warning")


def test_analyze_is_torch_free_and_imports_matplotlib_lazily(tmp_path):
    module = Path(an.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('analyze_alone', {str(module)!r})\n"
        "m = sys.modules['analyze_alone'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "assert 'matplotlib' not in sys.modules\n"
        "c = m.ResultCurve('x', [0.5, 1.0], [True, False])\n"
        f"m.plot_curves([c], {str(tmp_path / 'x.png')!r})\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- errors


def test_wrong_columns_name_the_file(tmp_path):
    path = tmp_path / "weird.tsv"
    path.write_text("idx\tlabel\tscore\n0\t1\t0.5\n")
    with pytest.raises(ValueError, match=r"weird\.tsv.*predict, radius, correct"):
        an.load_results(path)


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text(COHEN_TEXT.replace("0.25\t1", "abc\t1"))
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: column 'radius'"):
        an.load_results(path)
    path.write_text(COHEN_TEXT + "100\t1\t1\t0.3\n")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 7: 4 fields, but the header has 6"):
        an.load_results(path)


def test_predict_file_gives_clear_error(tmp_path):
    path = tmp_path / "predict.tsv"
    path.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0:00:01.2\n")
    with pytest.raises(ValueError, match=r"predict\.tsv.*PREDICT output"):
        an.load_results(path)


def test_empty_file_and_incomplete_group_rejected(tmp_path):
    path = tmp_path / "nothing.tsv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"nothing\.tsv: empty file"):
        an.load_results(path)
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\ttcertify_radius\n")
    with pytest.raises(ValueError, match="tcertify_predict, tcertify_correct"):
        an.load_results(path)
