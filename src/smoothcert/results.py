"""The result-file format: schema, writer, reader (smoothcert's files and the peers'), sidecar.

A result file is tab-separated text, header first and no comment line, so Cohen et al.'s
analyze.py (pandas `read_csv(sep="\\t")`) reads it. A certify row starts with the columns of
Cohen's certify.py, `idx label predict radius correct time` (radius at full precision), then

- `method`: what those columns hold (certify or tcertify), and `run`: a fingerprint of the
  protocol and of the checkpoint's content, equal in every row one run writes, so a lone file
  still says what it holds and rows of two runs can never be mixed unnoticed;
- `alpha_prime pa_lower pb_upper` of the main method, then one group of six columns
  (`<prefix>_predict _radius _correct _alpha_prime _pa_lower _pb_upper`) per further method
  computed from the same samples;
- the counts `n0 n count_a count_b selection_counts estimation_counts` (the last two as
  `class:count` lists of the nonzero classes), from which `verify` recomputes everything.

A predict row is Cohen's predict.py row `idx label predict correct time` plus `method run`.
A radii row (sequential certification at given radii, `sequential.RadiiProcedure`) starts with
Cohen's six columns (radius: the largest requested radius certified), then `method run n0 n
count_a samples_used`, the per-class counts `selection_counts estimation_counts
certifying_counts` (the last at the look that certified the largest radius) and, per radius
r, `certified_<r>` (0/1) and `decided_<r>` (estimation samples after which it was decided).
The sidecar `<file>.json` holds the run's settings, the checkpoint's sha256 and the
fingerprint. numpy, `stats` and `sequential` only: reading results never needs torch.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import sequential
from .io import atomic_write_json, atomic_write_text, named_write_errors
from .labels import LabelsUnavailable, split_labels
from .sequential import RadiiCertificate
from .stats import ABSTAIN, Certificate, certify_from_counts

FORMAT = "smoothcert-results/2"
COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
ID_COLUMNS = ("method", "run")
BOUND_COLUMNS = ("alpha_prime", "pa_lower", "pb_upper")
GROUP_FIELDS = ("predict", "radius", "correct", *BOUND_COLUMNS)
COUNT_COLUMNS = ("n0", "n", "count_a", "count_b", "selection_counts", "estimation_counts")
# Column prefix of each certification method when it is not the main one.
PREFIXES = {"certify": "certify", "tcertify": "tcertify", "tcertify-strict": "strict"}
# --method of certify -> (method of the main columns, further methods in column order).
LAYOUTS = {
    "certify": ("certify", ()),
    "tcertify": ("tcertify", ("tcertify-strict",)),
    "both": ("certify", ("tcertify", "tcertify-strict")),
}
# How tables and plots name each method; T-CERTIFY's two modes carry different guarantees.
METHOD_LABELS = {
    "certify": "CERTIFY",
    "tcertify": "T-CERTIFY (paper mode)",
    "tcertify-strict": "T-CERTIFY (strict)",
}
# The settings a row's `run` fingerprint covers: rows agree on these or come from another run.
IDENTITY_KEYS = ("mode", "method", "split", "n0", "n", "alpha", "grid", "skip", "seed", "sigma",
                 "dataset", "amp", "checkpoint_sha256")
# The settings of sequential ("sequential") and input-specific ("adaptive") sampling: part of
# the identity where set, so that fixed-n runs keep the fingerprints they always had.
SAMPLING_KEYS = ("sampling", "radii", "max_n", "confidence_sequence", "batch", "tolerance")
RADII_COLUMNS = (*COHEN_COLUMNS, *ID_COLUMNS, "n0", "n", "count_a", "samples_used",
                 "selection_counts", "estimation_counts", "certifying_counts")
_REQUIRED = ("idx", "label", "predict", "radius", "correct")
_RUN = re.compile(r"^[0-9a-f]{12}$")
_TIME = re.compile(r"^(?:(\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)$")
_LEGACY_GROUP = ("predict", "radius", "correct", "alpha", "pa_lower", "pb_upper")
_LEGACY_COUNTS = ("n0", "n", "count_a", "count_b", "counts")


def columns(mode: str, layout: str = "both") -> list[str]:
    """The header of a result file of `mode` (certify/predict) and certify `layout`."""
    if mode == "predict":
        return [*PREDICT_COLUMNS, *ID_COLUMNS]
    main, groups = LAYOUTS[layout]
    extra = [f"{PREFIXES[g]}_{f}" for g in groups for f in GROUP_FIELDS]
    return [*COHEN_COLUMNS, *ID_COLUMNS, *BOUND_COLUMNS, *extra, *COUNT_COLUMNS]


def radius_name(radius: float) -> str:
    """How a radius is written in the radii columns' names: the shortest exact text."""
    return repr(float(radius))


