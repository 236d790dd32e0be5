"""Certification protocols: what a run samples, which columns and sidecar settings its file
has, how a row is built and how `verify` rechecks it. One class per protocol; `register`
adds one, and `protocol_of` finds the one of a run's settings or of a sidecar.

The runner, the reader, `verify` and `analyze` ask the protocol instead of branching on the
mode or the sampling. No torch here: `sample` only calls the smoothed classifier it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from . import schema, sequential
from .recompute import (
    certificate_values,
    count_values,
    dense,
    radii_procedure,
    radii_row_problems,
    recomputed,
    run_problem,
)
from .schema import LAYOUTS, PREFIXES, format_row, header_radii, radius_name
from .sidecar import Sidecar
from .stats import certify_from_counts, check_sample_count

# How tables and plots name each method; T-CERTIFY's two modes carry different guarantees.
METHOD_LABELS = {
    "certify": "CERTIFY",
    "tcertify": "T-CERTIFY (paper mode)",
    "tcertify-strict": "T-CERTIFY (strict)",
}
# How tables name the method of a sequential (radii) file: T-CERTIFY's holds at alpha exactly.
SEQUENTIAL_LABELS = {"certify": "CERTIFY, sequential", "tcertify": "T-CERTIFY, sequential"}
# The largest radius accepted where sigma, alpha or n are not recorded (Cohen's files): a
# CERTIFY radius is sigma * Phi^-1(pA_lower) < 8.3 sigma whatever n (pA_lower is a double
# below 1), so this allows sigma up to 12 (the field's files use at most 1).
GENEROUS_RADIUS = 100.0
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
    paper_mode: ClassVar[bool] = True  # its tcertify columns are paper mode (level 2α − α/grid)

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

    def certified_radii(self, header: Sequence[str]) -> np.ndarray | None:
        """The radii at which its rows' certified accuracy is known (None: at any radius)."""
        return None

    def note(self, label: str, sidecar: Sidecar) -> str:
        """What a table of the file must say about this protocol ("" for nothing)."""
        return ""

    def radius_limits(self, values: Mapping[str, list], methods: Sequence[str],
                      header: Sequence[str], sidecar: Sidecar | None
                      ) -> tuple[dict[str, np.ndarray], str]:
        """The largest radius each method's column can hold in each row, and how it was found:
        the certificate of counts all of one class, at the row's n and the sidecar's sigma and
        alpha; GENEROUS_RADIUS where the file records too little."""
        rows = len(values["idx"])
        if "n" not in values or sidecar is None or sidecar.lacks_value(
                "sigma", "alpha", "grid", "num_classes"):
            return {m: np.full(rows, GENEROUS_RADIUS) for m in methods}, (
                "sigma, alpha or n not recorded: a generous bound, as any CERTIFY radius is "
                "below 8.3 sigma")
        settings = (sidecar.sigma, sidecar.alpha, sidecar.grid, sidecar.num_classes)
        return {m: np.array([_largest_radius(m, n, *settings) for n in values["n"]])
                for m in methods}, (
            f"what n samples allow at sigma {sidecar.sigma:g}, alpha {sidecar.alpha:g}")

    def row_check(self, sidecar: Sidecar, header: Sequence[str],
                  methods: Sequence[str]) -> RowCheck:
        """What checks a row of this file (Unverifiable: none can be checked)."""
        raise Unverifiable(f"{self.words} rows hold no certificate", "not checked")


PROTOCOLS: dict[str, Protocol] = {}


@functools.cache
def _largest_radius(method: str, n: int, sigma: float, alpha: float, grid: int,
                    num_classes: int) -> float:
    """The radius of n estimation samples all of one class: no row of n samples exceeds it.
    Paper-mode T-CERTIFY's also bounds strict mode, which evaluates one alpha' of its grid."""
    one_class = np.zeros(num_classes, dtype=np.int64)
    one_class[0] = n
    bound = "certify" if method == "certify" else "tcertify"
    return certify_from_counts(one_class, one_class, sigma, alpha, bound, grid).radius


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


# ---------------------------------------------------------------- the protocols


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
                  "run": sidecar.run, **certificate_values("", certificates[main], label),
                  **count_values(result.selection_counts, result.estimation_counts)}
        for method in groups:
            values.update(certificate_values(PREFIXES[method] + "_", certificates[method],
                                              label))
        row = format_row(self.header(sidecar), self.kind, values)
        return row, certificates[main].label == label

    def row_check(self, sidecar: Sidecar, header: Sequence[str],
                  methods: Sequence[str]) -> RowCheck:
        run = sidecar.fingerprint()
        return lambda value: self._problems(value, sidecar, run, methods)

    def _problems(self, value: Mapping[str, Any], sidecar: Sidecar, run: str,
                  methods: Sequence[str]) -> list[str]:
        problems = run_problem(value, run)
        try:
            selection = dense(value["selection_counts"], sidecar.num_classes)
            estimation = dense(value["estimation_counts"], sidecar.num_classes)
        except ValueError as err:
            return [*problems, f"counts: {err}"]
        written = count_values(selection, estimation)
        problems += [f"{name} {value[name]}, the counts give {int(written[name])}"
                     for name in ("n0", "n", "count_a", "count_b")
                     if value[name] != int(written[name])]
        problems += self._n_problems(selection, estimation, sidecar)
        for method in methods:
            problems += recomputed(value, method, methods[0], selection, estimation, sidecar)
        return problems

    def _n_problems(self, selection: np.ndarray, estimation: np.ndarray,
                    sidecar: Sidecar) -> list[str]:
        """Whether the row's n is the protocol's (fixed n: the count columns say it)."""
        return []


