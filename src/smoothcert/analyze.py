"""Certification result files -> the paper's Table 1, average certified radius, plots.

Reads the tab-separated files of the certify runner (and Cohen et al.'s original six-column
files). numpy and matplotlib only: analysing results must not need torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_RADII = np.arange(0, 3.0 + 1e-9, 0.25)

_REQUIRED = ("idx", "label", "predict", "radius", "correct")
# Extra certification methods computed from the same samples: column prefix -> method name.
_GROUPS = {"tcertify": "tcertify", "strict": "tcertify-strict"}
_FORMATS = ("markdown", "latex", "csv")


@dataclass
class ResultCurve:
    """One certification method's per-example radii; abstentions have `correct` False."""

    name: str
    radius: np.ndarray
    correct: np.ndarray
    method: str = ""  # "certify", "tcertify", ...: picks the line style in plots
    source: str = ""  # the file it came from: curves of one file share a colour

    def __post_init__(self) -> None:
        self.radius = np.asarray(self.radius, dtype=float)
        self.correct = np.asarray(self.correct, dtype=bool)
        if self.radius.ndim != 1 or self.radius.shape != self.correct.shape:
            raise ValueError(
                f"ResultCurve '{self.name}': radius and correct must be 1-D of equal length, "
                f"got shapes {self.radius.shape} and {self.correct.shape}"
            )


# ---------------------------------------------------------------- reading