def radii_columns(radii: Sequence[float]) -> list[str]:
    """The header of a radii result file (sequential certification at `radii`)."""
    names = [radius_name(r) for r in radii]
    return [*RADII_COLUMNS, *(f"certified_{r}" for r in names),
            *(f"decided_{r}" for r in names)]


def header_radii(header: Sequence[str]) -> list[float]:
    """The radii a radii file's header names, in column order."""
    return [float(c[len("certified_"):]) for c in header if c.startswith("certified_")]


def _legacy_columns(layout: str) -> list[str]:
    """The header smoothcert wrote before the method/run columns (read-only today)."""
    _, groups = LAYOUTS[layout]
    extra = [f"{PREFIXES[g]}_{f}" for g in groups for f in _LEGACY_GROUP]
    return [*COHEN_COLUMNS, *extra, *_LEGACY_COUNTS]


OWN_HEADERS = {tuple(columns("predict")), PREDICT_COLUMNS} | {
    tuple(header) for layout in LAYOUTS
    for header in (columns("certify", layout), _legacy_columns(layout))
}


# ---------------------------------------------------------------- identity


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run is identified by: IDENTITY_KEYS, and the SAMPLING_KEYS that are set."""
    found = {key: settings.get(key) for key in IDENTITY_KEYS}
    found.update({key: settings[key] for key in SAMPLING_KEYS if settings.get(key) is not None})
    return found


def fingerprint(settings: Mapping[str, Any]) -> str:
    """The `run` column: 12 hex digits of the sha256 of the identity settings."""
    text = json.dumps(identity(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- sidecar


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar of result file `path` as a dict, None when there is none."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_bytes().decode("utf-8-sig"))  # a BOM is not content
    except UnicodeDecodeError as err:
        raise ValueError(f"{sidecar}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{sidecar}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar}: expected a JSON object, got {type(meta).__name__}")
    for key in ("method", "label", "protocol", "run"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{sidecar}: '{key}' must be a string, got {meta[key]!r}")
    return meta


def is_own_sidecar(meta: Mapping[str, Any]) -> bool:
    """Whether a sidecar's content was written by smoothcert (this version or an earlier one)."""
    return meta.get("format") == FORMAT or {"mode", "method", "protocol"} <= set(meta)