@register
class AdaptiveN(FixedN):
    """Fixed-n's rows, with each input's n chosen from its selection counts (up to max_n)."""

    name = "adaptive-n"
    sampling = "adaptive"

    def configure(self, cfg: Any) -> None:
        if any(value is not None for value in (cfg.radii, cfg.confidence_sequence,
                                               cfg.final_share, cfg.precision, cfg.futility)):
            raise ValueError("adaptive_n certifies the radius of each input: radii, "
                             "confidence_sequence, final_share, precision and futility apply "
                             "to sequential certification only")

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
    cfg.max_n = check_sample_count(cfg.n if cfg.max_n is None else cfg.max_n, "max_n")


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
        cfg.final_share = sequential.check_final_share(
            sequential.FINAL_SHARE if cfg.final_share is None else cfg.final_share)
        cfg.precision = sequential.check_precision(cfg.precision)
        # "none" (--futility none): no futility rule; None: the default level
        cfg.futility = sequential.check_futility(
            sequential.FUTILITY if cfg.futility is None else
            None if cfg.futility == "none" else cfg.futility)

    def check(self, cfg: Any) -> None:
        _check_max_n(cfg)
        if cfg.batch > cfg.max_n:
            raise ValueError(f"max_n must be >= batch ({cfg.batch}), got {cfg.max_n}")

    def settings(self, cfg: Any, sigma: float, num_classes: int) -> dict[str, Any]:
        radii = cfg.radii or tuple(float(r) for r in sequential.reachable_radii(
            sequential.TABLE1_RADII, sigma, cfg.alpha, cfg.max_n, method=cfg.method,
            num_classes=num_classes, confidence_sequence=cfg.confidence_sequence,
            batch_size=cfg.batch, final_share=cfg.final_share))
        return {"method": cfg.method, "layout": "radii", "grid": None, "n": None,
                "sampling": self.sampling, "max_n": cfg.max_n, "radii": list(radii),
                "batch": cfg.batch, "confidence_sequence": cfg.confidence_sequence,
                # 0 (no final look) is left out, as in files written before the final look
                "final_share": cfg.final_share or None, "precision": cfg.precision,
                "futility": cfg.futility}

    def header(self, sidecar: Sidecar) -> list[str]:
        return schema.radii_columns(sidecar.radii)

    def sample(self, smooth: Any, x: Any, cfg: Any, sidecar: Sidecar,
               streams: Mapping[str, Any]) -> Any:
        return smooth.certify_radii(
            x, radii=sidecar.radii, alpha=cfg.alpha, max_n=cfg.max_n, batch_size=cfg.batch,
            n0=cfg.n0, method=cfg.method, confidence_sequence=cfg.confidence_sequence,
            final_share=cfg.final_share, precision=cfg.precision, futility=cfg.futility,
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

    paper_mode = False  # both sequential methods hold at alpha exactly

    def curve_label(self, method: str) -> str:
        return SEQUENTIAL_LABELS[method]

    def certified_radii(self, header: Sequence[str]) -> np.ndarray | None:
        return np.array(header_radii(header))

    def note(self, label: str, sidecar: Sidecar) -> str:
        if not sidecar.radii:
            return ""
        return (f"{label}: certified at the radii {', '.join(map(str, sidecar.radii))} only "
                "(sequential, so no ACR); - marks radii it was not asked about")

    def radius_limits(self, values: Mapping[str, list], methods: Sequence[str],
                      header: Sequence[str], sidecar: Sidecar | None
                      ) -> tuple[dict[str, np.ndarray], str]:
        largest = max(header_radii(header), default=0.0)
        return {m: np.full(len(values["idx"]), largest) for m in methods}, \
            "the file's largest radius"

    def row_check(self, sidecar: Sidecar, header: Sequence[str],
                  methods: Sequence[str]) -> RowCheck:
        procedure = radii_procedure(sidecar)
        if list(procedure.radii) != header_radii(header):
            raise Unverifiable(f"the header's radii are not the sidecar's {sidecar.radii}",
                               "not checked: the radii do not match")
        run = sidecar.fingerprint()
        return lambda value: radii_row_problems(value, sidecar, run, procedure)


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
