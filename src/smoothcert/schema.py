"""The columns of a result file: one table of (name, formatter, parser) for writer and reader.

A row is built as a dict of values by column name; `format_row` writes it through the table
and `column` gives the reader each column's parser, so a column is described once. The
headers of each layout are here too; which protocol writes which header is `protocols`'s.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import ABSTAIN

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
RADII_COLUMNS = (*COHEN_COLUMNS, *ID_COLUMNS, "n0", "n", "count_a", "samples_used",
                 "selection_counts", "estimation_counts", "certifying_counts")
_RUN = re.compile(r"^[0-9a-f]{12}$")
_TIME = re.compile(r"^(?:(\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)$")
_LEGACY_GROUP = ("predict", "radius", "correct", "alpha", "pa_lower", "pb_upper")
_LEGACY_COUNTS = ("n0", "n", "count_a", "count_b", "counts")


# ---------------------------------------------------------------- headers


def columns(mode: str, layout: str = "both") -> list[str]:
    """The header of a result file of `mode` (certify/predict) and certify `layout`."""
    if mode == "predict":
        return [*PREDICT_COLUMNS, *ID_COLUMNS]
    _, groups = LAYOUTS[layout]
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


def legacy_columns(layout: str) -> list[str]:
    """The header smoothcert wrote before the method/run columns (read-only today)."""
    _, groups = LAYOUTS[layout]
    extra = [f"{PREFIXES[g]}_{f}" for g in groups for f in _LEGACY_GROUP]
    return [*COHEN_COLUMNS, *extra, *_LEGACY_COUNTS]


OWN_HEADERS = {tuple(columns("predict")), PREDICT_COLUMNS} | {
    tuple(header) for layout in LAYOUTS
    for header in (columns("certify", layout), legacy_columns(layout))
}


# ---------------------------------------------------------------- values <-> text


def time_text(seconds: float) -> str:
    """Seconds as Cohen's time column writes them: str(datetime.timedelta)."""
    return str(datetime.timedelta(seconds=seconds))


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


def sparse(counts: Sequence[int] | np.ndarray) -> str:
    """Per-class counts as `class:count` pairs of the nonzero classes."""
    counts = np.asarray(counts)
    return ",".join(f"{c}:{int(counts[c])}" for c in np.flatnonzero(counts))


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


def _sparse_or_dash(counts: Sequence[int] | np.ndarray) -> str:
    """Per-class counts as `class:count` pairs; "-" when there are none (no sample drawn)."""
    return sparse(counts) if np.sum(counts) > 0 else "-"


def _counts_or_none(text: str) -> dict[int, int]:
    return {} if text == "-" else parse_counts(text)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        _check(value >= low, f"must be an integer >= {low}")
        return value
    return parse


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


def _integer(value: Any) -> str:
    return str(int(value))


def _double(value: Any) -> str:
    return repr(float(value))  # shortest text that reads back as the same double


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Column:
    """How one column's value is written and read back (the parser checks its range)."""

    format: Callable[[Any], str]
    parse: Callable[[str], Any]


INDEX = Column(_integer, _at_least(0))
COUNT = Column(_integer, _at_least(1))
FLAG = Column(_integer, _correct)
UNIT = Column(_double, _unit)
COUNTS = Column(sparse, parse_counts)
CERTIFY_SCHEMA: dict[str, Column] = {
    "idx": INDEX, "label": INDEX, "predict": Column(_integer, _at_least(ABSTAIN)),
    "radius": Column(_double, _radius), "correct": FLAG, "time": Column(time_text, parse_time),
    "method": Column(str, str), "run": Column(str, _run),
    "alpha_prime": UNIT, "alpha": UNIT, "pa_lower": UNIT, "pb_upper": UNIT,
    "n0": COUNT, "n": COUNT, "count_a": INDEX, "count_b": INDEX, "counts": COUNTS,
    "selection_counts": COUNTS, "estimation_counts": COUNTS,
}
# A radii row's n may be 0 (every radius out of reach) and its later counts "-" (none).
RADII_SCHEMA: dict[str, Column] = {
    **CERTIFY_SCHEMA, "n": INDEX, "samples_used": COUNT,
    "estimation_counts": Column(_sparse_or_dash, _counts_or_none),
    "certifying_counts": Column(_sparse_or_dash, _counts_or_none),
}
# Columns named after a radius: (name prefix, column).
RADII_FAMILIES = {"certified_": FLAG, "decided_": INDEX}


def column(name: str, kind: str = "certify") -> Column | None:
    """The column `name` of a file of `kind` (certify, radii or predict); None: unknown."""
    if kind == "radii":
        family = next((c for p, c in RADII_FAMILIES.items() if name.startswith(p)), None)
        if family is not None or name in RADII_SCHEMA:
            return family or RADII_SCHEMA[name]
    prefix, _, rest = name.partition("_")
    return CERTIFY_SCHEMA.get(rest if rest and prefix in PREFIXES.values() else name)


def format_row(header: Sequence[str], kind: str, values: Mapping[str, Any]) -> list[str]:
    """The fields of a row holding `values` (by column name) under `header`."""
    return [column(name, kind).format(values[name]) for name in header]
