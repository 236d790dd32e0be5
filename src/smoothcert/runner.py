"""Certify or predict over a dataset: one result row per example, flushed as produced, resumable.

The row format belongs to `results`; what is sampled and which row it makes, to the run's
protocol (`protocols`: fixed n, adaptive n, radii, predict). A run first *plans* from the
files alone (`ResumePlanner`: what is finished, whether those rows belong to this run:
settings and checkpoint content, by the rows' `run` fingerprint), then *executes*. Under
torchrun each rank certifies every world_size-th example into its own part file and rank 0
merges the parts in index order (`OutputFiles`). Each example's
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
from torch import nn
from tqdm.auto import tqdm

from . import results
from .denoise import Denoised, load_denoiser
from .distributed import DistContext, batch_memory_guard, init_distributed
from .io import check_output_path, output_lock
from .lattice import check_sound
from .protocols import Protocol, protocol_of
from .rng import generator
from .schema import LAYOUTS
from .sidecar import Sidecar, read, write
from .smooth import Smooth
from .sources import Source, source_from_files
from .stats import ABSTAIN, check_alpha, check_grid_size, check_positive_int, check_sample_count

log = logging.getLogger(__name__)
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
    arch: str | None = None  # the model spec of a state_dict; a MACER checkpoint's architecture
    model_kwargs: str | dict | None = None  # the spec's builder arguments (JSON text or a dict)
    state_dict_key: str | None = None
    trust_pickle: bool = False  # load a whole pickled model, running the file's code
    mean: tuple[float, ...] | None = None  # a user's model's input standardisation
    std: tuple[float, ...] | None = None
    normalize: bool = True  # False: a user's model reads [0, 1] pixels
    data_dir: str | None = None
    data_file: str | None = None  # --dataset npz
    image_size: int | None = None  # imagefolder/npz: resize + centre crop
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = True
    compile: bool | str = False  # torch.compile (True) or "openvino" (NoiseSampler); eager
    # where that fails
    restart_if_stale: bool = False  # discard rows of another run (settings or checkpoint)
    # Sequential certification at radii (sequential.RadiiProcedure): radii (None: the Table-1
    # radii max_n can reach), max_n (None: n), confidence_sequence (None: mixture),
    # final_share (None: sequential.FINAL_SHARE), precision (None: decide every radius),
    # futility (None: sequential.FUTILITY; "none": no futility rule).
    radii: tuple[float, ...] | None = None
    max_n: int | None = None
    confidence_sequence: str | None = None
    final_share: float | None = None
    precision: float | None = None
    futility: float | str | None = None
    # Input-specific n (Smooth.certify_adaptive) up to max_n, radius loss <= tolerance (0.02).
    adaptive_n: bool = False
    tolerance: float | None = None
    # Denoised smoothing: a denoiser checkpoint or diffusers:FOLDER in front of the classifier.
    denoiser: str | None = None
    # Sound sampling on the 8-bit lattice (smoothcert.lattice): "exact" (True) refuses inputs
    # off the lattice, "round" rounds them onto it; None: ordinary float32 Gaussian noise.
    sound: str | bool | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sampling(self) -> str:
        """fixed (n samples per input), sequential (at radii) or adaptive (n per input)."""
        if self.adaptive_n:
            return "adaptive"
        given = (self.radii, self.max_n, self.confidence_sequence, self.final_share,
                 self.precision, self.futility)
        return "fixed" if all(v is None for v in given) else "sequential"

    @property
    def protocol(self) -> Protocol:
        return protocol_of(self)

    def validate(self) -> RunConfig:
        self._check_protocol_options()
        protocol = self.protocol
        protocol.configure(self)
        self.method = self.method or "both"
        if self.method not in LAYOUTS:
            raise ValueError(f"method must be one of {', '.join(LAYOUTS)}, got {self.method!r}")
        check_alpha(self.alpha)
        for name in ("n0", "n"):
            check_sample_count(getattr(self, name), name)
        for name in ("batch", "skip"):
            check_positive_int(getattr(self, name), name)
        check_grid_size(self.grid)
        self.sound = check_sound(self.sound)
        protocol.check(self)
        if self.max is not None and self.max < 0:
            self.max = None  # Cohen's -1: no limit
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        self._check_out()
        return self

    def _check_protocol_options(self) -> None:
        """Refuse options of one protocol given to another."""
        if self.mode not in ("certify", "predict"):
            raise ValueError(f"mode must be certify or predict, got {self.mode!r}")
        if self.mode == "predict" and self.sampling != "fixed":
            raise ValueError("radii, max_n, confidence_sequence, final_share, precision, "
                             "futility and adaptive_n apply to certify only")
        if self.tolerance is not None and not self.adaptive_n:
            raise ValueError("tolerance applies to adaptive_n (--adaptive-n) only")

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


class OutputFiles:
    """A run's output: `out`, its sidecar, and the part files of torchrun ranks beside it."""

    def __init__(self, out: Path, header: list[str], sidecar: Sidecar):
        self.out, self.header, self.sidecar = out, header, sidecar

    def part_path(self, rank: int, world_size: int) -> Path:
        return self.out if world_size == 1 else self.out.with_name(f"{self.out.name}.part{rank}")

    def part_files(self) -> list[Path]:
        """The part files next to out, of this run or of an unmerged run with any world size."""
        prefix = f"{self.out.name}.part"
        folder = self.out.parent
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir()
                      if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())

    def write_sidecar(self) -> None:
        write(self.out, self.sidecar)

    def fold(self, rows: dict[int, str]) -> None:
        """Write `rows` (this run's finished rows) as out, then remove the part files."""
        parts = self.part_files()
        if rows:
            self.write_sidecar()
            results.write_table(self.out, self.header, [rows[i] for i in sorted(rows)])
        else:
            self.out.unlink(missing_ok=True)  # with its sidecar: both are smoothcert's
            results.sidecar_path(self.out).unlink(missing_ok=True)
        for part in parts:
            part.unlink(missing_ok=True)

    def finish(self, distributed: bool) -> None:
        """Merge the ranks' parts; a run without a single row still leaves its (empty) file."""
        if distributed:
            rows: dict[int, str] = {}
            for path in [self.out, *self.part_files()]:
                if path.exists():
                    rows.update(results.read_results(path).rows_by_index())
            self.fold(rows)
        if not self.out.exists():
            self.write_sidecar()
            results.write_table(self.out, self.header, [])
        elif results.read_sidecar(self.out) != self.sidecar.to_json():
            self.write_sidecar()  # e.g. a lone result file whose rows proved to be this run's


