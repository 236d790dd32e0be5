"""Certification protocols: what a run samples, which columns and sidecar settings its file
has, how a row is built and how `verify` rechecks it. One class per protocol; `register`
adds one, and `protocol_of` finds the one of a run's settings or of a sidecar.

The runner, the reader, `verify` and `analyze` ask the protocol instead of branching on the
mode or the sampling. No torch here: `sample` only calls the smoothed classifier it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from . import schema, sequential
from .schema import LAYOUTS, PREFIXES, format_row, header_radii, radius_name
from .sidecar import Sidecar
from .stats import ABSTAIN, certify_from_counts, check_positive_int

# How tables and plots name each method; T-CERTIFY's two modes carry different guarantees.
METHOD_LABELS = {
    "certify": "CERTIFY",
    "tcertify": "T-CERTIFY (paper mode)",
    "tcertify-strict": "T-CERTIFY (strict)",
}
# How tables name the method of a sequential (radii) file: T-CERTIFY's holds at alpha exactly.
SEQUENTIAL_LABELS = {"certify": "CERTIFY, sequential", "tcertify": "T-CERTIFY, sequential"}
RowCheck = Callable[[Mapping[str, Any]], list[str]]  # a row's values -> what does not match


class Unverifiable(ValueError):
    """A file whose rows cannot be checked: the file's problem, and what each row says."""

    def __init__(self, problem: str, row_note: str):
        super().__init__(problem)
        self.row_note = row_note


class Protocol:
    """A kind of certify/predict run; subclasses fill in what differs."""

    name: ClassVar[str]  # the registry's key
    kind: ClassVar[str] = "certify"  # the file's columns: certify, radii or predict
    mode: ClassVar[str] = "certify"  # RunConfig.mode
    sampling: ClassVar[str | None] = None  # the sidecar's sampling (None: n fixed)
    words: ClassVar[str] = "certify (radius per input)"  # what its rows hold
    needs: ClassVar[tuple[str, ...]] = ()  # sidecar settings verify needs beyond the identity

    # ------------------------------------------------------------ a run

    def configure(self, cfg: Any) -> None:
        """Defaults and checks of this protocol's options, before the common ones."""

    def check(self, cfg: Any) -> None:
        """Checks of this protocol's options that need the common ones checked first."""

    def settings(self, cfg: Any, sigma: float, num_classes: int) -> dict[str, Any]:
        """This protocol's part of the sidecar (Sidecar fields)."""
        return {"method": LAYOUTS[cfg.method][0], "layout": cfg.method}

    def header(self, sidecar: Sidecar) -> list[str]:
        return schema.columns(self.mode, sidecar.layout)

    def sample(self, smooth: Any, x: Any, cfg: Any, sidecar: Sidecar,
               streams: Mapping[str, Any]) -> Any:
        """Sample the smoothed classifier at x as this protocol does (seeded by `streams`)."""
        raise NotImplementedError

    def row(self, idx: int, label: int, seconds: float, result: Any,
            sidecar: Sidecar) -> tuple[list[str], bool]:
        """The fields of a row, and whether its main method is right."""
        raise NotImplementedError

    # ------------------------------------------------------------ a file

    def curve_label(self, method: str) -> str:
        return METHOD_LABELS[method]

    def row_check(self, sidecar: Sidecar, header: Sequence[str],
                  methods: Sequence[str]) -> RowCheck:
        """What checks a row of this file (Unverifiable: none can be checked)."""
        raise Unverifiable(f"{self.words} rows hold no certificate", "not checked")


PROTOCOLS: dict[str, Protocol] = {}


def register(cls: type[Protocol]) -> type[Protocol]:
    """Add a protocol; its (mode, sampling) must be new."""
    taken = [p.name for p in PROTOCOLS.values() if (p.mode, p.sampling) == (cls.mode, cls.sampling)]
    if taken or cls.name in PROTOCOLS:
        raise ValueError(f"protocol {cls.name!r}: mode {cls.mode} with sampling {cls.sampling} "
                         f"is taken ({', '.join(taken) or cls.name})")
    PROTOCOLS[cls.name] = cls()
    return cls


def protocol_of(settings: Any) -> Protocol:
    """The protocol of a run's settings (RunConfig) or of a sidecar, by mode and sampling."""
    sampling = None if settings.sampling == "fixed" else settings.sampling
    mode = settings.mode or "certify"
    for protocol in PROTOCOLS.values():
        if (protocol.mode, protocol.sampling) == (mode, sampling):
            return protocol
    raise ValueError(f"no protocol of mode {mode!r} with sampling {sampling!r}")


