"""Tests for smoothcert.analyze; every expected number below is worked out by hand from the rows."""

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import INTEROP, needs_interop

from smoothcert import analyze as an
from smoothcert import results

RADII = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])

RUNNER_HEADER = results.columns("certify", "both")  # the runner's own header, never a copy
RUN = "0123456789ab"
# idx label predict radius correct time method run alpha' pA pB
# | tcertify p r c alpha' pA pB | strict p r c alpha' pA pB | n0 n count_a count_b sel est
RUNNER_ROWS = [
    "0 3 3 0.25 1 0:00:01.500000 certify R 0.001 0.6 0.4 3 0.6 1 0.0004 0.6 0.3 "
    "3 0.5 1 0.0005 0.6 0.3 100 1000 600 300 3:100 1:100,3:600,5:300",
    "20 1 1 0.2499 1 0:00:01.400000 certify R 0.001 0.5 0.5 1 0.3 1 0.0003 0.5 0.4 "
    "1 0.2499 1 0.001 0.5 0.5 100 1000 550 400 1:100 1:550,2:400,3:50",
    "40 2 -1 0.0 0 0:00:01.600000 certify R 0.001 0.4 0.6 -1 0.0 0 0.001 0.4 0.6 "
    "-1 0.0 0 0.001 0.4 0.6 100 1000 450 420 2:100 2:450,4:420,6:130",
    "60 0 5 1.1 0 0:00:01.200000 certify R 0.001 0.9 0.1 5 1.4 0 0.0002 0.9 0.1 "
    "5 1.2 0 0.0002 0.9 0.1 100 1000 950 20 5:100 5:950,0:20,1:20,2:10",
    "80 7 7 0.8 1 0:00:01.300000 certify R 0.001 0.8 0.2 7 1.25 1 0.0001 0.8 0.1 "
    "7 1.0 1 0.0002 0.8 0.1 100 1000 900 50 7:100 7:900,1:50,2:50",
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
    lines = ["\t".join(RUNNER_HEADER)] + ["\t".join(row.replace(" R ", f" {RUN} ").split())
                                          for row in RUNNER_ROWS]
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
        "adre_s0.5: CERTIFY",
        "adre_s0.5: T-CERTIFY (paper mode)",
        "adre_s0.5: T-CERTIFY (strict)",
    ]
    main = curves["adre_s0.5: CERTIFY"]
    np.testing.assert_array_equal(main.radius, [0.25, 0.2499, 0.0, 1.1, 0.8])
    np.testing.assert_array_equal(main.correct, [True, True, False, False, True])
    paper = curves["adre_s0.5: T-CERTIFY (paper mode)"]
    np.testing.assert_array_equal(paper.radius, [0.6, 0.3, 0, 1.4, 1.25])
    np.testing.assert_array_equal(paper.idx, [0, 20, 40, 60, 80])


def tcertify_layout(folder: Path, name: str, legacy: bool = False) -> Path:
    """The fixture as `--method tcertify` writes it: T-CERTIFY in the main columns, then strict
    (legacy: as smoothcert wrote it before the method/run columns)."""
    source = write_runner(folder, "source.tsv", sidecar=None)
    header, *rows = (line.split("\t") for line in source.read_text().splitlines())
    pick = {"method": None, **{c: f"tcertify_{c}" for c in ("predict", "radius", "correct",
                                                           "alpha_prime", "pa_lower", "pb_upper")}}
    columns = results.columns("certify", "tcertify")
    if legacy:
        columns = [c.replace("alpha_prime", "alpha") for c in columns
                   if c not in ("method", "run", "alpha_prime", "pa_lower", "pb_upper")]
        columns[-2:] = ["counts"]
        pick.update(strict_alpha="strict_alpha_prime", counts="estimation_counts")
    lines = ["\t".join(columns)]
    for row in rows:
        value = dict(zip(header, row, strict=True))
        lines.append("\t".join("tcertify" if pick.get(c, c) is None else value[pick.get(c, c)]
                               for c in columns))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    source.unlink()
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_a_lone_file_says_which_method_its_main_columns_hold(tmp_path, legacy):
    path = tcertify_layout(tmp_path, "tc.tsv", legacy)  # no sidecar
    curves = an.load_results(path)
    assert [c.name for c in curves] == ["tc: T-CERTIFY (paper mode)", "tc: T-CERTIFY (strict)"]
    np.testing.assert_array_equal(curves[0].radius, [0.6, 0.3, 0, 1.4, 1.25])
    # A sidecar cannot relabel the columns; it names the file.
    Path(f"{path}.json").write_text(json.dumps({"method": "certify", "label": "mine"}))
    assert an.load_results(path)[0].name == "mine: T-CERTIFY (paper mode)"


