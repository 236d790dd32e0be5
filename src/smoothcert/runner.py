"""Certify or predict over a dataset: one TSV row per example, flushed as produced, resumable.

Rows start with the columns of Cohen et al.'s certify.py (`idx label predict radius correct
time`, the radius at full precision), so their analysis scripts read our files; the T-CERTIFY
groups and the raw counts follow. Under torchrun each rank certifies every world_size-th
example into its own part file and rank 0 merges the parts in index order. Each example's
noise comes from a generator seeded by (seed, idx), so results do not depend on the sharding.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import dataset_info, get_dataset
from .distributed import DistContext, init_distributed
from .io import atomic_write_json, atomic_write_text
from .rng import generator
from .smooth import Smooth
from .stats import ABSTAIN, Certificate, check_alpha, check_positive_int
from .train import load_model

COHEN_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
GROUP_FIELDS = ["predict", "radius", "correct", "alpha", "pa_lower", "pb_upper"]
COUNT_COLUMNS = ["n0", "n", "count_a", "count_b", "counts"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time"]
# What the six main columns hold and which extra groups follow, for each --method.
CERTIFY_LAYOUTS = {
    "certify": ("certify", []),
    "tcertify": ("tcertify", ["strict"]),
    "both": ("certify", ["tcertify", "strict"]),
}


@dataclass
class RunConfig:
    """A certify or predict run over a dataset split."""

    checkpoint: str
    out: str
    mode: str = "certify"  # or "predict"
    method: str = "both"
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
    data_dir: str | None = None
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> RunConfig:
        if self.mode not in ("certify", "predict"):
            raise ValueError(f"mode must be certify or predict, got {self.mode!r}")
        if self.method not in CERTIFY_LAYOUTS:
            raise ValueError(
                f"method must be one of {', '.join(CERTIFY_LAYOUTS)}, got {self.method!r}"
            )
        check_alpha(self.alpha)
        for name in ("n0", "n", "batch", "grid", "skip"):
            check_positive_int(getattr(self, name), name)
        if self.max is not None and self.max < 0:
            self.max = None  # Cohen's -1: no limit
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        return self

    def columns(self) -> list[str]:
        if self.mode == "predict":
            return PREDICT_COLUMNS
        _, groups = CERTIFY_LAYOUTS[self.method]
        return COHEN_COLUMNS + [f"{g}_{f}" for g in groups for f in GROUP_FIELDS] + COUNT_COLUMNS

    def identity(self) -> dict:
        """The settings a resumed run must share with the run that wrote the file."""
        keys = ("checkpoint", "mode", "method", "split", "n0", "n", "alpha", "grid", "skip",
                "seed", "sigma", "dataset", "amp")
        return {key: getattr(self, key) for key in keys}


def selected_indices(length: int, skip: int, limit: int | None) -> list[int]:
    """Every `skip`-th index from 0; `limit` is a count of examples (not Cohen's index)."""
    indices = list(range(0, length, skip))
    return indices if limit is None else indices[:limit]


def read_rows(path: Path, columns: list[str]) -> dict[int, str]:
    """The complete rows of a (possibly cut-off) result file, by example index."""
    if not path.exists():
        return {}
    text = path.read_text()
    lines = text.split("\n")
    if not lines or lines[0] != "\t".join(columns):
        raise ValueError(
            f"out: '{path}' exists with other columns than this run writes; remove it or choose "
            "another --out"
        )
    rows = {}
    for line in lines[1:-1]:  # the last piece has no newline yet: an unfinished row, or empty
        fields = line.split("\t")
        if len(fields) == len(columns):
            rows[int(fields[0])] = line
    return rows


def write_rows(path: Path, columns: list[str], rows: dict[int, str]) -> None:
    body = "".join(rows[i] + "\n" for i in sorted(rows))
    atomic_write_text(path, "\t".join(columns) + "\n" + body)


def format_group(cert: Certificate, label: int) -> list[str]:
    return [str(cert.label), repr(cert.radius), str(int(cert.label == label)),
            repr(cert.alpha_prime), repr(cert.pa_lower), repr(cert.pb_upper)]


def format_counts(selection: np.ndarray, estimation: np.ndarray, top: int) -> list[str]:
    others = np.delete(estimation, top)
    sparse = ",".join(f"{c}:{int(estimation[c])}" for c in np.flatnonzero(estimation))
    return [str(int(selection.sum())), str(int(estimation.sum())), str(int(estimation[top])),
            str(int(others.max())), sparse]


def elapsed(seconds: float) -> str:
    return str(datetime.timedelta(seconds=seconds))


class Runner:
    """Certifies (or predicts) the selected examples of a split into `cfg.out`."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg = cfg.validate()
        self.progress = progress
        self.ctx: DistContext = init_distributed(cfg.device)
        model, train_config = load_model(cfg.checkpoint, self.ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.dataset_name = cfg.dataset or train_config["dataset"]
        self.sigma = cfg.sigma if cfg.sigma is not None else float(train_config["sigma"])
        self.smooth = Smooth(model, dataset_info(self.dataset_name).num_classes, self.sigma,
                             amp=cfg.amp)
        self.dataset = get_dataset(self.dataset_name, cfg.split, cfg.data_dir, augment=False)
        self.out = Path(cfg.out)
        self.columns = cfg.columns()

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

    def finished_rows(self) -> dict[int, str]:
        """The complete rows in out and in every part file, by example index."""
        rows = read_rows(self.out, self.columns)
        for part in self.part_files():
            rows.update(read_rows(part, self.columns))
        return rows

    def run(self) -> Path:
        cfg, ctx = self.cfg, self.ctx
        # Every rank reads out and the parts an interrupted run left (whatever its world size),
        # so a foreign file fails every rank alike, before the sidecar is touched.
        done = self.finished_rows()
        self._check_sidecar()
        ctx.barrier()  # all have read the parts before rank 0 folds them into out
        if ctx.is_main:
            self._merge(done)  # also drops a row cut off mid-write
        ctx.barrier()
        todo = [i for i in selected_indices(len(self.dataset), cfg.skip, cfg.max) if i not in done]
        mine = todo[ctx.rank :: ctx.world_size]
        part = self.part_path(ctx.rank)
        if ctx.distributed:
            write_rows(part, self.columns, {})
        self._process(mine, part)
        ctx.barrier()
        if ctx.is_main and ctx.distributed:
            self._merge()
        ctx.barrier()
        return self.out

    def _check_sidecar(self) -> None:
        sidecar = self.out.with_name(self.out.name + ".json")
        cfg = self.cfg
        main = CERTIFY_LAYOUTS[cfg.method][0] if cfg.mode == "certify" else "predict"
        n_examples = len(selected_indices(len(self.dataset), cfg.skip, cfg.max))
        protocol = (f"{cfg.split} split, every {cfg.skip}th example from index 0, "
                    f"{n_examples} examples")
        # "method" names the main columns' method (analyze labels curves with it); sigma and
        # dataset are the values in force (the checkpoint's unless overridden).
        meta = {**cfg.identity(), **cfg.extra, "method": main,
                "sigma": self.sigma, "dataset": self.dataset_name, "protocol": protocol}
        if sidecar.exists() and (self.out.exists() or self.part_files()):
            # Compare with what this run would write, not with cfg.identity(): the method option
            # ("both") and an inherited sigma/dataset (None) are resolved in meta.
            saved = json.loads(sidecar.read_text())
            differ = [k for k in cfg.identity() if saved.get(k) != meta[k]]
            if differ:
                raise ValueError(
                    f"out: '{self.out}' was written with different {', '.join(differ)}; remove it "
                    "or choose another --out"
                )
        if self.ctx.is_main:
            atomic_write_json(sidecar, meta)

    def _process(self, indices: Iterable[int], part: Path) -> None:
        indices = list(indices)
        certified = 0
        bar = tqdm(indices, desc=f"{self.cfg.mode} {self.out.name}",
                   disable=not (self.progress and self.ctx.is_main))
        with open(part, "a") as handle:
            for count, idx in enumerate(bar, start=1):
                row, ok = self._row(idx)
                handle.write("\t".join(row) + "\n")
                handle.flush()
                certified += ok
                bar.set_postfix(correct=f"{certified}/{count}")

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
            ok = prediction == label
            return [str(idx), str(label), str(prediction), str(int(ok)),
                    elapsed(time.time() - started)], ok
        result = self.smooth.certify_all(x, cfg.n0, cfg.n, cfg.alpha, cfg.batch, cfg.grid,
                                         generator=streams["selection"],
                                         estimation_generator=streams["estimation"])
        main_name, groups = CERTIFY_LAYOUTS[cfg.method]
        main = getattr(result, main_name)
        ok = main.label == label
        row = [str(idx), str(label), str(main.label), repr(main.radius), str(int(ok)),
               elapsed(time.time() - started)]
        for group in groups:
            row += format_group(getattr(result, group), label)
        top = int(np.argmax(result.selection_counts))
        row += format_counts(result.selection_counts, result.estimation_counts, top)
        return row, ok

    def _merge(self, rows: dict[int, str] | None = None) -> None:
        """Write the finished rows (or `rows`, which hold them) into out, then remove the parts."""
        parts = self.part_files()
        write_rows(self.out, self.columns, self.finished_rows() if rows is None else rows)
        for part in parts:
            part.unlink(missing_ok=True)


def run(cfg: RunConfig, progress: bool = True) -> Path:
    return Runner(cfg, progress=progress).run()


def abstention_rate(path: str | os.PathLike) -> float:
    """Fraction of rows of a result file whose prediction is ABSTAIN."""
    lines = Path(path).read_text().splitlines()[1:]
    predictions = [int(line.split("\t")[2]) for line in lines]
    return sum(p == ABSTAIN for p in predictions) / max(len(predictions), 1)