def protocol_for_file(kind: str, sidecar: Sidecar | None) -> Protocol:
    """The protocol of a file whose header is of `kind`: its sidecar's, where it agrees."""
    if sidecar is not None:
        try:
            protocol = protocol_of(sidecar)
        except ValueError:
            protocol = None
        if protocol is not None and protocol.kind == kind:
            return protocol
    return next(p for p in PROTOCOLS.values() if p.kind == kind)  # the first registered


# ---------------------------------------------------------------- verify's helpers


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


def _run_problem(value: Mapping[str, Any], run: str) -> list[str]:
    """A problem if a row's run column is not the sidecar's run."""
    problems = [] if value["run"] == run else [
        f"run {value['run']}, but the sidecar's settings give {run}"]
    return problems


# ---------------------------------------------------------------- the protocols


def _certificate_values(prefix: str, cert: Any, label: int) -> dict[str, Any]:
    return {prefix + "predict": cert.label, prefix + "radius": cert.radius,
            prefix + "correct": cert.label == label, prefix + "alpha_prime": cert.alpha_prime,
            prefix + "pa_lower": cert.pa_lower, prefix + "pb_upper": cert.pb_upper}


@register
class FixedN(Protocol):
    """CERTIFY / T-CERTIFY with n estimation samples per input (Cohen's protocol)."""

    name = "fixed-n"

    def sample(self, smooth: Any, x: Any, cfg: Any, sidecar: Sidecar,
               streams: Mapping[str, Any]) -> Any:
        return smooth.certify_all(
            x, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, batch_size=cfg.batch, grid=cfg.grid,
            generator=streams["selection"], estimation_generator=streams["estimation"])

    def row(self, idx: int, label: int, seconds: float, result: Any,
            sidecar: Sidecar) -> tuple[list[str], bool]:
        main, groups = LAYOUTS[sidecar.layout]
        certificates = {"certify": result.certify, "tcertify": result.tcertify,
                        "tcertify-strict": result.strict}
        values = {"idx": idx, "label": label, "time": seconds, "method": main,
                  "run": sidecar.run, **_certificate_values("", certificates[main], label),
                  **_count_values(result.selection_counts, result.estimation_counts)}
        for method in groups:
            values.update(_certificate_values(PREFIXES[method] + "_", certificates[method],
                                              label))
        row = format_row(self.header(sidecar), self.kind, values)
        return row, certificates[main].label == label

    def row_check(self, sidecar: Sidecar, header: Sequence[str],
                  methods: Sequence[str]) -> RowCheck:
        run = sidecar.fingerprint()
        return lambda value: self._problems(value, sidecar, run, methods)

    def _problems(self, value: Mapping[str, Any], sidecar: Sidecar, run: str,
                  methods: Sequence[str]) -> list[str]:
        problems = _run_problem(value, run)
        try:
            selection = dense(value["selection_counts"], sidecar.num_classes)
            estimation = dense(value["estimation_counts"], sidecar.num_classes)
        except ValueError as err:
            return [*problems, f"counts: {err}"]
        written = _count_values(selection, estimation)
        problems += [f"{name} {value[name]}, the counts give {int(written[name])}"
                     for name in ("n0", "n", "count_a", "count_b")
                     if value[name] != int(written[name])]
        problems += self._n_problems(selection, estimation, sidecar)
        for method in methods:
            problems += _recomputed(value, method, methods[0], selection, estimation, sidecar)
        return problems

    def _n_problems(self, selection: np.ndarray, estimation: np.ndarray,
                    sidecar: Sidecar) -> list[str]:
        """Whether the row's n is the protocol's (fixed n: the count columns say it)."""
        return []


def _count_values(selection: np.ndarray, estimation: np.ndarray) -> dict[str, Any]:
    selection, estimation = np.asarray(selection), np.asarray(estimation)
    top = int(np.argmax(selection))
    return {"n0": selection.sum(), "n": estimation.sum(), "count_a": estimation[top],
            "count_b": np.delete(estimation, top).max(), "selection_counts": selection,
            "estimation_counts": estimation}


