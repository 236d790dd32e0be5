"""Certification result files -> the paper's Table 1, average certified radius, plots.

Reads every result file `smoothcert.results` reads: smoothcert's own and those of Cohen et al.'s
certify.py and its forks (radii rounded to 3 significant digits, which the output notes).
Sequential (radii) files give certified accuracy at their requested radii only. numpy,
matplotlib and smoothcert's numpy-only modules: analysing results must not need torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .plotfile import PNG_SIGNATURE as PNG_SIGNATURE
from .plotfile import check_plot_target, save_figure
from .results import METHOD_LABELS, PREFIXES, ResultFile, paper_mode_level, read_results
from .sequential import TABLE1_RADII
from .sidecar import Sidecar
from .tables import ascii_text, csv_table, latex_table, markdown_table

DEFAULT_RADII = TABLE1_RADII
_FORMATS = ("markdown", "latex", "csv")


@dataclass
class ResultCurve:
    """One certification method's per-example radii; abstentions have `correct` False."""

    name: str
    radius: np.ndarray
    correct: np.ndarray
    method: str = ""  # "certify", "tcertify", ...: picks the line style in plots
    source: str = ""  # the file it came from: curves of one file share a colour
    idx: np.ndarray | None = None  # the example index of each entry, when known
    radii: np.ndarray | None = None  # a sequential file's radii: accuracy is known only there

    def __post_init__(self) -> None:
        self.radius = np.asarray(self.radius, dtype=float)
        self.correct = np.asarray(self.correct, dtype=bool)
        if self.radius.ndim != 1 or self.radius.shape != self.correct.shape:
            raise ValueError(
                f"ResultCurve '{self.name}': radius and correct must be 1-D of equal length, "
                f"got shapes {self.radius.shape} and {self.correct.shape}"
            )


# ---------------------------------------------------------------- reading


def curves_of(table: ResultFile, label: str | None = None) -> list[ResultCurve]:
    """A curve for the main columns of a parsed result file and one per further method, named
    after `label` (default: the file's own label)."""
    curves = []
    protocol = table.protocol
    for method in table.methods:
        predict, radius, correct = table.method_columns(method)
        curves.append(ResultCurve(
            name=f"{label or table.label}: {protocol.curve_label(method)}",
            radius=radius,
            correct=(correct == 1) & (predict != -1),
            method=method,
            source=str(table.path),
            idx=table.column("idx"),
            radii=protocol.certified_radii(table.header),
        ))
    return curves


def read_certified(path: str | os.PathLike) -> ResultFile:
    """Read a certify result file whose rows are of one run, as its sidecar says."""
    table = read_results(path, kind="certify")
    runs = sorted({run for run in table.runs() if run is not None})
    if len(runs) > 1:
        raise ValueError(f"{table.path}: holds rows of {len(runs)} runs ({', '.join(runs)}): "
                         "results of different settings or checkpoints are mixed")
    recorded = table.sidecar.run if table.sidecar is not None else None
    if runs and recorded is not None and recorded not in runs:
        raise ValueError(f"{table.path}.json describes run {recorded}, but the rows of "
                         f"{table.path} are run {runs[0]}: the sidecar belongs to another file")
    _check_rows(table)
    return table


def _check_rows(table: ResultFile) -> None:
    """Refuse a row whose radius exceeds what its n allows or whose label is outside the
    sidecar's classes: either would distort the table, and neither is a real certificate."""
    classes = table.sidecar.num_classes if table.sidecar is not None else None
    if classes is not None:
        labels = table.column("label")
        bad = np.flatnonzero(labels >= classes)
        if bad.size:
            raise ValueError(f"{table.path}, line {table.line_numbers[bad[0]]}: label "
                             f"{labels[bad[0]]} is outside the classes 0-{classes - 1} "
                             "(num_classes in the sidecar)")
    limits, how = table.protocol.radius_limits(table.values, table.methods, table.header,
                                               table.sidecar)
    for method, limit in limits.items():
        column = ("" if method == table.main else PREFIXES[method] + "_") + "radius"
        radius = table.column(column)
        bad = np.flatnonzero(radius > limit * (1 + 1e-9))
        if bad.size:
            i = bad[0]
            n = f", n = {table.values['n'][i]}" if "n" in table.values else ""
            raise ValueError(f"{table.path}, line {table.line_numbers[i]}: column '{column}' "
                             f"{float(radius[i])!r} exceeds the largest radius {limit[i]:.6g} "
                             f"({how}{n}): the row was edited or corrupted")


def load_results(path: str | os.PathLike) -> list[ResultCurve]:
    """Parse one result file into a curve for its main columns and one per extra group."""
    return curves_of(read_certified(path))


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


def _paired(a: ResultCurve, b: ResultCurve) -> None:
    if a.radius.shape != b.radius.shape or (
        a.idx is not None and b.idx is not None and not np.array_equal(a.idx, b.idx)
    ):
        raise ValueError(f"'{a.name}' and '{b.name}' do not hold the same examples: a paired "
                         "comparison needs the same test points in the same order")