def test_label_defaults_to_the_file_stem(tmp_path):
    names = [c.name for c in an.load_results(write_runner(tmp_path, "basic.tsv", sidecar=None))]
    assert names[0] == "basic: CERTIFY"


def test_cohen_file_with_timedelta_times(tmp_path):
    (curve,) = an.load_results(write_cohen(tmp_path))
    assert curve.name == "sigma_0.25: CERTIFY"
    np.testing.assert_array_equal(curve.correct, [True, True, False, True, False])
    # correct: 0.512, 0.25, 1.03 out of 5 rows
    np.testing.assert_allclose(
        an.certified_accuracy(curve, RADII), [0.6, 0.6, 0.4, 0.2, 0.2, 0.0, 0.0]
    )
    assert an.average_certified_radius(curve) == pytest.approx((0.512 + 0.25 + 1.03) / 5)
    text = an.analyze([write_cohen(tmp_path)])
    assert text.startswith("sigma_0.25: radii rounded to 3 significant digits")


def test_header_only_file_gives_empty_curves(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("\t".join(RUNNER_HEADER) + "\n")
    curves = an.load_results(path)
    assert len(curves) == 3 and all(c.radius.size == 0 for c in curves)
    assert np.all(np.isnan(an.certified_accuracy(curves[0], RADII)))
    assert np.isnan(an.average_certified_radius(curves[0]))
    row = an.format_table(curves[:1], RADII).splitlines()[2]
    assert row == "| empty: CERTIFY | " + " | ".join(["-"] * len(RADII)) + " | - | 0 |"


# ---------------------------------------------------------------- statistics


def test_certified_accuracy_and_acr_by_hand(tmp_path):
    curves = by_name(an.load_results(write_runner(tmp_path)))
    # certify: correct radii 0.25, 0.2499, 0.8 (0.2499 < 0.25; abstention and wrong 1.1 never)
    np.testing.assert_allclose(
        an.certified_accuracy(curves["adre_s0.5: CERTIFY"], RADII),
        [0.6, 0.4, 0.2, 0.2, 0.0, 0.0, 0.0],
    )
    # tcertify: correct radii 0.6, 0.3, 1.25 (1.25 counts at r = 1.25 exactly)
    np.testing.assert_allclose(
        an.certified_accuracy(curves["adre_s0.5: T-CERTIFY (paper mode)"], RADII),
        [0.6, 0.6, 0.4, 0.2, 0.2, 0.2, 0.0],
    )
    # strict: correct radii 0.5, 0.2499, 1.0
    np.testing.assert_allclose(
        an.certified_accuracy(curves["adre_s0.5: T-CERTIFY (strict)"], RADII),
        [0.6, 0.4, 0.4, 0.2, 0.2, 0.0, 0.0],
    )
    assert an.average_certified_radius(curves["adre_s0.5: CERTIFY"]) == pytest.approx(0.25998)
    paper = curves["adre_s0.5: T-CERTIFY (paper mode)"]
    assert an.average_certified_radius(paper) == pytest.approx(0.43)
    assert an.average_certified_radius(curves["adre_s0.5: T-CERTIFY (strict)"]) == pytest.approx(
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
        "| adre_s0.5: CERTIFY | 0.60 | 0.40 | 0.20 | 0.20 | "
        + " | ".join(["0.00"] * 9)
        + " | 0.260 | 5 |"
    )
    assert lines[3].startswith(
        "| adre_s0.5: T-CERTIFY (paper mode) | 0.60 | 0.60 | 0.40 | 0.20 | 0.20 | 0.20 |")
    assert lines[3].endswith("| 0.430 | 5 |")
    assert lines[5].startswith("| sigma_0.25: CERTIFY | 0.60 | 0.60 | 0.40 | 0.20 | 0.20 | 0.00")
    assert len(lines) == 6


def test_latex_table_escapes_names(tmp_path):
    curves = an.load_results(write_runner(tmp_path, sidecar={"label": "adre_λ0.1 100%"}))
    text = an.format_table(curves[:1], RADII, fmt="latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in text
    assert r"adre\_$\lambda0.1$ 100\%: CERTIFY & \textbf{0.60} & \textbf{0.40} & " in text
    assert r"& 0.00 & \textbf{0.260} & 5 \\" in text  # a column of zeros has no best


def test_latex_labels_are_math_and_the_output_pure_ascii(tmp_path):
    label = "Basic σ=0.5, λ = 0.2 at α −1 (café)"
    path = write_runner(tmp_path, sidecar={**SIDECAR, "label": label, "alpha": 0.001, "grid": 10})
    text = an.analyze([path], fmt="latex")
    assert r"Basic $\sigma=0.5$, $\lambda=0.2$ at $\alpha$ $-$1 (cafe): CERTIFY &" in text
    assert text.isascii()
    assert "% T-CERTIFY (paper mode) picks alpha' " in text and "2alpha - alpha/grid" in text


def test_latex_bolds_the_best_of_each_column_ties_all(tmp_path):
    curves = an.load_results(write_runner(tmp_path))  # CERTIFY, T-CERTIFY, strict
    rows = [line.split(" & ")[1:-1] for line in
            an.format_table(curves, RADII, fmt="latex").splitlines() if ": " in line]
    bold = [[cell.startswith(r"\textbf{") for cell in row] for row in rows]
    # radius 0: 0.60 for all three; 0.25: T-CERTIFY's 0.60 alone; 0.5: 0.40 twice; ACR 0.430
    assert [b[0] for b in bold] == [True, True, True]
    assert [b[1] for b in bold] == [False, True, False]
    assert [b[2] for b in bold] == [False, True, True]
    assert [b[-1] for b in bold] == [False, True, False]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_table_compiles_with_pdflatex(tmp_path):
    label = "Basic σ=0.5 λ=0.2 α −1 adre_x 100%"
    table = an.analyze([write_runner(tmp_path, sidecar={**SIDECAR, "label": label})],
                       fmt="latex")
    (tmp_path / "t.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\n"
                                    f"\\begin{{document}}\n{table}\\end{{document}}\n")
    subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "t.pdf").is_file()


def test_default_columns_are_the_radii_some_file_can_reach(tmp_path):
    # sigma 1, n = 1000, alpha 0.001: CERTIFY's largest radius is Phi^-1(0.001^(1/1000)) = 2.46
    # and paper-mode T-CERTIFY's (at 2 alpha - alpha/grid) Phi^-1(0.0019^(1/1000)) = 2.496
    sidecar = {**SIDECAR, "sigma": 1.0, "alpha": 0.001, "grid": 10, "num_classes": 10}
    head = an.analyze([write_runner(tmp_path, sidecar=sidecar)]).splitlines()[3]
    assert head.endswith("| 2.00 | 2.25 | ACR | n |")
    cohen = an.analyze([write_cohen(tmp_path)]).splitlines()[2]  # sigma unknown: every radius
    assert cohen.endswith("| 3.00 | ACR | n |")


def test_radii_methods_and_labels_choose_columns_and_rows(tmp_path):
    a, b = write_runner(tmp_path, "a.tsv"), write_cohen(tmp_path)
    text = an.analyze([a, b], radii=[0.0, 0.5], fmt="csv", methods=["certify", "strict"],
                      labels={str(a): "ADRE σ=0.5"})
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["# ADRE σ=0.5: every 20th test image (500 points)"]  # the notes too
    rows = [r for r in rows if not r[0].startswith("#")]
    assert rows[0] == ["method", "0.0", "0.5", "ACR", "n"]
    assert [r[:3] for r in rows[1:]] == [["ADRE σ=0.5: CERTIFY", "0.6", "0.2"],
                                         ["ADRE σ=0.5: T-CERTIFY (strict)", "0.6", "0.4"],
                                         ["sigma_0.25: CERTIFY", "0.6", "0.4"]]


@pytest.mark.parametrize("options, message", [
    ({"methods": ["certify", "best"]}, "--methods: unknown method 'best'; accepted: certify"),
    ({"methods": ["strict"], "paths": "cohen"}, "no file holds them"),
    ({"labels": {"other.tsv": "x"}}, "--label other.tsv=...: 'other.tsv' is not one of"),
    ({"radii": [-1.0]}, "radii must be"),
])
def test_bad_analyze_options_name_the_option(tmp_path, options, message):
    paths = [write_cohen(tmp_path) if options.pop("paths", "") else write_runner(tmp_path)]
    with pytest.raises(ValueError, match=re.escape(message)):
        an.analyze(paths, **options)


def test_csv_table_full_precision(tmp_path):
    curves = an.load_results(write_runner(tmp_path))
    rows = list(csv.reader(io.StringIO(an.format_table(curves, RADII, fmt="csv"))))
    assert rows[0] == ["method", "0.0", "0.25", "0.5", "0.75", "1.0", "1.25", "1.5", "ACR", "n"]
    assert rows[1][0] == "adre_s0.5: CERTIFY"
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


def test_analyze_notes_protocol_rounding_and_modes_and_plots(tmp_path):
    out = tmp_path / "fig.png"
    text = an.analyze([write_runner(tmp_path, sidecar={**SIDECAR, "alpha": 0.001, "grid": 10}),
                       write_cohen(tmp_path)], plot=str(out))
    lines = text.splitlines()
    assert lines[0] == "adre_s0.5: every 20th test image (500 points)"
    assert lines[1].startswith("sigma_0.25: radii rounded to 3 significant digits")
    assert lines[2].startswith("T-CERTIFY (paper mode) picks α' after seeing the estimation")
    assert "2α − α/grid = 0.0019 (α = 0.001, grid 10)" in lines[2]
    assert "T-CERTIFY (strict) and CERTIFY hold at α exactly" in lines[2]
    assert lines[3] == "" and lines[4].startswith("| Method")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    bare = an.analyze([write_cohen(tmp_path)], fmt="latex", protocol_note=False)
    assert bare.startswith(r"\begin{tabular}")


def test_analyze_warns_when_protocols_differ(tmp_path):
    a = write_runner(tmp_path, "a.tsv", sidecar={"protocol": "every 20th test image"})
    b = write_runner(tmp_path, "b.tsv", sidecar={"protocol": "all 10,000 test images"})
    text = an.analyze([a, b], fmt="csv")
    assert text.startswith("# a: every 20th test image\n# b: all 10,000 test images\n# warning")
    assert "# T-CERTIFY (paper mode) picks α'" in text and "2α − α/grid;" in text  # α unknown


def test_analyze_is_torch_free_and_imports_matplotlib_lazily(tmp_path):
    code = (
        "import sys\n"
        "from smoothcert import analyze as m\n"
        "assert 'matplotlib' not in sys.modules\n"
        "c = m.ResultCurve('x', [0.5, 1.0], [True, False])\n"
        f"m.plot_curves([c], {str(tmp_path / 'x.png')!r})\n"
        "assert 'torch' not in sys.modules\n"
    )
    source = str(Path(an.__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": source})


def test_plot_replaces_only_a_plot_smoothcert_wrote(tmp_path):
    result = write_runner(tmp_path)
    foreign_png = tmp_path / "photo.png"
    foreign_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    for target in (result, foreign_png, tmp_path):  # analyze r.tsv --plot r.tsv, a PNG, a folder
        before = target.read_bytes() if target.is_file() else None
        with pytest.raises(ValueError, match="not a plot smoothcert wrote") as err:
            an.analyze([result], plot=target)
        assert str(target) in str(err.value) and "--plot" in str(err.value)
        assert (target.read_bytes() if target.is_file() else None) == before
    plot = tmp_path / "fig.png"
    an.analyze([result], plot=plot)
    first = plot.read_bytes()
    an.analyze([result, write_cohen(tmp_path)], plot=plot)  # its own plot: replaced
    assert plot.read_bytes() != first


@needs_interop
def test_cohens_result_file_beside_ours_in_one_table_and_plot(tmp_path):
    cohen = INTEROP / "cohen_certify_resnet20_sigma0.25.tsv"
    plot = tmp_path / "both.png"
    text = an.analyze([write_runner(tmp_path), cohen], plot=plot)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "cohen_certify_resnet20_sigma0.25: CERTIFY" in rows
    assert "adre_s0.5: CERTIFY" in rows and "adre_s0.5: T-CERTIFY (strict)" in rows
    assert "cohen_certify_resnet20_sigma0.25: radii rounded to 3 significant digits" in text
    assert "adre_s0.5: radii rounded" not in text
    (curve,) = an.load_results(cohen)
    lines = cohen.read_text().splitlines()[1:]
    radius = [float(line.split("\t")[3]) for line in lines]
    correct = [line.split("\t")[4] == "1" and line.split("\t")[2] != "-1" for line in lines]
    np.testing.assert_array_equal(curve.radius, radius)
    np.testing.assert_array_equal(curve.correct, correct)
    assert plot.read_bytes().startswith(an.PNG_SIGNATURE)


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
    with pytest.raises(ValueError, match=r"predict\.tsv: this is a PREDICT result"):
        an.load_results(path)
    path.write_text("idx\tlabel\tpredict\tRadius\tcorrect\ttime\n0\t3\t3\t0.5\t1\t0:00:01\n")
    with pytest.raises(ValueError, match=r"column 'Radius' should be 'radius'") as err:
        an.load_results(path)
    assert "PREDICT" not in str(err.value)


def test_empty_file_and_incomplete_group_rejected(tmp_path):
    path = tmp_path / "nothing.tsv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"nothing\.tsv: empty file"):
        an.load_results(path)
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\ttcertify_radius\n")
    with pytest.raises(ValueError, match="tcertify_predict, tcertify_correct"):
        an.load_results(path)


@pytest.mark.parametrize(
    "edit, message",
    [(("0.25\t1", "inf\t1"), r"line 3: column 'radius' must be a finite number >= 0: 'inf'"),
     (("0.25\t1", "nan\t1"), r"line 3: column 'radius' must be a finite number >= 0: 'nan'"),
     (("40\t1\t-1", "0\t1\t-1"), r"line 4: duplicate idx 0 \(first on line 2\)")],
)
def test_rows_that_would_distort_the_table_are_refused(tmp_path, edit, message):
    path = tmp_path / "bad.tsv"
    path.write_text(COHEN_TEXT.replace(*edit))
    with pytest.raises(ValueError, match=rf"bad\.tsv, {message}"):
        an.analyze([path])


def test_sidecar_and_encoding_errors_name_the_file(tmp_path):
    path = write_runner(tmp_path, sidecar=None)
    sidecar = Path(f"{path}.json")
    for data, message in [(b"{not json", "not valid JSON"), (b"\xff\xfe{}", "not UTF-8"),
                          (b"[1, 2]", "expected a JSON object")]:
        sidecar.write_bytes(data)
        with pytest.raises(ValueError, match=message) as err:
            an.analyze([path])
        assert str(sidecar) in str(err.value)
    sidecar.unlink()
    path.write_bytes(path.read_bytes().replace(b"0:00:01.5", b"0:00:01.\xe9"))
    with pytest.raises(ValueError, match=r"run1\.tsv: not UTF-8 text"):
        an.analyze([path])


def test_a_sidecar_of_another_run_is_refused(tmp_path):
    path = write_runner(tmp_path, sidecar={**SIDECAR, "run": "ba9876543210"})
    with pytest.raises(ValueError, match=r"run1\.tsv\.json describes run ba9876543210"):
        an.analyze([path])


# The runner rows' settings: n = 1000, and sigma, alpha so that every radius in them is possible.
EXACT = {**SIDECAR, "sigma": 1.0, "alpha": 0.001, "grid": 10, "num_classes": 10}


def test_a_radius_beyond_what_n_samples_allow_is_refused(tmp_path):
    from scipy.stats import norm

    # All 1000 samples of one class: pA_lower = alpha^(1/n) (Clopper-Pearson at k = n).
    largest = float(norm.ppf(0.001 ** (1 / 1000)))  # sigma 1
    assert 1.4 < largest < 2.5
    path = write_runner(tmp_path, sidecar=EXACT)
    text = path.read_text()
    an.analyze([path])  # radius 1.1 (CERTIFY) and 1.4 (T-CERTIFY) are possible
    path.write_text(text.replace("\t1.1\t", f"\t{largest * 0.999!r}\t"))
    an.analyze([path])
    for radius in (largest * 1.001, 1e308):
        path.write_text(text.replace("\t1.1\t", f"\t{radius!r}\t"))
        text_radius = re.escape(repr(radius))
        with pytest.raises(ValueError, match=rf"run1\.tsv, line 5: column 'radius' {text_radius} "
                           rf"exceeds the largest radius {largest:.6g} \(what n samples allow "
                           r"at sigma 1, alpha 0.001, n = 1000\)"):
            an.analyze([path])


def test_a_label_outside_the_classes_is_refused(tmp_path):
    path = write_runner(tmp_path, sidecar=EXACT)
    path.write_text(path.read_text().replace("\n80\t7\t7\t", "\n80\t9999\t7\t"))
    with pytest.raises(ValueError, match=r"run1\.tsv, line 6: label 9999 is outside the classes "
                       r"0-9 \(num_classes in the sidecar\)"):
        an.analyze([path])


def test_without_sigma_and_n_a_generous_radius_bound_is_used(tmp_path):
    path = tmp_path / "cohen.tsv"
    path.write_text(COHEN_TEXT.replace("\t1.03\t", "\t99.0\t"))
    an.analyze([path])  # 99 is far-fetched but below the bound, which must allow sigma up to 12
    path.write_text(COHEN_TEXT.replace("\t1.03\t", "\t1e+308\t"))
    with pytest.raises(ValueError, match=r"cohen\.tsv, line 5: column 'radius' 1e\+308 exceeds "
                       r"the largest radius 100 \(sigma, alpha or n not recorded: a generous "
                       r"bound"):
        an.analyze([path])


def test_a_radii_row_beyond_the_files_largest_radius_is_refused(tmp_path):
    from smoothcert.sequential import RadiiCertificate

    counts = (0, 0, 0, 200, 0, 0, 0, 0, 0, 0)
    cert = RadiiCertificate(
        label=3, radii=(0.0, 0.25, 0.5), certified=(True, True, True), samples_used=300, n=200,
        count_a=200, decided_at=(100, 200, 200), selection_counts=counts,
        estimation_counts=counts, certifying_counts=counts)
    path = tmp_path / "radii.tsv"
    row = results.radii_row(0, 3, 1.0, cert, "certify", RUN)
    path.write_text("\t".join(results.radii_columns(cert.radii)) + "\n" + "\t".join(row) + "\n")
    an.analyze([path], radii=np.array([0.5]))
    path.write_text(path.read_text().replace("\t0.5\t", "\t0.75\t", 1))
    with pytest.raises(ValueError, match=r"radii\.tsv, line 2: column 'radius' 0.75 exceeds the "
                       r"largest radius 0.5 \(the file's largest radius"):
        an.analyze([path])


def test_the_analyze_command_takes_radii_methods_and_labels(tmp_path, capsys):
    from smoothcert.cli import main

    path = str(write_runner(tmp_path))
    assert main(["analyze", path, "--csv", "--radii", "0,0.5", "--methods", "tcertify,strict",
                 "--label", f"{path}=ADRE"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert [r[:3] for r in rows if r] == [["method", "0.0", "0.5"],
                                     ["ADRE: T-CERTIFY (paper mode)", "0.6", "0.4"],
                                     ["ADRE: T-CERTIFY (strict)", "0.6", "0.4"]]
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", path, "--label", "ADRE"])
    assert exit_.value.code == 2 and "--label: expected FILE=NAME" in capsys.readouterr().err
    assert main(["analyze", path, "--methods", "best"]) == 2
    assert "--methods: unknown method 'best'" in capsys.readouterr().err
    figure = tmp_path / "sigma.png"
    assert main(["analyze", path, "--vary-sigma", str(figure)]) == 0
    assert figure.read_bytes().startswith(an.PNG_SIGNATURE)
    assert f"plot: {figure}" in capsys.readouterr().err


def captured_figures(monkeypatch) -> list:
    figures: list = []
    monkeypatch.setattr(an, "save_figure", lambda fig, path: figures.append(fig))
    return figures


def test_the_legend_is_beside_the_curves_not_over_them(tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    an.plot_curves(an.load_results(write_runner(tmp_path)), tmp_path / "x.png")
    (fig,) = figures
    (ax,) = fig.axes
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_vary_sigma_draws_one_curve_per_file_labelled_by_sigma(tmp_path, monkeypatch):
    files = [write_runner(tmp_path, f"s{s}.tsv", sidecar={**SIDECAR, "sigma": s})
             for s in (0.25, 0.5)] + [write_cohen(tmp_path)]
    an.analyze(files, vary_sigma=tmp_path / "sigma.png")
    assert (tmp_path / "sigma.png").read_bytes().startswith(an.PNG_SIGNATURE)
    figures = captured_figures(monkeypatch)
    an.analyze(files, vary_sigma=tmp_path / "sigma.png", methods=["tcertify"])
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "σ = 0.25", "σ = 0.5", "sigma_0.25: CERTIFY"]  # Cohen's file: no sidecar, its name
    assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "-", "--"]