def _recomputed(value: Mapping[str, Any], method: str, main: str, selection: np.ndarray,
                estimation: np.ndarray, sidecar: Sidecar) -> list[str]:
    """What in one method's columns is not the certificate recomputed from the counts."""
    prefix = "" if method == main else PREFIXES[method] + "_"
    try:
        cert = certify_from_counts(selection, estimation, sidecar.sigma, sidecar.alpha, method,
                                   sidecar.grid)
    except ValueError as err:
        return [f"{method}: cannot be recomputed ({err})"]
    expected = _certificate_values(prefix, cert, value["label"])
    expected[prefix + "correct"] = int(expected[prefix + "correct"])
    return mismatches(value, expected)


@register
class AdaptiveN(FixedN):
    """Fixed-n's rows, with each input's n chosen from its selection counts (up to max_n)."""

    name = "adaptive-n"
    sampling = "adaptive"

    def configure(self, cfg: Any) -> None:
        if cfg.radii is not None or cfg.confidence_sequence is not None:
            raise ValueError("adaptive_n certifies the radius of each input: radii and "
                             "confidence_sequence apply to sequential certification only")

    def check(self, cfg: Any) -> None:
        cfg.tolerance = sequential.check_tolerance(
            0.02 if cfg.tolerance is None else cfg.tolerance)
        _check_max_n(cfg)

    def settings(self, cfg: Any, sigma: float, num_classes: int) -> dict[str, Any]:
        return {**super().settings(cfg, sigma, num_classes), "sampling": self.sampling,
                "max_n": cfg.max_n, "n": None, "tolerance": cfg.tolerance}

    def sample(self, smooth: Any, x: Any, cfg: Any, sidecar: Sidecar,
               streams: Mapping[str, Any]) -> Any:
        return smooth.certify_adaptive(
            x, n0=cfg.n0, max_n=cfg.max_n, alpha=cfg.alpha, batch_size=cfg.batch,
            tolerance=cfg.tolerance, grid=cfg.grid, generator=streams["selection"],
            estimation_generator=streams["estimation"])

    def curve_label(self, method: str) -> str:
        return METHOD_LABELS[method] + ", adaptive n"

    def _n_problems(self, selection: np.ndarray, estimation: np.ndarray,
                    sidecar: Sidecar) -> list[str]:
        # n must follow from the selection counts alone
        chosen = sequential.choose_n(selection, sidecar.max_n, sidecar.sigma, sidecar.alpha,
                                     sidecar.tolerance)
        if estimation.sum() != chosen:
            return [f"n {int(estimation.sum())}, but the selection counts choose {chosen}"]
        return []


def _check_max_n(cfg: Any) -> None:
    cfg.max_n = check_positive_int(cfg.n if cfg.max_n is None else cfg.max_n, "max_n")