class ResumePlanner:
    """Reads out and the part files an interrupted run left (any world size), checks that
    every row belongs to this run, and decides what is left. Writes nothing."""

    def __init__(self, files: OutputFiles, protocol: Protocol, cfg: RunConfig):
        self.files, self.protocol, self.cfg = files, protocol, cfg
        self.run_id = files.sidecar.run

    def plan(self, indices: list[int]) -> Plan:
        self._check_sidecar_is_ours()
        keep: dict[int, str] = {}
        stale: list[tuple[Path, results.ResultFile]] = []
        rewrite, discarded = False, 0
        for path in [self.files.out, *self.files.part_files()]:
            if not path.exists():
                continue
            table = self._read(path)
            mine = table.header == self.files.header
            runs = table.runs() if mine else [None] * len(table.lines)
            for idx, line, run in zip(table.values["idx"], table.lines, runs, strict=True):
                if run == self.run_id:
                    keep.setdefault(idx, line)
                else:
                    discarded += 1
            if not mine or any(run != self.run_id for run in runs):
                stale.append((path, table))
            rewrite |= table.cut or path != self.files.out
        if stale and not self.cfg.restart_if_stale:
            raise self._stale_error(*stale[0])
        todo = [i for i in indices if i not in keep]
        return Plan(keep, todo, rewrite or bool(stale), discarded)

    def _read(self, path: Path) -> results.ResultFile:
        try:
            table = results.read_results(path, allow_cut=True)
        except ValueError as err:
            raise ValueError(f"out: {err}; smoothcert leaves it as it is: repair or remove "
                             "it, or choose another --out") from None
        self._check_kind(table)
        return table

    def _check_sidecar_is_ours(self) -> None:
        out = self.files.out
        try:
            saved = read(out)
        except ValueError as err:
            raise ValueError(f"out: {err}; smoothcert does not overwrite a file it did not "
                             "write: choose another --out") from None
        if saved is not None and not saved.is_own:
            raise ValueError(f"out: '{results.sidecar_path(out)}' exists and is not a "
                             "smoothcert sidecar; smoothcert does not overwrite it: choose "
                             "another --out")

    def _check_kind(self, table: results.ResultFile) -> None:
        """Refuse a file smoothcert did not write, or one of another protocol's kind."""
        if not table.own:
            raise ValueError(
                f"out: '{table.path}' exists and is not a smoothcert result file (its columns "
                f"are {' '.join(table.header)}); smoothcert does not overwrite it: choose "
                "another --out"
            )
        if table.kind != self.protocol.kind:
            raise ValueError(f"out: '{table.path}' holds {table.protocol.words} results, this "
                             f"is a {self.protocol.words} run; choose another --out")

    def _stale_error(self, path: Path, table: results.ResultFile) -> ValueError:
        """Explain why the rows of `table` are not this run's, as precisely as the files allow."""
        if table.header != self.files.header:
            what = ("smoothcert's earlier format (no method/run columns), so whether they "
                    "match cannot be checked" if not table.native else
                    f"other columns than --method {self.cfg.method} writes")
            return ValueError(f"out: '{path}' holds rows in {what}; {_FIX}")
        other = sorted({run for run in table.runs() if run != self.run_id})
        saved = read(self.files.out)  # part files have none: out's describes them
        if saved is None or saved.run not in other:
            return ValueError(
                f"out: '{path}' holds rows of another run (fingerprint {other[0]}, this run's "
                f"is {self.run_id}) and no sidecar says which settings or checkpoint differ; "
                f"{_FIX}"
            )
        return self._changed(path, saved)

    def _changed(self, path: Path, saved: Sidecar) -> ValueError:
        """What differs between the sidecar of the rows and this run's."""
        mine = self.files.sidecar
        if saved.checkpoint_sha256 != mine.checkpoint_sha256:
            return ValueError(
                f"out: '{path}' holds results of another checkpoint: sha256 "
                f"{str(saved.checkpoint_sha256)[:12]}… (from '{saved.checkpoint}'),"
                f" but '{self.cfg.checkpoint}' is {mine.checkpoint_sha256[:12]}…; {_FIX}"
            )
        if saved.denoiser_sha256 != mine.denoiser_sha256:
            return ValueError(f"out: '{path}' holds results of another denoiser: "
                              f"{_denoiser_text(saved)}, but this run's is "
                              f"{_denoiser_text(mine)}; {_FIX}")
        differ = saved.differences(mine)
        if not differ:  # its settings are this run's, its fingerprint is not theirs
            sidecar = results.sidecar_path(self.files.out)
            return ValueError(
                f"out: '{sidecar}' was edited: it records run {saved.run}, but its settings "
                f"give {saved.fingerprint()}, this run's; {_FIX}")
        return ValueError(f"out: '{path}' was written with different {', '.join(differ)}; {_FIX}")


