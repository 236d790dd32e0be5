"""The result-file format, one import: the facade over the modules it is made of.

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
fingerprint.

Where each idea lives: `schema` (the columns: names, formatters, parsers), `sidecar` (the
typed `Sidecar`, its fingerprint), `protocols` (fixed n, adaptive n, radii, predict: columns,
rows, sidecar settings, row checks), `table` (writer and reader), `verify`. numpy, `stats`
and `sequential` only: reading results never needs torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import sidecar as _sidecar
from .protocols import (
    METHOD_LABELS,
    PROTOCOLS,
    SEQUENTIAL_LABELS,
    Protocol,
    protocol_for_file,
    protocol_of,
    register,
)
from .recompute import radii_procedure
from .schema import (
    BOUND_COLUMNS,
    COHEN_COLUMNS,
    COUNT_COLUMNS,
    GROUP_FIELDS,
    ID_COLUMNS,
    LAYOUTS,
    OWN_HEADERS,
    PREDICT_COLUMNS,
    PREFIXES,
    RADII_COLUMNS,
    columns,
    header_radii,
    parse_counts,
    parse_time,
    radii_columns,
    radius_name,
    time_text,
)
from .sidecar import (
    FORMAT,
    IDENTITY_KEYS,
    SAMPLING_KEYS,
    Sidecar,
    file_sha256,
    sidecar_path,
)
from .table import ResultFile, RowWriter, read_results, write_table
from .verify import Verification, check_file, paper_mode_level, verify

__all__ = [
    "BOUND_COLUMNS", "COHEN_COLUMNS", "COUNT_COLUMNS", "FORMAT", "GROUP_FIELDS", "ID_COLUMNS",
    "IDENTITY_KEYS", "LAYOUTS", "METHOD_LABELS", "OWN_HEADERS", "PREDICT_COLUMNS", "PREFIXES",
    "PROTOCOLS", "RADII_COLUMNS", "SAMPLING_KEYS", "SEQUENTIAL_LABELS", "Protocol",
    "ResultFile", "RowWriter", "Sidecar", "Verification", "certify_row", "check_file",
    "columns", "file_sha256", "fingerprint", "header_radii", "identity", "is_own_sidecar",
    "paper_mode_level", "parse_counts", "parse_time", "predict_row", "protocol_for_file",
    "protocol_of", "radii_columns", "radii_procedure", "radii_row", "radius_name",
    "read_results", "read_sidecar", "register", "sidecar_path", "time_text", "verify",
    "write_sidecar", "write_table",
]


# ---------------------------------------------------------------- sidecars as dicts


def identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run is identified by (`Sidecar.identity`) of a sidecar's dict."""
    return Sidecar.from_json(settings).identity()


def fingerprint(settings: Mapping[str, Any]) -> str:
    """The `run` column of a sidecar's dict (`Sidecar.fingerprint`)."""
    return Sidecar.from_json(settings).fingerprint()


def read_sidecar(path) -> dict | None:
    """The sidecar of result file `path` as a dict, None when there is none."""
    return _sidecar.read_json(path)


def write_sidecar(path, meta: Mapping[str, Any] | Sidecar) -> None:
    sidecar = meta if isinstance(meta, Sidecar) else Sidecar.from_json(meta)
    _sidecar.write(path, sidecar)


def is_own_sidecar(meta: Mapping[str, Any]) -> bool:
    """Whether a sidecar's content was written by smoothcert (this version or an earlier one)."""
    return Sidecar.from_json(meta).is_own


# ---------------------------------------------------------------- rows, by protocol


def _layout_sidecar(layout: str, run: str, method: str | None = None) -> Sidecar:
    return Sidecar(layout=layout, method=method, run=run)


def certify_row(idx: int, label: int, seconds: float, certificates: Mapping[str, Any],
                selection, estimation, layout: str, run: str) -> list[str]:
    """The fields of one certify row; `certificates` maps each method of `layout` to its own."""
    result = _AllCertificates(certificates, selection, estimation)
    return PROTOCOLS["fixed-n"].row(idx, label, seconds, result,
                                    _layout_sidecar(layout, run))[0]


def radii_row(idx: int, label: int, seconds: float, cert, method: str, run: str) -> list[str]:
    """The fields of one radii row (columns `radii_columns(cert.radii)`)."""
    sidecar = Sidecar(layout="radii", method=method, run=run, radii=list(cert.radii))
    return PROTOCOLS["radii"].row(idx, label, seconds, cert, sidecar)[0]


def predict_row(idx: int, label: int, prediction: int, seconds: float, run: str) -> list[str]:
    return PROTOCOLS["predict"].row(idx, label, seconds, prediction,
                                    _layout_sidecar("both", run))[0]


class _AllCertificates:
    """`Smooth.certify_all`'s result made of a method -> certificate mapping."""

    def __init__(self, certificates: Mapping[str, Any], selection, estimation):
        self.certify = certificates.get("certify")
        self.tcertify = certificates.get("tcertify")
        self.strict = certificates.get("tcertify-strict")
        self.selection_counts, self.estimation_counts = selection, estimation