@register
class Radii(Protocol):
    """Sequential certification at given radii (sequential.RadiiProcedure), up to max_n."""

    name = "radii"
    kind = "radii"
    sampling = "sequential"
    words = "certify at given radii (sequential)"
    needs = ("radii", "max_n", "confidence_sequence", "batch")

    def configure(self, cfg: Any) -> None:
        cfg.method = cfg.method or "certify"
        if cfg.method not in sequential.SEQUENTIAL_METHODS:
            raise ValueError(f"method must be one of {', '.join(sequential.SEQUENTIAL_METHODS)}"
                             f" for sequential certification at radii, got {cfg.method!r}")
        cfg.confidence_sequence = cfg.confidence_sequence or "mixture"
        if cfg.confidence_sequence not in sequential.CONFIDENCE_SEQUENCES:
            raise ValueError(f"confidence_sequence must be one of "
                             f"{', '.join(sequential.CONFIDENCE_SEQUENCES)}, got "
                             f"{cfg.confidence_sequence!r}")
        if cfg.radii is not None:
            cfg.radii = tuple(float(r) for r in sequential.check_radii(cfg.radii))

    def check(self, cfg: Any) -> None:
        _check_max_n(cfg)
        if cfg.batch > cfg.max_n:
            raise ValueError(f"max_n must be >= batch ({cfg.batch}), got {cfg.max_n}")

    def settings(self, cfg: Any, sigma: float, num_classes: int) -> dict[str, Any]:
        radii = cfg.radii or tuple(float(r) for r in sequential.reachable_radii(
            sequential.TABLE1_RADII, sigma, cfg.alpha, cfg.max_n, method=cfg.method,
            num_classes=num_classes, confidence_sequence=cfg.confidence_sequence,
            batch_size=cfg.batch))
        return {"method": cfg.method, "layout": "radii", "grid": None, "n": None,
                "sampling": self.sampling, "max_n": cfg.max_n, "radii": list(radii),
                "batch": cfg.batch, "confidence_sequence": cfg.confidence_sequence}

    def header(self, sidecar: Sidecar) -> list[str]:
        return schema.radii_columns(sidecar.radii)

    def sample(self, smooth: Any, x: Any, cfg: Any, sidecar: Sidecar,
               streams: Mapping[str, Any]) -> Any:
        return smooth.certify_radii(
            x, radii=sidecar.radii, alpha=cfg.alpha, max_n=cfg.max_n, batch_size=cfg.batch,
            n0=cfg.n0, method=cfg.method, confidence_sequence=cfg.confidence_sequence,
            generator=streams["selection"], estimation_generator=streams["estimation"])

    def row(self, idx: int, label: int, seconds: float, result: Any,
            sidecar: Sidecar) -> tuple[list[str], bool]:
        cert = result
        certified = [r for r, c in zip(cert.radii, cert.certified, strict=True) if c]
        names = [radius_name(r) for r in cert.radii]
        values = {
            "idx": idx, "label": label, "predict": cert.label,
            "radius": max(certified, default=0.0), "correct": cert.label == label,
            "time": seconds, "method": sidecar.method, "run": sidecar.run,
            "n0": sum(cert.selection_counts), "n": cert.n, "count_a": cert.count_a,
            "samples_used": cert.samples_used, "selection_counts": cert.selection_counts,
            "estimation_counts": cert.estimation_counts,
            "certifying_counts": cert.certifying_counts,
            **{f"certified_{r}": c for r, c in zip(names, cert.certified, strict=True)},
            **{f"decided_{r}": d for r, d in zip(names, cert.decided_at, strict=True)}}
        return format_row(self.header(sidecar), self.kind, values), cert.label == label

    def curve_label(self, method: str) -> str:
        return SEQUENTIAL_LABELS[method]

    def row_check(self, sidecar: Sidecar, header: Sequence[str],
                  methods: Sequence[str]) -> RowCheck:
        procedure = radii_procedure(sidecar)
        if list(procedure.radii) != header_radii(header):
            raise Unverifiable(f"the header's radii are not the sidecar's {sidecar.radii}",
                               "not checked: the radii do not match")
        run = sidecar.fingerprint()
        return lambda value: radii_row_problems(value, sidecar, run, procedure)


def radii_procedure(sidecar: Sidecar) -> sequential.RadiiProcedure:
    """A fresh sequential procedure with a radii file's settings (its sidecar)."""
    return sequential.RadiiProcedure(
        sidecar.radii, sidecar.sigma, sidecar.alpha, sidecar.max_n, method=sidecar.method,
        num_classes=sidecar.num_classes, confidence_sequence=sidecar.confidence_sequence,
        batch_size=sidecar.batch)


def radii_row_problems(value: Mapping[str, Any], sidecar: Sidecar, run: str,
                       procedure: sequential.RadiiProcedure) -> list[str]:
    """What in a radii row does not follow from its counts: the certificate of its largest
    certified radius is recomputed at the look that certified it, the final look's counts must
    certify nothing more, and the columns must agree with the counts and with each other."""
    problems = _run_problem(value, run)
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


@register
class Predict(Protocol):
    """Cohen's PREDICT: the smoothed prediction or an abstention, no radius."""

    name = "predict"
    kind = "predict"
    mode = "predict"
    words = "predict"

    def settings(self, cfg: Any, sigma: float, num_classes: int) -> dict[str, Any]:
        return {"method": "predict", "layout": cfg.method}

    def sample(self, smooth: Any, x: Any, cfg: Any, sidecar: Sidecar,
               streams: Mapping[str, Any]) -> Any:
        return smooth.predict(x, n=cfg.n, alpha=cfg.alpha, batch_size=cfg.batch,
                              generator=streams["prediction"])

    def row(self, idx: int, label: int, seconds: float, result: Any,
            sidecar: Sidecar) -> tuple[list[str], bool]:
        values = {"idx": idx, "label": label, "predict": result, "correct": result == label,
                  "time": seconds, "method": "predict", "run": sidecar.run}
        return format_row(self.header(sidecar), self.kind, values), result == label