def _read_sidecar(path: Path) -> dict:
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{sidecar}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar}: expected a JSON object, got {type(meta).__name__}")
    for key in ("method", "label", "protocol"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{sidecar}: '{key}' must be a string, got {meta[key]!r}")
    return meta


def _label(path: Path, meta: dict) -> str:
    if meta.get("label"):
        return meta["label"]
    # Cohen's files are named like "sigma_0.25": only a word-like suffix (.tsv) is an extension.
    return path.stem if path.suffix[1:].isalpha() else path.name


def _check_header(path: Path, header: list[str]) -> None:
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in header {header}")
    missing = [c for c in _REQUIRED if c not in header]
    if missing == ["radius"]:
        raise ValueError(
            f"{path}: this looks like a PREDICT output (no 'radius' column); analyze needs "
            "CERTIFY/T-CERTIFY results (columns idx label predict radius correct time)"
        )
    if missing:
        raise ValueError(
            f"{path}: not a certification result file: header lacks {', '.join(missing)} "
            f"(expected at least {' '.join(_REQUIRED)}; got {' '.join(header)})"
        )
    for prefix in _GROUPS:
        cols = [f"{prefix}_{c}" for c in ("predict", "radius", "correct")]
        present = [c for c in cols if c in header]
        if present and len(present) < len(cols):
            lacking = ", ".join(c for c in cols if c not in header)
            raise ValueError(f"{path}: column group '{prefix}_' is incomplete: lacks {lacking}")


def _parse_row(path: Path, lineno: int, fields: list[str], columns: dict[str, int]) -> list:
    """Return [predict, radius, correct] for each group of `columns` (name -> field index)."""
    values = []
    for name, i in columns.items():
        text = fields[i].strip()
        try:
            value = float(text) if name.endswith("radius") else int(text)
        except ValueError:
            raise ValueError(
                f"{path}, line {lineno}: column '{name}' is not a number: {text!r}"
            ) from None
        if name.endswith("radius") and not value >= 0:  # also rejects nan
            raise ValueError(f"{path}, line {lineno}: column '{name}' must be >= 0, got {text}")
        if name.endswith("correct") and value not in (0, 1):
            raise ValueError(f"{path}, line {lineno}: column '{name}' must be 0 or 1, got {text}")
        values.append(value)
    return values


def load_results(path: str | os.PathLike) -> list[ResultCurve]:
    """Parse one result file into a curve for its main columns and one per extra group."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: empty file, expected a header line ({' '.join(_REQUIRED)} ...)")
    header = [c.strip() for c in lines[0].split("\t")]
    _check_header(path, header)

    prefixes = [""] + [f"{p}_" for p in _GROUPS if f"{p}_radius" in header]
    names = [f"{p}{c}" for p in prefixes for c in ("predict", "radius", "correct")]
    columns = {name: header.index(name) for name in names}
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(
                f"{path}, line {lineno}: {len(fields)} fields, but the header has {len(header)}"
            )
        rows.append(_parse_row(path, lineno, fields, columns))
    table = np.array(rows, dtype=float).reshape(len(rows), len(names))

    meta = _read_sidecar(path)
    label = _label(path, meta)
    methods = [meta.get("method", "certify")] + [_GROUPS[p[:-1]] for p in prefixes[1:]]
    curves = []
    for k, method in enumerate(methods):
        predict, radius, correct = table[:, 3 * k], table[:, 3 * k + 1], table[:, 3 * k + 2]
        curves.append(
            ResultCurve(
                name=f"{label}: {method}",
                radius=radius,
                correct=(correct == 1) & (predict != -1),
                method=method,
                source=str(path),
            )
        )
    return curves


# ---------------------------------------------------------------- statistics


def _check_radii(radii: np.ndarray) -> np.ndarray:
    radii = np.asarray(radii, dtype=float)
    if radii.ndim != 1 or radii.size == 0 or not np.all(np.isfinite(radii)) or np.any(radii < 0):
        raise ValueError(f"radii must be a non-empty 1-D array of finite values >= 0, got {radii}")
    return radii


def certified_accuracy(
    curve_or_arrays: ResultCurve | tuple[np.ndarray, np.ndarray],
    radii: np.ndarray = DEFAULT_RADII,
) -> np.ndarray:
    """Fraction of examples correct with radius >= r, for each r in `radii` (nan if none)."""
    curve = (
        curve_or_arrays
        if isinstance(curve_or_arrays, ResultCurve)
        else ResultCurve("arrays", *curve_or_arrays)
    )
    radii = _check_radii(radii)
    n = curve.radius.size
    if n == 0:
        return np.full(radii.shape, np.nan)
    # Exact float comparison: the runner writes full precision. Cohen's "{:.3}" rounded radii
    # up (0.24963 -> "0.25") and so overstated accuracy exactly at the table's radii.
    certified = np.sort(curve.radius[curve.correct])
    return (certified.size - np.searchsorted(certified, radii, side="left")) / n


def average_certified_radius(curve: ResultCurve) -> float:
    """Mean over all examples of radius * correct (Zhai et al. 2020); nan if no examples."""
    if curve.radius.size == 0:
        return float("nan")
    return float(np.mean(np.where(curve.correct, curve.radius, 0.0)))


# ---------------------------------------------------------------- tables


def _fixed(value: float, digits: int) -> str:
    return "-" if np.isnan(value) else f"{value:.{digits}f}"


def _latex_escape(text: str) -> str:
    special = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
    }  # fmt: skip
    return "".join(special.get(ch, ch) for ch in text)


def _table_rows(curves: Sequence[ResultCurve], radii: np.ndarray) -> list[tuple]:
    return [
        (c.name, certified_accuracy(c, radii), average_certified_radius(c), c.radius.size)
        for c in curves
    ]


def _markdown(rows: list[tuple], radii: np.ndarray) -> str:
    head = ["Method \\ ℓ2 radius", *(f"{r:.2f}" for r in radii), "ACR", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, acc, acr, n in rows:
        cells = [name.replace("|", "\\|"), *(_fixed(a, 2) for a in acc), _fixed(acr, 3), str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex(rows: list[tuple], radii: np.ndarray) -> str:
    k = len(radii)
    lines = [
        r"\begin{tabular}{l" + "r" * (k + 2) + "}",
        r"\toprule",
        rf"Method & \multicolumn{{{k}}}{{c}}{{$\ell_2$ radius}} & ACR & $n$ \\",
        rf"\cmidrule(lr){{2-{k + 1}}}",
        " & " + " & ".join(f"{r:.2f}" for r in radii) + r" & & \\",
        r"\midrule",
    ]
    for name, acc, acr, n in rows:
        cells = [_latex_escape(name), *(_fixed(a, 2) for a in acc), _fixed(acr, 3), str(n)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _csv(rows: list[tuple], radii: np.ndarray) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", *(repr(float(r)) for r in radii), "ACR", "n"])
    for name, acc, acr, n in rows:
        writer.writerow([name, *(repr(float(a)) for a in acc), repr(acr), n])
    return out.getvalue()


def format_table(
    curves: Sequence[ResultCurve], radii: np.ndarray = DEFAULT_RADII, fmt: str = "markdown"
) -> str:
    """Table 1: certified accuracy per curve at each radius, plus ACR and example count."""
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    radii = _check_radii(radii)
    writer = {"markdown": _markdown, "latex": _latex, "csv": _csv}[fmt]
    return writer(_table_rows(curves, radii), radii)


# ---------------------------------------------------------------- plots


def _atomic_write(path: Path, data: bytes) -> None:
    # smoothcert.io has the same helper but imports torch; analyze stays torch-free.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _line_style(method: str) -> str:
    # As the paper's Figure 2: dashed CERTIFY, solid T-CERTIFY; dash-dot tells strict apart.
    return {"certify": "--", "tcertify-strict": "-."}.get(method, "-")


def plot_curves(
    curves: Sequence[ResultCurve],
    path: str | os.PathLike,
    radii_max: float | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG of certified accuracy against radius, one labelled step line per curve."""
    # Figure + Agg canvas directly: no pyplot, so the caller's global backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_curves: curves must not be empty")
    if radii_max is not None and not (np.isfinite(radii_max) and radii_max > 0):
        raise ValueError(f"radii_max must be a finite number > 0, got {radii_max}")
    observed = max((float(c.radius.max()) for c in curves if c.radius.size), default=0.0)
    upper = radii_max if radii_max is not None else (observed * 1.05 or 1.0)
    grid = np.linspace(0.0, upper, 1001)

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    for curve in curves:
        colour = colours.setdefault(curve.source or curve.name, f"C{len(colours) % 10}")
        ax.plot(
            grid,
            certified_accuracy(curve, grid),
            drawstyle="steps-post",
            color=colour,
            linestyle=_line_style(curve.method),
            label=curve.name,
        )
    ax.set(xlabel="radius (ℓ2)", ylabel="certified accuracy", xlim=(0, upper), ylim=(0, 1))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _atomic_write(Path(path), buffer.getvalue())


# ---------------------------------------------------------------- entry point


def _notes(files: list[tuple[Path, dict]], fmt: str) -> list[str]:
    notes = [f"{_label(p, meta)}: {meta['protocol']}" for p, meta in files if meta.get("protocol")]
    if len({meta["protocol"] for _, meta in files if meta.get("protocol")}) > 1:
        notes.append("warning: the files follow different test protocols; compare with care")
    prefix = {"markdown": "", "latex": "% ", "csv": "# "}[fmt]
    return [prefix + note for note in notes]


def analyze(
    paths: Sequence[str | os.PathLike],
    radii: np.ndarray = DEFAULT_RADII,
    fmt: str = "markdown",
    plot: str | os.PathLike | None = None,
    protocol_note: bool = True,
) -> str:
    """Load result files; return their table (after one protocol note per file); plot if asked."""
    if not paths:
        raise ValueError("analyze: paths must name at least one result file")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    curves = [curve for p in paths for curve in load_results(p)]
    table = format_table(curves, radii, fmt)
    if plot is not None:
        plot_curves(curves, plot)
    notes = _notes([(Path(p), _read_sidecar(Path(p))) for p in paths], fmt) if protocol_note else []
    if not notes:
        return table
    return "\n".join(notes) + ("\n\n" if fmt == "markdown" else "\n") + table