def _denoiser_text(sidecar: Sidecar) -> str:
    if sidecar.denoiser_sha256 is None:
        return "none"
    return f"sha256 {sidecar.denoiser_sha256[:12]}… (from '{sidecar.denoiser}')"


class Runner:
    """Certifies (or predicts) the selected examples of a split into `cfg.out`."""

    def __init__(self, cfg: RunConfig, progress: bool = True, source: Source | None = None):
        """`source`: an in-memory model and dataset (`certify_dataset`); default: the files
        `cfg` names."""
        self.cfg = cfg.validate()
        self.progress = progress
        self.ctx: DistContext = init_distributed(cfg.device)
        source = source or source_from_files(cfg, self.ctx.device)
        model, self.denoiser_sha256 = self._with_denoiser(source.model.to(self.ctx.device), source)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.dataset_name, self.sigma, self.dataset = source.name, source.sigma, source.dataset
        self.smooth = Smooth(model, source.num_classes, self.sigma, amp=cfg.amp,
                             sound=cfg.sound, compile=cfg.compile)
        self.out = Path(cfg.out)
        self.protocol = cfg.protocol
        self.indices = selected_indices(len(self.dataset), cfg.skip, cfg.max)
        self._settle_compilation()
        self.sidecar = self._sidecar(source)
        self.run_id = self.sidecar.run
        self.columns = self.protocol.header(self.sidecar)
        self.files = OutputFiles(self.out, self.columns, self.sidecar)
        self.rows_kept: int | None = None  # this run's rows in the files, once it writes

    def _with_denoiser(self, model: nn.Module, source: Source) -> tuple[nn.Module, str | None]:
        """`model`, behind --denoiser if given, and the denoiser's sha256 (None without one)."""
        cfg = self.cfg
        if cfg.denoiser is None:
            return model, None
        channels = source.dataset[0][0].shape[0]  # a user's dataset has no DATASETS entry
        denoiser, digest = load_denoiser(cfg.denoiser, source.sigma, channels)
        return Denoised(denoiser.to(self.ctx.device), model), digest

    def _settle_compilation(self) -> None:
        """Compile (or fall back to eager) on one noisy copy of the first example, before the
        sidecar records which of the two runs: every row of the run is then computed alike."""
        if self.smooth.sampler.compiled is not None or not self.indices:
            return
        x = self.dataset[self.indices[0]][0]
        throwaway = torch.Generator(self.ctx.device).manual_seed(0)  # no row's stream
        with batch_memory_guard(self.cfg.batch):
            self.smooth.sampler.counts(x, 1, self.cfg.batch, throwaway)

    def _sidecar(self, source: Source) -> Sidecar:
        """The sidecar this run writes: its settings, the checkpoint's sha256, the fingerprint."""
        cfg, num_classes = self.cfg, source.num_classes
        protocol = (f"{cfg.split} split, every {cfg.skip}th example from index 0, "
                    f"{len(self.indices)} examples")
        settings = dict(
            format=results.FORMAT, mode=cfg.mode, split=cfg.split, n0=cfg.n0, n=cfg.n,
            alpha=cfg.alpha, grid=cfg.grid, skip=cfg.skip, max=cfg.max, seed=cfg.seed,
            sigma=self.sigma, dataset=self.dataset_name, amp=cfg.amp,
            compile=self.smooth.sampler.execution, num_classes=num_classes,
            checkpoint_sha256=source.checkpoint_sha256, protocol=protocol, denoiser=cfg.denoiser,
            denoiser_sha256=self.denoiser_sha256, sound=cfg.sound, **source.record)
        return Sidecar.build(cfg.extra, **{
            **settings, **self.protocol.settings(cfg, self.sigma, num_classes)})

    def part_path(self, rank: int) -> Path:
        return self.files.part_path(rank, self.ctx.world_size)

    def part_files(self) -> list[Path]:
        return self.files.part_files()

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

    def plan(self) -> Plan:
        """What is left to do, from the files alone (`ResumePlanner`). Writes nothing."""
        return ResumePlanner(self.files, self.protocol, self.cfg).plan(self.indices)

    def execute(self, plan: Plan, on_row: Callable[[], None] | None = None) -> None:
        ctx = self.ctx
        ctx.barrier()  # every rank has planned before rank 0 folds the parts into out
        if ctx.is_main and plan.discarded:
            log.warning("%s: discarding %d rows of another run (--restart-stale)", self.out,
                        plan.discarded)
        if ctx.is_main and plan.rewrite:
            self.files.fold(plan.keep)
        self.rows_kept = len(plan.keep) if ctx.is_main else 0
        ctx.barrier()
        self._process(plan.todo[ctx.rank :: ctx.world_size], self.part_path(ctx.rank), on_row)
        ctx.barrier()
        if ctx.is_main:
            self.files.finish(ctx.distributed)
        ctx.barrier()

    def _process(self, indices: Iterable[int], part: Path,
                 on_row: Callable[[], None] | None = None) -> None:
        indices = list(indices)
        certified = 0
        bar = tqdm(indices, desc=f"{self.cfg.mode} {self.out.name}",
                   disable=not (self.progress and self.ctx.is_main))
        first = self.files.write_sidecar if self.ctx.is_main else None
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
        streams = {purpose: generator(cfg.seed, purpose, idx, self.ctx.device)
                   for purpose in ("selection", "estimation", "prediction")}
        started = time.time()
        result = self.protocol.sample(self.smooth, x, cfg, self.sidecar, streams)
        return self.protocol.row(idx, int(label), time.time() - started, result, self.sidecar)


def run(cfg: RunConfig, progress: bool = True,
        on_row: Callable[[], None] | None = None) -> Path:
    return Runner(cfg, progress=progress).run(on_row)


# RunConfig's fields that name a file's model or data: an in-memory run is given them instead.
def abstention_rate(path: str | os.PathLike) -> float:
    """Fraction of rows of a PREDICT result file whose prediction is ABSTAIN."""
    predictions = results.read_results(path, kind="predict").column("predict")
    return float(np.mean(predictions == ABSTAIN)) if predictions.size else 0.0
