"""A result row's columns recomputed from its counts and its sidecar: what `verify` compares.

The values a certificate puts in a row (`certificate_values`, `count_values`) are computed
here for the writer and the checker alike; `protocols` says which check a file's rows get.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import sequential
from .schema import PREFIXES, radius_name
from .sidecar import Sidecar
from .stats import ABSTAIN, certify_from_counts


def dense(counts: Mapping[int, int], num_classes: int) -> np.ndarray:
    result = np.zeros(num_classes, dtype=np.int64)
    for cls, count in counts.items():
        if cls >= num_classes:
            raise ValueError(f"class {cls} outside the {num_classes} classes")
        result[cls] = count
    return result


def close(a: float, b: float) -> bool:
    # Certificates are recomputed by the same code; the tolerance only absorbs another
    # scipy's last-bit differences, far below any edit that would matter.
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def mismatches(value: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [f"{name} {value[name]!r}, recomputed {want!r}" for name, want in expected.items()
            if not close(value[name], want)]


def run_problem(value: Mapping[str, Any], run: str) -> list[str]:
    """A problem if a row's run column is not the sidecar's run."""
    problems = [] if value["run"] == run else [
        f"run {value['run']}, but the sidecar's settings give {run}"]
    return problems


def certificate_values(prefix: str, cert: Any, label: int) -> dict[str, Any]:
    return {prefix + "predict": cert.label, prefix + "radius": cert.radius,
            prefix + "correct": cert.label == label, prefix + "alpha_prime": cert.alpha_prime,
            prefix + "pa_lower": cert.pa_lower, prefix + "pb_upper": cert.pb_upper}


def count_values(selection: np.ndarray, estimation: np.ndarray) -> dict[str, Any]:
    selection, estimation = np.asarray(selection), np.asarray(estimation)
    top = int(np.argmax(selection))
    return {"n0": selection.sum(), "n": estimation.sum(), "count_a": estimation[top],
            "count_b": np.delete(estimation, top).max(), "selection_counts": selection,
            "estimation_counts": estimation}


def recomputed(value: Mapping[str, Any], method: str, main: str, selection: np.ndarray,
                estimation: np.ndarray, sidecar: Sidecar) -> list[str]:
    """What in one method's columns is not the certificate recomputed from the counts."""
    prefix = "" if method == main else PREFIXES[method] + "_"
    try:
        cert = certify_from_counts(selection, estimation, sidecar.sigma, sidecar.alpha, method,
                                   sidecar.grid)
    except ValueError as err:
        return [f"{method}: cannot be recomputed ({err})"]
    expected = certificate_values(prefix, cert, value["label"])
    expected[prefix + "correct"] = int(expected[prefix + "correct"])
    return mismatches(value, expected)


def radii_procedure(sidecar: Sidecar) -> sequential.RadiiProcedure:
    """A fresh sequential procedure with a radii file's settings (its sidecar)."""
    return sequential.RadiiProcedure(
        sidecar.radii, sidecar.sigma, sidecar.alpha, sidecar.max_n, method=sidecar.method,
        num_classes=sidecar.num_classes, confidence_sequence=sidecar.confidence_sequence,
        batch_size=sidecar.batch,
        final_share=0.0 if sidecar.final_share is None else sidecar.final_share,  # older files
        precision=sidecar.precision, futility=sidecar.futility)


def radii_row_problems(value: Mapping[str, Any], sidecar: Sidecar, run: str,
                       procedure: sequential.RadiiProcedure) -> list[str]:
    """What in a radii row does not follow from its counts: the certificate of its largest
    certified radius is recomputed at the look that certified it, the final look's counts must
    certify nothing more, and the columns must agree with the counts and with each other."""
    problems = run_problem(value, run)
    try:
        selection, estimation, certifying = (
            dense(value[name], sidecar.num_classes)
            for name in ("selection_counts", "estimation_counts", "certifying_counts"))
    except ValueError as err:
        return [*problems, f"counts: {err}"]
    names = [radius_name(r) for r in procedure.radii]
    certified = np.array([value[f"certified_{r}"] for r in names], dtype=bool)
    label = int(np.argmax(selection))
    problems += _radii_column_problems(value, procedure, selection, estimation, certified)
    if not certified.any():
        if certifying.sum():
            problems.append("certifying_counts given, but no radius is certified")
        return problems
    top = int(np.flatnonzero(certified).max())
    looks = {0, *procedure.cs.looks.tolist()}
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


def _radii_column_problems(value: Mapping[str, Any], procedure: sequential.RadiiProcedure,
                           selection: np.ndarray, estimation: np.ndarray,
                           certified: np.ndarray) -> list[str]:
    """The columns that follow from the counts and the certified radii alone."""
    label = int(np.argmax(selection))
    predict = label if certified.any() else ABSTAIN
    problems = mismatches(value, {
        "predict": predict, "correct": int(predict == value["label"]),
        "radius": float(procedure.radii[certified].max()) if certified.any() else 0.0,
        "n0": int(selection.sum()), "n": int(estimation.sum()),
        "count_a": int(estimation[label]),
        "samples_used": int(selection.sum() + estimation.sum())})
    if certified.any() and not certified[: int(np.flatnonzero(certified).max()) + 1].all():
        problems.append("certified radii are not a prefix of the radii")
    if estimation.sum() not in {0, *procedure.cs.looks.tolist()}:
        problems.append(f"n {int(estimation.sum())} is not a look of the schedule")
    return problems
