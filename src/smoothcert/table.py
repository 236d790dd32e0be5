"""Result tables: the writer (`RowWriter`, `write_table`) and the reader (`read_results`) of
smoothcert's files and of Cohen et al.'s certify.py and its forks, through `schema`'s columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import sequential
from .io import atomic_write_text, named_write_errors
from .protocols import Protocol, protocol_for_file
from .schema import (
    COHEN_COLUMNS,
    OWN_HEADERS,
    PREDICT_COLUMNS,
    PREFIXES,
    column,
    header_radii,
    radii_columns,
)
from .sidecar import Sidecar, read_json

_REQUIRED = ("idx", "label", "predict", "radius", "correct")


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
        return self.kind == "certify" or self.native or (
            self.sidecar is not None and self.sidecar.is_own)

    @property
    def rounded(self) -> bool:
        """Whether the radii were printed rounded (Cohen's "{:.3}"), not at full precision."""
        if self.kind != "certify" or "run" in self.header:
            return False  # radii files write full precision, as native certify files
        texts = [t for t in self.radius_texts if float(t) > 0]
        return bool(texts) and all(_significant_digits(t) <= 3 for t in texts)

    @property
    def sidecar(self) -> Sidecar | None:
        return None if self.meta is None else Sidecar.from_json(self.meta)

    @property
    def protocol(self) -> Protocol:
        """The protocol its rows follow: its header's, refined by its sidecar's."""
        return protocol_for_file(self.kind, self.sidecar)

    @property
    def methods(self) -> list[str]:
        return [self.main, *self.groups]

    @property
    def label(self) -> str:
        if self.sidecar is not None and self.sidecar.label:
            return self.sidecar.label
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



def _check_case(path: Path, header: list[str]) -> None:
    """Refuse a header that names a required column in other case ('Radius')."""
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in header {header}")
    for wanted in (*_REQUIRED, "time"):
        near = [c for c in header if c != wanted and c.lower() == wanted]
        if near and wanted not in header:
            raise ValueError(
                f"{path}: column '{near[0]}' should be '{wanted}' (column names are "
                f"case-sensitive; expected {' '.join(COHEN_COLUMNS)} ...)"
            )


def _groups(path: Path, header: list[str]) -> list[str]:
    """The further methods whose column groups a certify header holds, in column order."""
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
    return groups


def _classify(path: Path, header: list[str]) -> tuple[str, str, list[str]]:
    """(kind, main method, further methods) that a header describes, or a clear error."""
    _check_case(path, header)
    missing = [c for c in _REQUIRED if c not in header]
    if missing and missing != ["radius"]:
        raise ValueError(
            f"{path}: not a result file: header lacks {', '.join(missing)} (expected at "
            f"least {' '.join(_REQUIRED)}; got {' '.join(header)})"
        )
    if not missing and "samples_used" in header:
        return "radii", "", []  # the method: in the rows' method column
    groups = _groups(path, header)
    if missing:
        return "predict", "predict", []
    # T-CERTIFY's strict mode follows T-CERTIFY in the main columns (--method tcertify).
    return "certify", "tcertify" if groups == ["tcertify-strict"] else "certify", groups


def _check_kind(path: Path, found: str, kind: str | None) -> None:
    if kind == "certify" and found == "predict":
        raise ValueError(
            f"{path}: this is a PREDICT result (no 'radius' column); certified accuracy needs "
            f"CERTIFY/T-CERTIFY results ({' '.join(COHEN_COLUMNS)} ...)"
        )
    if kind == "predict" and found != "predict":
        raise ValueError(f"{path}: this is a CERTIFY result, expected a PREDICT result "
                         f"({' '.join(PREDICT_COLUMNS)})")


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
    _check_kind(path, found, kind)
    result = ResultFile(path, header, found, main, groups, meta=read_json(path))
    if found == "radii" and (result.meta or {}).get("method") in sequential.SEQUENTIAL_METHODS:
        result.main = result.meta["method"]
    body = lines[1:]
    if body[-1] == "":
        body = body[:-1]  # the newline that ends the last row
    elif allow_cut:
        body, result.cut = body[:-1], True
    _Rows(result).read(body)
    return result


class _Rows:
    """Reads a file's rows into its ResultFile, each field through its column's parser."""

    def __init__(self, result: ResultFile):
        self.result = result
        self.parsers = {name: c.parse for name in result.header
                        if (c := column(name, result.kind)) is not None}
        result.values = {name: [] for name in self.parsers}
        self.first_line: dict[int, int] = {}

    def read(self, body: Sequence[str]) -> None:
        for lineno, line in enumerate(body, start=2):
            if line.strip():
                self._row(lineno, line)

    def _row(self, lineno: int, line: str) -> None:
        result, where = self.result, f"{self.result.path}, line {lineno}"
        fields = line.split("\t")
        if len(fields) != len(result.header):
            raise ValueError(f"{where}: {len(fields)} fields, but the header has "
                             f"{len(result.header)}")
        for name, text in zip(result.header, fields, strict=True):
            if name in self.parsers:
                result.values[name].append(self._parse(where, name, text.strip()))
        idx = result.values["idx"][-1]
        if idx in self.first_line:
            raise ValueError(f"{where}: duplicate idx {idx} (first on line "
                             f"{self.first_line[idx]})")
        self.first_line[idx] = lineno
        if result.kind == "certify":
            result.radius_texts.append(fields[result.header.index("radius")].strip())
        self._check_method(where)
        result.lines.append(line)
        result.line_numbers.append(lineno)

    def _parse(self, where: str, name: str, text: str) -> object:
        try:
            return self.parsers[name](text)
        except ValueError as err:
            why = str(err) if str(err).startswith("must") else "is not valid"
            raise ValueError(f"{where}: column '{name}' {why}: {text!r}") from None

    def _check_method(self, where: str) -> None:
        result = self.result
        if "method" not in result.header:
            return
        method = result.values["method"][-1]
        if result.kind == "radii" and not result.main:
            result.main = method
        if method != result.main:
            raise ValueError(f"{where}: column 'method' is {method!r}, but the columns hold "
                             f"{result.main}")