def write_sidecar(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    atomic_write_json(sidecar_path(path), dict(meta))


# ---------------------------------------------------------------- writing


def _float(value: float) -> str:
    return repr(float(value))  # shortest text that reads back as the same double


def _sparse(counts: np.ndarray) -> str:
    return ",".join(f"{c}:{int(counts[c])}" for c in np.flatnonzero(counts))


def _group(cert: Certificate, label: int) -> list[str]:
    return [str(cert.label), _float(cert.radius), str(int(cert.label == label)),
            _float(cert.alpha_prime), _float(cert.pa_lower), _float(cert.pb_upper)]


def time_text(seconds: float) -> str:
    """Seconds as Cohen's time column writes them: str(datetime.timedelta)."""
    return str(datetime.timedelta(seconds=seconds))


def certify_row(idx: int, label: int, seconds: float, certificates: Mapping[str, Certificate],
                selection: np.ndarray, estimation: np.ndarray, layout: str, run: str) -> list[str]:
    """The fields of one certify row; `certificates` maps each method of `layout` to its own."""
    main, groups = LAYOUTS[layout]
    cert = certificates[main]
    selection, estimation = np.asarray(selection), np.asarray(estimation)
    top = int(np.argmax(selection))
    row = [str(idx), str(label), str(cert.label), _float(cert.radius),
           str(int(cert.label == label)), time_text(seconds), main, run,
           *_group(cert, label)[3:]]
    for method in groups:
        row += _group(certificates[method], label)
    return row + [str(int(selection.sum())), str(int(estimation.sum())), str(int(estimation[top])),
                  str(int(np.delete(estimation, top).max())), _sparse(selection),
                  _sparse(estimation)]


def _sparse_or_dash(counts: Sequence[int]) -> str:
    """Per-class counts as `class:count` pairs; "-" when there are none (no sample drawn)."""
    return _sparse(np.asarray(counts)) if np.sum(counts) > 0 else "-"


def radii_row(idx: int, label: int, seconds: float, cert: RadiiCertificate, method: str,
              run: str) -> list[str]:
    """The fields of one radii row (columns `radii_columns(cert.radii)`)."""
    certified = [r for r, c in zip(cert.radii, cert.certified, strict=True) if c]
    return [str(idx), str(label), str(cert.label), _float(max(certified, default=0.0)),
            str(int(cert.label == label)), time_text(seconds), method, run,
            str(sum(cert.selection_counts)), str(cert.n), str(cert.count_a),
            str(cert.samples_used), _sparse_or_dash(cert.selection_counts),
            _sparse_or_dash(cert.estimation_counts), _sparse_or_dash(cert.certifying_counts),
            *(str(int(c)) for c in cert.certified), *(str(d) for d in cert.decided_at)]


def predict_row(idx: int, label: int, prediction: int, seconds: float, run: str) -> list[str]:
    return [str(idx), str(label), str(prediction), str(int(prediction == label)),
            time_text(seconds), "predict", run]


def write_table(path: str | os.PathLike, header: Sequence[str], lines: Sequence[str]) -> None:
    """Replace `path` atomically with `header` and the given row lines."""
    atomic_write_text(path, "\t".join(header) + "\n" + "".join(line + "\n" for line in lines))


class RowWriter:
    """Appends rows to a result file, each flushed as written; the file (with its header) is
    created at the first row, after `before_create` ran, so a run that fails earlier leaves
    nothing behind."""

    def __init__(self, path: str | os.PathLike, header: Sequence[str],
                 before_create: Callable[[], None] | None = None):
        self.path, self.header, self.before_create = Path(path), list(header), before_create
        self._handle = None

    def write(self, row: Sequence[str]) -> None:
        if len(row) != len(self.header):
            raise ValueError(f"row has {len(row)} fields, the header {len(self.header)}")
        if self._handle is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            if fresh and self.before_create is not None:
                self.before_create()
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            if fresh:
                self._append("\t".join(self.header) + "\n")
        self._append("\t".join(row) + "\n")

    def _append(self, text: str) -> None:
        with named_write_errors(self.path):
            self._handle.write(text)
            self._handle.flush()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with named_write_errors(self.path):
                handle.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- reading


@dataclass
class ResultFile:
    """A parsed result file: its columns by name, the raw text of each row, its sidecar."""

    path: Path
    header: list[str]
    kind: str  # "certify", "radii" or "predict"
    main: str  # the method of the main columns
    groups: list[str]  # further methods, in column order
    values: dict[str, list] = field(default_factory=dict)  # parsed columns by name
    lines: list[str] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)
    meta: dict | None = None  # the sidecar, None when absent
    radius_texts: list[str] = field(default_factory=list)  # the radii as printed
    cut: bool = False  # a last row cut off mid-write was left out

    @property
    def native(self) -> bool:
        """Written by this smoothcert version (has the method and run columns)."""
        if self.kind == "radii":
            return self.header == radii_columns(header_radii(self.header))
        return tuple(self.header) in OWN_HEADERS and "run" in self.header

    @property
    def own(self) -> bool:
        """Written by smoothcert, this version or an earlier one."""
        if self.kind == "radii":
            return self.native
        if tuple(self.header) not in OWN_HEADERS:
            return False
        # smoothcert's earlier predict files are Cohen's five columns: the sidecar tells.
        return self.kind == "certify" or self.native or is_own_sidecar(self.meta or {})

    @property
    def rounded(self) -> bool:
        """Whether the radii were printed rounded (Cohen's "{:.3}"), not at full precision."""
        if self.kind != "certify" or "run" in self.header:
            return False  # radii files write full precision, as native certify files
        texts = [t for t in self.radius_texts if float(t) > 0]
        return bool(texts) and all(_significant_digits(t) <= 3 for t in texts)

    @property
    def methods(self) -> list[str]:
        return [self.main, *self.groups]

    @property
    def label(self) -> str:
        if self.meta and self.meta.get("label"):
            return self.meta["label"]
        # Cohen's files are named like "sigma_0.25": only a word-like suffix is an extension.
        return self.path.stem if self.path.suffix[1:].isalpha() else self.path.name

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.values[name])

    def method_columns(self, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predict, radius, correct) of one method of the file."""
        prefix = "" if method == self.main else PREFIXES[method] + "_"
        return tuple(self.column(prefix + name) for name in ("predict", "radius", "correct"))

    def rows_by_index(self) -> dict[int, str]:
        return dict(zip(self.values["idx"], self.lines, strict=True))

    def runs(self) -> list[str | None]:
        return list(self.values.get("run", [None] * len(self.lines)))


def _significant_digits(text: str) -> int:
    mantissa = text.lower().split("e")[0].replace("-", "").replace(".", "")
    return len(mantissa.strip("0"))


def parse_time(text: str) -> float:
    """Seconds of a time field: str(datetime.timedelta) as Cohen writes it, or plain seconds."""
    match = _TIME.match(text)
    if match:
        days, hours, minutes, seconds = match.groups()
        return 86400 * int(days or 0) + 3600 * int(hours) + 60 * int(minutes) + float(seconds)
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(text)
    return value


def parse_counts(text: str) -> dict[int, int]:
    """A `class:count` list (nonzero classes, each once) as a dict."""
    counts = {}
    for item in text.split(","):
        cls, _, count = item.partition(":")
        c, v = int(cls), int(count)
        if c < 0 or v < 1 or c in counts:
            raise ValueError("must list class:count pairs, each class (>= 0) once, "
                             "each count >= 1")
        counts[c] = v
    return counts


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _int(text: str, low: int) -> int:
    value = int(text)
    _check(value >= low, f"must be an integer >= {low}")
    return value


def _unit(text: str) -> float:
    value = float(text)
    _check(0 <= value <= 1, "must be a number in [0, 1]")
    return value


def _radius(text: str) -> float:
    value = float(text)
    _check(math.isfinite(value) and value >= 0, "must be a finite number >= 0")
    return value


def _correct(text: str) -> int:
    value = int(text)
    _check(value in (0, 1), "must be 0 or 1")
    return value


def _run(text: str) -> str:
    _check(bool(_RUN.match(text)), "must be 12 hexadecimal digits")
    return text


def _counts_or_none(text: str) -> dict[int, int]:
    return {} if text == "-" else parse_counts(text)


def _parser(name: str, kind: str = "certify") -> Callable[[str], Any] | None:
    if kind == "radii":
        if name.startswith("certified_"):
            return _correct
        radii_parsers = {"n": lambda t: _int(t, 0), "samples_used": lambda t: _int(t, 1),
                         "selection_counts": parse_counts, "estimation_counts": _counts_or_none,
                         "certifying_counts": _counts_or_none}
        if name.startswith("decided_") or name in radii_parsers:
            return radii_parsers.get(name, lambda t: _int(t, 0))
    base = name.split("_", 1)[1] if name.split("_", 1)[0] in PREFIXES.values() else name
    return {
        "idx": lambda t: _int(t, 0), "label": lambda t: _int(t, 0),
        "predict": lambda t: _int(t, ABSTAIN), "radius": _radius, "correct": _correct,
        "time": parse_time, "run": _run, "method": str,
        "alpha_prime": _unit, "alpha": _unit, "pa_lower": _unit, "pb_upper": _unit,
        "n0": lambda t: _int(t, 1), "n": lambda t: _int(t, 1), "count_a": lambda t: _int(t, 0),
        "count_b": lambda t: _int(t, 0), "counts": parse_counts,
        "selection_counts": parse_counts, "estimation_counts": parse_counts,
    }.get(base)


def _classify(path: Path, header: list[str]) -> tuple[str, str, list[str]]:
    """(kind, main method, further methods) that a header describes, or a clear error."""
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in header {header}")
    for wanted in (*_REQUIRED, "time"):
        near = [c for c in header if c != wanted and c.lower() == wanted]
        if near and wanted not in header:
            raise ValueError(
                f"{path}: column '{near[0]}' should be '{wanted}' (column names are "
                f"case-sensitive; expected {' '.join(COHEN_COLUMNS)} ...)"
            )
    missing = [c for c in _REQUIRED if c not in header]
    if missing == ["radius"]:
        kind = "predict"
    elif missing:
        raise ValueError(
            f"{path}: not a result file: header lacks {', '.join(missing)} (expected at "
            f"least {' '.join(_REQUIRED)}; got {' '.join(header)})"
        )
    elif "samples_used" in header:
        return "radii", "", []  # the method: in the rows' method column
    else:
        kind = "certify"
    groups = []
    for method in ("tcertify", "tcertify-strict"):
        cols = [f"{PREFIXES[method]}_{c}" for c in ("predict", "radius", "correct")]
        present = [c for c in cols if c in header]
        if present and len(present) < len(cols):
            lacking = ", ".join(c for c in cols if c not in header)
            raise ValueError(f"{path}: column group '{PREFIXES[method]}_' is incomplete: "
                             f"lacks {lacking}")
        if present:
            groups.append(method)
    if kind == "predict":
        return kind, "predict", []
    # T-CERTIFY's strict mode follows T-CERTIFY in the main columns (--method tcertify).
    main = "tcertify" if groups == ["tcertify-strict"] else "certify"
    return kind, main, groups


def read_results(path: str | os.PathLike, kind: str | None = None,
                 allow_cut: bool = False) -> ResultFile:
    """Parse a result file (smoothcert's, or Cohen's and its forks'), checking every row.

    `kind` ("certify"/"predict") refuses a file of the other kind. `allow_cut` leaves out a
    last line without its newline (a row cut off by a kill), as resuming needs.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors) is not content
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    lines = text.split("\n")
    if not lines[0].strip():
        raise ValueError(f"{path}: empty file, expected a header line ({' '.join(_REQUIRED)} ...)")
    header = [c.strip() for c in lines[0].split("\t")]
    found, main, groups = _classify(path, header)
    if kind == "certify" and found == "predict":
        raise ValueError(
            f"{path}: this is a PREDICT result (no 'radius' column); certified accuracy needs "
            f"CERTIFY/T-CERTIFY results ({' '.join(COHEN_COLUMNS)} ...)"
        )
    if kind == "predict" and found != "predict":
        raise ValueError(f"{path}: this is a CERTIFY result, expected a PREDICT result "
                         f"({' '.join(PREDICT_COLUMNS)})")
    result = ResultFile(path, header, found, main, groups, meta=read_sidecar(path))
    if found == "radii" and (result.meta or {}).get("method") in sequential.SEQUENTIAL_METHODS:
        result.main = main = result.meta["method"]
    body = lines[1:]
    if body[-1] == "":
        body = body[:-1]  # the newline that ends the last row
    elif allow_cut:
        body, result.cut = body[:-1], True
    parsers = {name: _parser(name, found) for name in header}
    result.values = {name: [] for name, parse in parsers.items() if parse is not None}
    first_line: dict[int, int] = {}
    for lineno, line in enumerate(body, start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(
                f"{path}, line {lineno}: {len(fields)} fields, but the header has {len(header)}"
            )
        for name, text_ in zip(header, fields, strict=True):
            parse = parsers[name]
            if parse is None:
                continue
            try:
                value = parse(text_.strip())
            except ValueError as err:
                why = str(err) if str(err).startswith("must") else "is not valid"
                raise ValueError(f"{path}, line {lineno}: column '{name}' {why}: "
                                 f"{text_.strip()!r}") from None
            result.values[name].append(value)
        idx = result.values["idx"][-1]
        if idx in first_line:
            raise ValueError(f"{path}, line {lineno}: duplicate idx {idx} (first on line "
                             f"{first_line[idx]})")
        first_line[idx] = lineno
        if found == "certify":
            result.radius_texts.append(fields[header.index("radius")].strip())
        if found == "radii" and not result.main:
            result.main = main = result.values["method"][-1]
        if "method" in header and result.values["method"][-1] != main:
            raise ValueError(f"{path}, line {lineno}: column 'method' is "
                             f"{result.values['method'][-1]!r}, but the columns hold {main}")
        result.lines.append(line)
        result.line_numbers.append(lineno)
    return result


# ---------------------------------------------------------------- verify


def paper_mode_level(alpha: float, grid: int) -> float:
    """The provable failure probability of paper-mode T-CERTIFY: alpha + (alpha - alpha/grid)."""
    return 2 * alpha - alpha / grid


def _dense(counts: Mapping[int, int], num_classes: int) -> np.ndarray:
    dense = np.zeros(num_classes, dtype=np.int64)
    for cls, count in counts.items():
        if cls >= num_classes:
            raise ValueError(f"class {cls} outside the {num_classes} classes")
        dense[cls] = count
    return dense


def _close(a: float, b: float) -> bool:
    # Certificates are recomputed by the same code; the tolerance only absorbs another
    # scipy's last-bit differences, far below any edit that would matter.
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _mismatches(value: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [f"{name} {value[name]!r}, recomputed {want!r}" for name, want in expected.items()
            if not _close(value[name], want)]


def _row_values(table: ResultFile, i: int, run: str) -> tuple[dict[str, Any], list[str]]:
    """Row i's parsed values, and a problem if its run column is not the sidecar's run."""
    value = {name: column[i] for name, column in table.values.items()}
    problems = [] if value["run"] == run else [
        f"run {value['run']}, but the sidecar's settings give {run}"]
    return value, problems


def _row_problems(table: ResultFile, i: int, meta: Mapping[str, Any], run: str) -> list[str]:
    value, problems = _row_values(table, i, run)
    try:
        selection = _dense(value["selection_counts"], meta["num_classes"])
        estimation = _dense(value["estimation_counts"], meta["num_classes"])
    except ValueError as err:
        return [*problems, f"counts: {err}"]
    top = int(np.argmax(selection))
    written = {"n0": selection.sum(), "n": estimation.sum(), "count_a": estimation[top],
               "count_b": np.delete(estimation, top).max()}
    for name, expected in written.items():
        if value[name] != int(expected):
            problems.append(f"{name} {value[name]}, the counts give {int(expected)}")
    if meta.get("sampling") == "adaptive":  # n must follow from the selection counts alone
        chosen = sequential.choose_n(selection, meta["max_n"], meta["sigma"], meta["alpha"],
                                     meta["tolerance"])
        if estimation.sum() != chosen:
            problems.append(f"n {int(estimation.sum())}, but the selection counts choose {chosen}")
    for method in table.methods:
        prefix = "" if method == table.main else PREFIXES[method] + "_"
        try:
            cert = certify_from_counts(selection, estimation, meta["sigma"], meta["alpha"],
                                       method, meta["grid"])
        except ValueError as err:
            problems.append(f"{method}: cannot be recomputed ({err})")
            continue
        recomputed = {"predict": cert.label, "correct": int(cert.label == value["label"]),
                      "radius": cert.radius, "alpha_prime": cert.alpha_prime,
                      "pa_lower": cert.pa_lower, "pb_upper": cert.pb_upper}
        for name, expected in recomputed.items():
            got = value[prefix + name]
            if not _close(got, expected):
                problems.append(f"{prefix}{name} {got!r}, recomputed {expected!r}")
    return problems


def radii_procedure(meta: Mapping[str, Any]) -> sequential.RadiiProcedure:
    """A fresh sequential procedure with a radii file's settings (its sidecar)."""
    return sequential.RadiiProcedure(
        meta["radii"], meta["sigma"], meta["alpha"], meta["max_n"], method=meta["method"],
        num_classes=meta["num_classes"], confidence_sequence=meta["confidence_sequence"],
        batch_size=meta["batch"])


def _radii_row_problems(table: ResultFile, i: int, meta: Mapping[str, Any], run: str,
                        procedure: sequential.RadiiProcedure) -> list[str]:
    """What in a radii row does not follow from its counts: the certificate of its largest
    certified radius is recomputed at the look that certified it, the final look's counts must
    certify nothing more, and the columns must agree with the counts and with each other."""
    value, problems = _row_values(table, i, run)
    classes = meta["num_classes"]
    try:
        selection, estimation, certifying = (
            _dense(value[name], classes)
            for name in ("selection_counts", "estimation_counts", "certifying_counts"))
    except ValueError as err:
        return [*problems, f"counts: {err}"]
    radii = procedure.radii
    names = [radius_name(r) for r in radii]
    certified = np.array([value[f"certified_{r}"] for r in names], dtype=bool)
    label = int(np.argmax(selection))
    predict = label if certified.any() else ABSTAIN
    problems += _mismatches(value, {
        "predict": predict, "correct": int(predict == value["label"]),
        "radius": float(radii[certified].max()) if certified.any() else 0.0,
        "n0": int(selection.sum()), "n": int(estimation.sum()),
        "count_a": int(estimation[label]),
        "samples_used": int(selection.sum() + estimation.sum())})
    looks = {0, *procedure.cs.looks.tolist()}
    if certified.any() and not certified[: int(np.flatnonzero(certified).max()) + 1].all():
        problems.append("certified radii are not a prefix of the radii")
    if estimation.sum() not in looks:
        problems.append(f"n {int(estimation.sum())} is not a look of the schedule")
    if not certified.any():
        if certifying.sum():
            problems.append("certifying_counts given, but no radius is certified")
        return problems
    top = int(np.flatnonzero(certified).max())
    if (certifying.sum() != value[f"decided_{names[top]}"] or certifying.sum() not in looks
            or np.any(certifying > estimation)):
        return [*problems, f"certifying_counts ({int(certifying.sum())} samples) are not a "
                f"look at which radius {names[top]} was decided, within the final counts"]
    try:
        at_look = procedure.certifiable(certifying[label], int(certifying.sum()),
                                        np.delete(certifying, label))
        at_end = procedure.certifiable(estimation[label], int(estimation.sum()),
                                       np.delete(estimation, label))
    except ValueError as err:
        return [*problems, f"cannot be recomputed ({err})"]
    if not at_look[top]:
        problems.append(f"radius {names[top]} is not certified by certifying_counts")
    if np.any(at_end & ~certified):
        problems.append("the final counts certify a radius the row does not")
    return problems


@dataclass
class Verification:
    """What `check_file` found in one result file."""

    rows: int  # rows whose certificates were recomputed
    problems: list[str] = field(default_factory=list)  # what does not match: exit 1
    notes: list[str] = field(default_factory=list)  # an unfinished run, what was not checked
    checked: list[str] = field(default_factory=list)  # beyond the certificates, for the summary


def _part_of(path: Path) -> Path | None:
    """The result file a torchrun part file (`<out>.part<rank>`) belongs to, None otherwise."""
    match = re.fullmatch(r"(.+)\.part\d+", path.name)
    return path.with_name(match.group(1)) if match and not sidecar_path(path).exists() else None


def _checked_sidecar(path: Path, table: ResultFile, out: Path) -> dict:
    """The sidecar that describes `table` (`out`'s), refused unless verify can use it."""
    if not table.native:
        raise ValueError(
            f"{path}: cannot be verified: it has no selection counts (written by Cohen's "
            "certify.py, a fork, or smoothcert before the method/run columns)"
        )
    meta = read_sidecar(out)
    if meta is None:
        raise ValueError(f"{path}: cannot be verified without its sidecar "
                         f"{sidecar_path(out)} (sigma, alpha and grid are recorded there)")
    missing = [k for k in (*IDENTITY_KEYS, "num_classes") if k not in meta]
    if table.kind == "radii":
        missing += [k for k in ("radii", "max_n", "confidence_sequence", "batch")
                    if meta.get(k) is None]
    if missing or not is_own_sidecar(meta):
        raise ValueError(f"{sidecar_path(out)}: not a smoothcert sidecar of this version "
                         f"(lacks {', '.join(missing) or 'format'})")
    return meta


def _ranges(indices: Sequence[int], skip: int) -> str:
    """Protocol indices as ranges of consecutive ones: "40–59, 80"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + skip:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def _protocol_count(meta: Mapping[str, Any], size: int | None) -> int | None:
    """How many examples the protocol selects (every skip-th from 0, at most max): from the
    dataset's size when known, else from the sidecar's protocol ("..., 20 examples")."""
    if size is not None:
        count = len(range(0, size, meta["skip"]))
        return count if meta.get("max") is None else min(count, meta["max"])
    match = re.search(r"(\d+) examples$", str(meta.get("protocol", "")))
    return int(match.group(1)) if match else None


def _check_row_set(path: Path, idx: Sequence[int], meta: Mapping[str, Any], size: int | None,
                   part_of: Path | None, report: Verification) -> None:
    """The rows' indices against the protocol's: none outside it, none deleted; rows missing
    only after the last one present are an unfinished run."""
    skip, count = meta["skip"], _protocol_count(meta, size)
    report.checked.append("no duplicates")  # read_results refuses a repeated idx
    if count is None:
        report.notes.append(f"{path}: row set not checked: the dataset's size is unknown "
                            "(labels not read) and the sidecar's protocol gives no count")
        return
    where = f"idx 0..{(count - 1) * skip} step {skip}"
    present = set(idx)
    outside = sorted(i for i in present if i % skip or i >= count * skip)
    if outside:
        report.problems.append(f"{path}: idx {_ranges(outside, 1)} not in the protocol "
                               f"({where}, {count} examples)")
    if part_of is not None:
        report.notes.append(f"{path}: a torchrun part file holds one process's rows: the row "
                            f"set is checked on {part_of} once the same certify command "
                            "merged the parts")
        report.checked.append(f"indices within the protocol ({where})")
        return
    missing = [i for i in range(0, count * skip, skip) if i not in present]
    last = max(present, default=-1)
    parts = sorted(p.name for p in path.parent.iterdir()
                   if re.fullmatch(re.escape(path.name) + r"\.part\d+", p.name))
    deleted = [] if parts else [i for i in missing if i < last]
    unfinished = missing if parts else [i for i in missing if i > last]
    if deleted:
        report.problems.append(
            f"{path}: rows missing: {_ranges(deleted, skip)} ({len(deleted)} rows) while later "
            "rows are present: rows were deleted; run the same certify command to recompute them")
    if unfinished:
        held = f" (torchrun part files beside it: {', '.join(parts)})" * bool(parts)
        report.notes.append(
            f"{path}: rows missing: {_ranges(unfinished, skip)} ({len(unfinished)} rows): an "
            f"unfinished run{held}; run the same certify command to resume")
    report.checked.append(f"row set complete ({where})" if not missing else
                          f"row set: {count - len(missing)} of {count} rows ({where})")


def _label_problem(label: int, i: int, labels: np.ndarray | None, source: str) -> list[str]:
    if labels is None or i >= len(labels) or labels[i] == label:
        return []
    return [f"label {label}, but {source} labels example {i} as {int(labels[i])}"]


def _dataset_labels(path: Path, meta: Mapping[str, Any], data_dir: str | os.PathLike | None,
                    report: Verification) -> tuple[np.ndarray | None, str]:
    """The labels of the sidecar's dataset split, or None with a note saying why not."""
    try:
        labels, source = split_labels(meta["dataset"], meta["split"], data_dir)
    except LabelsUnavailable as err:
        report.notes.append(f"{path}: labels not checked: {err}")
        return None, ""
    report.checked.append(f"labels checked against {source}")
    return labels, source


def check_file(path: str | os.PathLike,
               data_dir: str | os.PathLike | None = None) -> Verification:
    """Verify a result file: recompute every certificate from its counts and sidecar (a radii
    file's rows as `_radii_row_problems` says), check its row set against the protocol and
    each row's label against the dataset (read from `data_dir`; MNIST's shipped copy without).

    A torchrun part file `<out>.part<rank>` is checked with out's sidecar.
    """
    path = Path(path)
    table = read_results(path, kind="certify")
    part_of = _part_of(path)
    meta = _checked_sidecar(path, table, part_of or path)
    run = fingerprint(meta)
    report = Verification(len(table.lines))
    if meta.get("run") != run:
        report.problems.append(f"{sidecar_path(part_of or path)}: records run "
                               f"{meta.get('run')}, but its settings give {run} (edited?)")
    procedure = radii_procedure(meta) if table.kind == "radii" else None
    if procedure is not None and list(procedure.radii) != header_radii(table.header):
        report.problems.append(f"{path}: the header's radii are not the sidecar's "
                               f"{meta['radii']}")
        procedure = None
    labels, source = _dataset_labels(path, meta, data_dir, report)
    _check_row_set(path, table.values["idx"], meta, None if labels is None else len(labels),
                   part_of, report)
    for i, lineno in enumerate(table.line_numbers):
        idx = table.values["idx"][i]
        found = (_row_problems(table, i, meta, run) if table.kind != "radii" else
                 ["not checked: the radii do not match"] if procedure is None else
                 _radii_row_problems(table, i, meta, run, procedure))
        found += _label_problem(table.values["label"][i], idx, labels, source)
        if found:
            report.problems.append(f"{path}, line {lineno} (idx {idx}): " + "; ".join(found))
    return report


def verify(path: str | os.PathLike,
           data_dir: str | os.PathLike | None = None) -> tuple[int, list[str]]:
    """`check_file`'s rows recomputed and problems (its notes left out)."""
    report = check_file(path, data_dir)
    return report.rows, report.problems