def _mean_and_se(diff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    se = diff.std(axis=0, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.full(
        diff.shape[1:], np.nan)
    return diff.mean(axis=0), se


def paired_difference(
    a: ResultCurve, b: ResultCurve, radii: np.ndarray = DEFAULT_RADII
) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy of `a` minus that of `b` at each radius, on the same examples, and
    the standard error of that mean of per-example differences."""
    _paired(a, b)
    radii = _check_radii(radii)
    certified = [(c.correct[:, None] & (c.radius[:, None] >= radii[None, :])) for c in (a, b)]
    return _mean_and_se(certified[0].astype(float) - certified[1])


def paired_radius_difference(a: ResultCurve, b: ResultCurve) -> tuple[float, float]:
    """ACR of `a` minus ACR of `b` on the same examples, and its standard error."""
    _paired(a, b)
    mean, se = _mean_and_se(
        (np.where(a.correct, a.radius, 0.0) - np.where(b.correct, b.radius, 0.0))[:, None])
    return float(mean[0]), float(se[0])


# ---------------------------------------------------------------- tables


def _table_rows(curves: Sequence[ResultCurve], radii: np.ndarray) -> list[tuple]:
    rows = []
    for c in curves:
        accuracy, acr = certified_accuracy(c, radii), average_certified_radius(c)
        if c.radii is not None:  # sequential: not a radius per input, so no ACR
            known = np.isclose(radii[:, None], c.radii[None, :], rtol=0, atol=1e-12).any(axis=1)
            accuracy, acr = np.where(known, accuracy, np.nan), float("nan")
        rows.append((c.name, accuracy, acr, c.radius.size))
    return rows


def format_table(
    curves: Sequence[ResultCurve], radii: np.ndarray = DEFAULT_RADII, fmt: str = "markdown"
) -> str:
    """Table 1: certified accuracy per curve at each radius, plus ACR and example count."""
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    radii = _check_radii(radii)
    writer = {"markdown": markdown_table, "latex": latex_table, "csv": csv_table}[fmt]
    return writer(_table_rows(curves, radii), radii)


# ---------------------------------------------------------------- plots


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
    # Beside the axes, never over the curves (the saved figure grows to hold it).
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    save_figure(fig, path)


def sigma_curves(tables: Sequence[ResultFile], names: Sequence[str | None],
                 wanted: set[str] | None = None) -> list[ResultCurve]:
    """Cohen's vary-sigma figure's curves: one per file, its main method (the first of `wanted`
    it holds), named by the file's sigma (by its name where the sidecar has none)."""
    curves = []
    for table, name in zip(tables, names, strict=True):
        own = curves_of(table, name)
        curve = next((c for c in own if wanted is None or c.method in wanted), own[0])
        sigma = table.sidecar.sigma if table.sidecar is not None else None
        curve.name = f"σ = {sigma:g}" if sigma is not None else curve.name
        curves.append(curve)
    return curves


# ---------------------------------------------------------------- entry point


def _notes(tables: list[ResultFile], fmt: str, names: Sequence[str | None]) -> list[str]:
    """What a reader of the table must know: each file's protocol, rounded radii, and the
    guarantee of each T-CERTIFY mode; each file named as its rows (`names`, or its label)."""
    sidecars = [(t, t.sidecar or Sidecar()) for t in tables]
    label = {id(t): name or t.label for t, name in zip(tables, names, strict=True)}
    protocols = {s.protocol for _, s in sidecars if s.protocol}
    notes = [f"{label[id(t)]}: {s.protocol}" for t, s in sidecars if s.protocol]
    if len(protocols) > 1:
        notes.append("warning: the files follow different test protocols; compare with care")
    notes += [
        f"{label[id(t)]}: radii rounded to 3 significant digits (Cohen's certify.py prints "
        "{:.3}, which rounds up: certified accuracy at the table's radii may be overstated)"
        for t in tables if t.rounded
    ]
    levels = {(s.alpha, s.grid) for t, s in sidecars
              if "tcertify" in t.methods and t.protocol.paper_mode}
    for alpha, grid in sorted(levels, key=str):
        level = ("2α − α/grid" if alpha is None or grid is None else
                 f"2α − α/grid = {paper_mode_level(alpha, grid):g} (α = {alpha:g}, grid {grid})")
        notes.append(f"{METHOD_LABELS['tcertify']} picks α' after seeing the estimation counts: "
                     f"its provable failure probability is {level}; "
                     f"{METHOD_LABELS['tcertify-strict']} and CERTIFY hold at α exactly")
    if any(s.sampling for _, s in sidecars):
        notes += [note for t in tables if (note := _samples_note(t, label[id(t)]))]
        notes += [note for t, s in sidecars if (note := t.protocol.note(label[id(t)], s))]
    if fmt == "latex":
        return ["% " + ascii_text(note) for note in notes]
    return [{"markdown": "", "csv": "# "}[fmt] + note for note in notes]


def samples_per_input(table: ResultFile) -> np.ndarray | None:
    """Forward passes (selection + estimation samples) per row, None when not recorded."""
    if "samples_used" in table.values:
        return table.column("samples_used")
    if "n0" in table.values and "n" in table.values:
        return table.column("n0") + table.column("n")
    return None


def _samples_note(table: ResultFile, label: str) -> str:
    samples = samples_per_input(table)
    if samples is None or samples.size == 0:
        return ""
    sampling = (table.sidecar or Sidecar()).sampling or "fixed"
    return (f"{label}: forward passes per input ({sampling} n0 + n): mean "
            f"{samples.mean():.0f}, median {np.median(samples):.0f}, max {samples.max()}")


def _refuse_repeats(paths: Sequence[str | os.PathLike]) -> None:
    """Refuse a file named twice (by two spellings, links or the same name): it would be
    tabled twice, as if it were two runs."""
    seen: dict[tuple[int, int] | Path, str | os.PathLike] = {}
    for path in paths:
        try:
            stat = os.stat(path)
            key: tuple[int, int] | Path = (stat.st_dev, stat.st_ino)
        except OSError:
            key = Path(path).resolve()  # unreadable: reading it will say why
        if key in seen:
            same = "twice" if str(seen[key]) == str(path) else f"twice (also as '{seen[key]}')"
            raise ValueError(f"analyze: '{path}' is given {same}; name each result file once")
        seen[key] = path


# --methods names: the certification methods, strict T-CERTIFY as "strict" for short.
METHOD_CHOICES = {"certify": "certify", "tcertify": "tcertify", "strict": "tcertify-strict",
                  "tcertify-strict": "tcertify-strict"}


def reachable_radii(tables: Sequence[ResultFile], radii: np.ndarray = DEFAULT_RADII
                    ) -> np.ndarray:
    """The `radii` at which some row's certified accuracy can be > 0: up to the largest radius
    any file's n, sigma and alpha allow (beyond, every column is 0). At least the first."""
    radii = _check_radii(radii)
    largest = max((float(limit.max()) for t in tables for limit in t.protocol.radius_limits(
        t.values, t.methods, t.header, t.sidecar)[0].values() if limit.size), default=0.0)
    reached = radii[radii <= largest * (1 + 1e-9)]
    return reached if reached.size else radii[:1]


def _method_names(methods: Sequence[str] | None) -> set[str] | None:
    """The certification methods `methods` (--methods names) name, None for all."""
    if methods is None:
        return None
    unknown = [m for m in methods if m not in METHOD_CHOICES]
    if unknown or not methods:
        raise ValueError(f"analyze: --methods: unknown method {', '.join(map(repr, unknown))}; "
                         "accepted: certify, tcertify, strict (comma-separated)")
    return {METHOD_CHOICES[m] for m in methods}


def _chosen(curves: list[ResultCurve], wanted: set[str] | None) -> list[ResultCurve]:
    if wanted is None:
        return curves
    chosen = [c for c in curves if c.method in wanted]
    if not chosen:
        raise ValueError(f"analyze: --methods {','.join(sorted(wanted))}: no file holds them")
    return chosen


def _labels_of(paths: Sequence[str | os.PathLike], labels: Mapping[str, str] | None
               ) -> list[str | None]:
    """Each file's row name from `labels` ({file as named: name}), None for its own label."""
    labels = dict(labels or {})
    unknown = [f for f in labels if f not in map(str, paths)]
    if unknown:
        raise ValueError(f"analyze: --label {unknown[0]}=...: '{unknown[0]}' is not one of the "
                         "files analysed (name it as on the command line)")
    return [labels.get(str(p)) for p in paths]


def analyze(
    paths: Sequence[str | os.PathLike],
    radii: np.ndarray | None = None,
    fmt: str = "markdown",
    plot: str | os.PathLike | None = None,
    protocol_note: bool = True,
    methods: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    vary_sigma: str | os.PathLike | None = None,
) -> str:
    """Load result files; return their table (after the notes on each file); plot if asked.

    `radii`: the table's columns (default: the Table-1 radii some file can reach); `methods`:
    the rows' methods (--methods names, default all); `labels`: row names by file;
    `vary_sigma`: a PNG of one curve per file, labelled by its sigma."""
    if not paths:
        raise ValueError("analyze: paths must name at least one result file")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    if radii is not None:
        radii = _check_radii(radii)
    wanted = _method_names(methods)
    for target in (plot, vary_sigma):
        if target is not None:
            check_plot_target(Path(target))  # before any work
    _refuse_repeats(paths)
    names = _labels_of(paths, labels)
    tables = [read_certified(p) for p in paths]
    curves = _chosen([curve for table, name in zip(tables, names, strict=True)
                      for curve in curves_of(table, name)], wanted)
    table = format_table(curves, reachable_radii(tables) if radii is None else radii, fmt)
    if plot is not None:
        plot_curves(curves, plot)
    if vary_sigma is not None:
        plot_curves(sigma_curves(tables, names, wanted), vary_sigma)
    notes = _notes(tables, fmt, names) if protocol_note else []
    if not notes:
        return table
    return "\n".join(notes) + ("\n\n" if fmt == "markdown" else "\n") + table
