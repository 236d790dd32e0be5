"""Certify or predict over a dataset: one result row per example, flushed as produced, resumable.

The row format belongs to `results`. A run first *plans* from the files alone (what is
finished, whether those rows belong to this run: settings and checkpoint content, by the rows'
`run` fingerprint), then *executes*. Under torchrun each rank certifies every world_size-th
example into its own part file and rank 0 merges the parts in index order. Each example's
noise comes from a generator seeded by (seed, idx), so results do not depend on the sharding.
Rank 0 holds the output's lock for the whole run: a second process on the same --out is
refused. Besides fixed n per input, certify samples sequentially at given radii (radii files)
or with n chosen per input (adaptive n); a file holds rows of one protocol only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import results, sequential
from .checkpoints import load_for_run
from .data import dataset_info, get_dataset
from .distributed import DistContext, batch_memory_guard, init_distributed
from .io import check_output_path, output_lock
from .rng import generator
from .smooth import Smooth
from .stats import ABSTAIN, check_alpha, check_positive_int, check_sample_count

log = logging.getLogger(__name__)
_KINDS = {"certify": "certify (radius per input)", "radii": "certify at given radii (sequential)",
          "predict": "predict"}
_FIX = ("remove it, choose another --out, or pass --restart-stale (restart_if_stale=True) to "
        "discard those rows and recompute")


@dataclass
class RunConfig:
    """A certify or predict run over a dataset split."""

    checkpoint: str
    out: str
    mode: str = "certify"  # or "predict"
    method: str | None = None  # both (fixed and adaptive n), certify (sequential); see validate
    split: str = "test"
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000
    grid: int = 10
    skip: int = 1
    max: int | None = None
    seed: int = 0
    sigma: float | None = None
    dataset: str | None = None
    format: str = "auto"  # of the checkpoint: auto, smoothcert, cohen or macer
    arch: str | None = None  # a MACER checkpoint's architecture
    data_dir: str | None = None
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = True
    restart_if_stale: bool = False  # discard rows of another run (settings or checkpoint)
    # Sequential certification at radii (sequential.RadiiProcedure): radii (None: the Table-1
    # radii max_n can reach), max_n (None: n), confidence_sequence (None: mixture).
    radii: tuple[float, ...] | None = None
    max_n: int | None = None
    confidence_sequence: str | None = None
    # Input-specific n (Smooth.certify_adaptive) up to max_n, radius loss <= tolerance (0.02).
    adaptive_n: bool = False
    tolerance: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sampling(self) -> str:
        """fixed (n samples per input), sequential (at radii) or adaptive (n per input)."""
        if self.adaptive_n:
            return "adaptive"
        given = (self.radii, self.max_n, self.confidence_sequence)
        return "fixed" if all(v is None for v in given) else "sequential"

    def validate(self) -> RunConfig:
        if self.mode not in ("certify", "predict"):
            raise ValueError(f"mode must be certify or predict, got {self.mode!r}")
        sampling = self.sampling
        if self.mode == "predict" and sampling != "fixed":
            raise ValueError("radii, max_n, confidence_sequence and adaptive_n apply to certify "
                             "only")
        if self.adaptive_n and (self.radii is not None or self.confidence_sequence is not None):
            raise ValueError("adaptive_n certifies the radius of each input: radii and "
                             "confidence_sequence apply to sequential certification only")
        if self.tolerance is not None and not self.adaptive_n:
            raise ValueError("tolerance applies to adaptive_n (--adaptive-n) only")
        if sampling == "sequential":
            self.method = self.method or "certify"
            if self.method not in sequential.SEQUENTIAL_METHODS:
                raise ValueError(f"method must be one of {', '.join(sequential.SEQUENTIAL_METHODS)}"
                                 f" for sequential certification at radii, got {self.method!r}")
            self.confidence_sequence = self.confidence_sequence or "mixture"
            if self.confidence_sequence not in sequential.CONFIDENCE_SEQUENCES:
                raise ValueError(f"confidence_sequence must be one of "
                                 f"{', '.join(sequential.CONFIDENCE_SEQUENCES)}, got "
                                 f"{self.confidence_sequence!r}")
            if self.radii is not None:
                self.radii = tuple(float(r) for r in sequential.check_radii(self.radii))
        self.method = self.method or "both"
        if self.method not in results.LAYOUTS:
            raise ValueError(
                f"method must be one of {', '.join(results.LAYOUTS)}, got {self.method!r}"
            )
        if self.adaptive_n:
            self.tolerance = sequential.check_tolerance(
                0.02 if self.tolerance is None else self.tolerance)
        check_alpha(self.alpha)
        for name in ("n0", "n"):
            check_sample_count(getattr(self, name), name)
        for name in ("batch", "grid", "skip"):
            check_positive_int(getattr(self, name), name)
        if sampling != "fixed":
            self.max_n = check_sample_count(self.n if self.max_n is None else self.max_n,
                                            "max_n")
            if self.batch > self.max_n and sampling == "sequential":
                raise ValueError(f"max_n must be >= batch ({self.batch}), got {self.max_n}")
        if self.max is not None and self.max < 0:
            self.max = None  # Cohen's -1: no limit
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        self._check_out()
        return self

    def _check_out(self) -> None:
        check_output_path(self.out, "out")
        stem, dot, rank = Path(self.out).name.rpartition(".part")
        if dot and stem and rank.isdigit():  # a run on `stem` would fold it into its rows
            raise ValueError(f"out: '{self.out}' has the name of a torchrun part file of "
                             f"'{stem}', which a run on '{stem}' would take as its own: choose "
                             "another --out")


def selected_indices(length: int, skip: int, limit: int | None) -> list[int]:
    """Every `skip`-th index from 0; `limit` is a count of examples (not Cohen's index)."""
    indices = list(range(0, length, skip))
    return indices if limit is None else indices[:limit]


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided from the files alone (planning writes nothing)."""

    keep: dict[int, str]  # finished rows of this run, by example index (their text as written)
    todo: list[int]  # the indices still to do, in order
    rewrite: bool  # out must be rewritten: parts to fold in, a cut-off row or stale rows to drop
    discarded: int = 0  # stale rows dropped (restart_if_stale)


class Runner:
    """Certifies (or predicts) the selected examples of a split into `cfg.out`."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg = cfg.validate()
        self.progress = progress
        self.ctx: DistContext = init_distributed(cfg.device)
        # Hashed before loading: a checkpoint replaced meanwhile makes the next run recompute.
        digest = results.file_sha256(cfg.checkpoint) if os.path.isfile(cfg.checkpoint) else ""
        model, self.dataset_name, self.sigma = load_for_run(
            cfg.checkpoint, cfg.format, cfg.arch, cfg.dataset, cfg.sigma, self.ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        num_classes = dataset_info(self.dataset_name).num_classes
        self.smooth = Smooth(model, num_classes, self.sigma, amp=cfg.amp)
        self.dataset = get_dataset(self.dataset_name, cfg.split, cfg.data_dir, augment=False)
        self.out = Path(cfg.out)
        self.kind = "radii" if cfg.sampling == "sequential" else cfg.mode
        self.radii: tuple[float, ...] = ()
        if self.kind == "radii":
            self.radii = cfg.radii or tuple(float(r) for r in sequential.reachable_radii(
                sequential.TABLE1_RADII, self.sigma, cfg.alpha, cfg.max_n, method=cfg.method,
                num_classes=num_classes, confidence_sequence=cfg.confidence_sequence,
                batch_size=cfg.batch))
            self.columns = results.radii_columns(self.radii)
        else:
            self.columns = results.columns(cfg.mode, cfg.method)
        self.indices = selected_indices(len(self.dataset), cfg.skip, cfg.max)
        self.meta = self._sidecar(digest, num_classes)
        self.run_id = self.meta["run"]
        self.rows_kept: int | None = None  # this run's rows in the files, once it writes

    def _sidecar(self, digest: str, num_classes: int) -> dict:
        """The sidecar this run writes: its settings, the checkpoint's sha256, the fingerprint."""
        cfg = self.cfg
        main = {"radii": cfg.method, "certify": results.LAYOUTS[cfg.method][0],
                "predict": "predict"}[self.kind]
        protocol = (f"{cfg.split} split, every {cfg.skip}th example from index 0, "
                    f"{len(self.indices)} examples")
        meta = {
            **cfg.extra, "format": results.FORMAT, "mode": cfg.mode, "method": main,
            "layout": cfg.method, "split": cfg.split, "n0": cfg.n0, "n": cfg.n,
            "alpha": cfg.alpha, "grid": cfg.grid, "skip": cfg.skip, "max": cfg.max,
            "seed": cfg.seed, "sigma": self.sigma, "dataset": self.dataset_name, "amp": cfg.amp,
            "num_classes": num_classes, "checkpoint": str(cfg.checkpoint),
            "checkpoint_sha256": digest, "checkpoint_format": cfg.format, "arch": cfg.arch,
            "protocol": protocol,
        }
        if cfg.sampling != "fixed":
            meta.update(sampling=cfg.sampling, max_n=cfg.max_n, n=None)
        if cfg.sampling == "sequential":
            meta.update(layout="radii", grid=None, radii=list(self.radii), batch=cfg.batch,
                        confidence_sequence=cfg.confidence_sequence)
        if cfg.sampling == "adaptive":
            meta.update(tolerance=cfg.tolerance)
        return {**meta, "run": results.fingerprint(meta)}

    def part_path(self, rank: int) -> Path:
        return self.out if self.ctx.world_size == 1 else self.out.with_name(
            f"{self.out.name}.part{rank}")

    def part_files(self) -> list[Path]:
        """The part files next to out, of this run or of an unmerged run with any world size."""
        prefix = f"{self.out.name}.part"
        folder = self.out.parent
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir()
                      if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())

    def run(self, on_row: Callable[[], None] | None = None) -> Path:
        """Certify (or predict) what is left; `on_row()` is called after each row written."""
        # The sidecar's name is locked too: it can be another run's --out (`--out r.json`
        # beside `--out r`), and then neither run may write it.
        with output_lock(self.out, holder=self.ctx.is_main,
                         also=[results.sidecar_path(self.out)]):
            self.ctx.barrier()  # rank 0 holds the lock before any rank reads the files
            try:
                self.execute(self.plan(), on_row)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say what a re-run will resume
                raise KeyboardInterrupt(self.kept()) from None
        return self.out

    def kept(self) -> str:
        """What an interrupted run leaves: its rows in out (under torchrun: this rank's)."""
        if self.rows_kept is None:
            return f"'{self.out}' left as it was"
        rows = f"{self.rows_kept} row{'' if self.rows_kept == 1 else 's'}"
        if self.ctx.distributed:
            return f"{rows} kept by rank {self.ctx.rank} in '{self.out}' and its part files"
        return f"{rows} kept in '{self.out}'"

    # ------------------------------------------------------------ plan: read and decide

    def plan(self) -> Plan:
        """Read out and the part files an interrupted run left (any world size), check that
        every row belongs to this run, and decide what is left. Writes nothing."""
        self._check_sidecar_is_ours()
        keep: dict[int, str] = {}
        stale: list[tuple[Path, results.ResultFile]] = []
        rewrite, discarded = False, 0
        for path in [self.out, *self.part_files()]:
            if not path.exists():
                continue
            try:
                table = results.read_results(path, allow_cut=True)
            except ValueError as err:
                raise ValueError(f"out: {err}; smoothcert leaves it as it is: repair or remove "
                                 "it, or choose another --out") from None
            self._check_kind(table)
            mine = table.header == self.columns
            runs = table.runs() if mine else [None] * len(table.lines)
            for idx, line, run in zip(table.values["idx"], table.lines, runs, strict=True):
                if run == self.run_id:
                    keep.setdefault(idx, line)
                else:
                    discarded += 1
            if not mine or any(run != self.run_id for run in runs):
                stale.append((path, table))
            rewrite |= table.cut or path != self.out
        if stale and not self.cfg.restart_if_stale:
            raise self._stale_error(*stale[0])
        todo = [i for i in self.indices if i not in keep]
        return Plan(keep, todo, rewrite or bool(stale), discarded)

    def _check_sidecar_is_ours(self) -> None:
        sidecar = results.sidecar_path(self.out)
        try:
            meta = results.read_sidecar(self.out)
        except ValueError as err:
            raise ValueError(f"out: {err}; smoothcert does not overwrite a file it did not "
                             "write: choose another --out") from None
        if meta is not None and not results.is_own_sidecar(meta):
            raise ValueError(f"out: '{sidecar}' exists and is not a smoothcert sidecar; "
                             "smoothcert does not overwrite it: choose another --out")

    def _check_kind(self, table: results.ResultFile) -> None:
        """Refuse a file smoothcert did not write, or one of the other mode."""
        if not table.own:
            raise ValueError(
                f"out: '{table.path}' exists and is not a smoothcert result file (its columns "
                f"are {' '.join(table.header)}); smoothcert does not overwrite it: choose "
                "another --out"
            )
        if table.kind != self.kind:
            raise ValueError(f"out: '{table.path}' holds {_KINDS[table.kind]} results, this "
                             f"is a {_KINDS[self.kind]} run; choose another --out")

    def _stale_error(self, path: Path, table: results.ResultFile) -> ValueError:
        """Explain why the rows of `table` are not this run's, as precisely as the files allow."""
        if table.header != self.columns:
            what = ("smoothcert's earlier format (no method/run columns), so whether they "
                    "match cannot be checked" if not table.native else
                    f"other columns than --method {self.cfg.method} writes")
            return ValueError(f"out: '{path}' holds rows in {what}; {_FIX}")
        other = sorted({run for run in table.runs() if run != self.run_id})
        saved = results.read_sidecar(self.out)  # part files have none: out's describes them
        if saved is None or saved.get("run") not in other:
            return ValueError(
                f"out: '{path}' holds rows of another run (fingerprint {other[0]}, this run's "
                f"is {self.run_id}) and no sidecar says which settings or checkpoint differ; "
                f"{_FIX}"
            )
        if saved.get("checkpoint_sha256") != self.meta["checkpoint_sha256"]:
            return ValueError(
                f"out: '{path}' holds results of another checkpoint: sha256 "
                f"{str(saved.get('checkpoint_sha256'))[:12]}… (from '{saved.get('checkpoint')}'),"
                f" but '{self.cfg.checkpoint}' is {self.meta['checkpoint_sha256'][:12]}…; {_FIX}"
            )
        differ = [f"{k} (was {saved.get(k)!r}, now {self.meta.get(k)!r})"
                  for k in (*results.IDENTITY_KEYS, *results.SAMPLING_KEYS)
                  if saved.get(k) != self.meta.get(k)]
        if not differ:  # its settings are this run's, its fingerprint is not theirs
            sidecar = results.sidecar_path(self.out)
            return ValueError(
                f"out: '{sidecar}' was edited: it records run {saved['run']}, but its settings "
                f"give {results.fingerprint(saved)}, this run's; {_FIX}")
        return ValueError(f"out: '{path}' was written with different {', '.join(differ)}; {_FIX}")

    # ------------------------------------------------------------ execute: write

    def execute(self, plan: Plan, on_row: Callable[[], None] | None = None) -> None:
        ctx = self.ctx
        ctx.barrier()  # every rank has planned before rank 0 folds the parts into out
        if ctx.is_main and plan.discarded:
            log.warning("%s: discarding %d rows of another run (--restart-stale)", self.out,
                        plan.discarded)
        if ctx.is_main and plan.rewrite:
            self._fold(plan.keep)
        self.rows_kept = len(plan.keep) if ctx.is_main else 0
        ctx.barrier()
        self._process(plan.todo[ctx.rank :: ctx.world_size], self.part_path(ctx.rank), on_row)
        ctx.barrier()
        if ctx.is_main:
            self._finish()
        ctx.barrier()

    def _fold(self, rows: dict[int, str]) -> None:
        """Write `rows` (this run's finished rows) as out, then remove the part files."""
        parts = self.part_files()
        if rows:
            self._write_sidecar()
            results.write_table(self.out, self.columns, [rows[i] for i in sorted(rows)])
        else:
            self.out.unlink(missing_ok=True)  # with its sidecar: both are smoothcert's
            results.sidecar_path(self.out).unlink(missing_ok=True)
        for part in parts:
            part.unlink(missing_ok=True)

    def _finish(self) -> None:
        """Merge the ranks' parts; a run without a single row still leaves its (empty) file."""
        if self.ctx.distributed:
            rows: dict[int, str] = {}
            for path in [self.out, *self.part_files()]:
                if path.exists():
                    rows.update(results.read_results(path).rows_by_index())
            self._fold(rows)
        if not self.out.exists():
            self._write_sidecar()
            results.write_table(self.out, self.columns, [])
        elif results.read_sidecar(self.out) != self.meta:
            self._write_sidecar()  # e.g. a lone result file whose rows proved to be this run's

    def _write_sidecar(self) -> None:
        results.write_sidecar(self.out, self.meta)

    def _process(self, indices: Iterable[int], part: Path,
                 on_row: Callable[[], None] | None = None) -> None:
        indices = list(indices)
        certified = 0
        bar = tqdm(indices, desc=f"{self.cfg.mode} {self.out.name}",
                   disable=not (self.progress and self.ctx.is_main))
        first = self._write_sidecar if self.ctx.is_main else None
        with results.RowWriter(part, self.columns, before_create=first) as writer:
            for count, idx in enumerate(bar, start=1):
                with batch_memory_guard(self.cfg.batch):
                    row, ok = self._row(idx)
                writer.write(row)
                self.rows_kept += 1
                certified += ok
                bar.set_postfix(correct=f"{certified}/{count}")
                if on_row is not None:
                    on_row()

    def _row(self, idx: int) -> tuple[list[str], bool]:
        cfg = self.cfg
        x, label = self.dataset[idx]
        label = int(label)
        streams = {purpose: generator(cfg.seed, purpose, idx, self.ctx.device)
                   for purpose in ("selection", "estimation", "prediction")}
        started = time.time()
        if cfg.mode == "predict":
            prediction = self.smooth.predict(x, cfg.n, cfg.alpha, cfg.batch,
                                             generator=streams["prediction"])
            return results.predict_row(idx, label, prediction, time.time() - started,
                                       self.run_id), prediction == label
        samples = {"generator": streams["selection"],
                   "estimation_generator": streams["estimation"]}
        if self.kind == "radii":
            cert = self.smooth.certify_radii(
                x, radii=self.radii, alpha=cfg.alpha, max_n=cfg.max_n, batch_size=cfg.batch,
                n0=cfg.n0, method=cfg.method, confidence_sequence=cfg.confidence_sequence,
                **samples)
            return results.radii_row(idx, label, time.time() - started, cert, cfg.method,
                                     self.run_id), cert.label == label
        if cfg.adaptive_n:
            result = self.smooth.certify_adaptive(
                x, n0=cfg.n0, max_n=cfg.max_n, alpha=cfg.alpha, batch_size=cfg.batch,
                tolerance=cfg.tolerance, grid=cfg.grid, **samples)
        else:
            result = self.smooth.certify_all(x, cfg.n0, cfg.n, cfg.alpha, cfg.batch,
                                             grid=cfg.grid, **samples)
        certificates = {"certify": result.certify, "tcertify": result.tcertify,
                        "tcertify-strict": result.strict}
        row = results.certify_row(idx, label, time.time() - started, certificates,
                                  result.selection_counts, result.estimation_counts, cfg.method,
                                  self.run_id)
        return row, certificates[results.LAYOUTS[cfg.method][0]].label == label


def run(cfg: RunConfig, progress: bool = True,
        on_row: Callable[[], None] | None = None) -> Path:
    return Runner(cfg, progress=progress).run(on_row)


def abstention_rate(path: str | os.PathLike) -> float:
    """Fraction of rows of a PREDICT result file whose prediction is ABSTAIN."""
    predictions = results.read_results(path, kind="predict").column("predict")
    return float(np.mean(predictions == ABSTAIN)) if predictions.size else 0.0
