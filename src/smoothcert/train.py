"""The training loop: data -> model -> objective, with atomic checkpoints, resume, logs and DDP.

Randomness is a function of (seed, epoch): every epoch reseeds the data order, the
augmentations and the noise (smoothcert.rng streams, none shared with certification), so a
run resumed from an epoch checkpoint continues exactly as the uninterrupted run would have.
Noise is drawn for the whole global batch on every rank and each rank takes its own examples'
rows, so 1 process and N processes see the same noise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from . import __version__, rng
from .checkpoints import load_native, load_weights
from .data import get_dataset
from .distributed import DistContext, batch_memory_guard, init_distributed
from .evaluation import evaluate, evaluate_denoiser
from .io import (
    WEIGHTS_DIGEST,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    check_output_path,
    output_lock,
    read_checkpoint_state,
    remove_stale_temporaries,
    save_checkpoint,
    weights_digest,
)
from .models.spec import USER_RECORD
from .objectives import get_objective, trains_denoiser
from .presets import TrainConfig, build_network, eps_at, lr_factor, upgrade_config
from .sampling import autocast
from .training_progress import EpochBar

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
LOG = "log.jsonl"
# Options that may differ between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"epochs", "out", "workers", "device", "data_dir", "download", "eval_subset"}
# Keys every config.json smoothcert has written holds: how its own file is told from a user's.
CONFIG_SIGNATURE = {"dataset", "model", "sigma", "epochs", "seed", "out"}
# How each log line starts (json.dumps of a record whose first key is "epoch").
LOG_RECORD_START = '{"epoch": '

logger = logging.getLogger(__name__)


def read_log(path: Path) -> list[dict]:
    """The records of the training log `path` (none if missing), less a line a kill cut off.

    Raises ValueError if the file is not smoothcert's log, so that it is never overwritten.
    """
    if not path.exists():
        return []
    foreign = ValueError(
        f"out: '{path}' is not a training log smoothcert wrote; move it away or choose another "
        "--out"
    )
    try:
        *lines, last = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise foreign from None
    records = [_log_record(line) for line in lines]
    cut_off = last.startswith(LOG_RECORD_START) or LOG_RECORD_START.startswith(last)
    if None in records or not cut_off:
        raise foreign
    return records


def _log_record(line: str) -> dict | None:
    """The record of one complete log line, or None if the line is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("epoch"), int) else None


def is_own_config(path: Path) -> bool:
    """Whether `path` is a config.json smoothcert wrote (a JSON object with its keys)."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and CONFIG_SIGNATURE <= config.keys()


def first_n(dataset: Dataset, count: int) -> Dataset:
    """The first `count` examples (all when count is 0 or larger than the dataset)."""
    return Subset(dataset, range(count)) if 0 < count < len(dataset) else dataset


def check_global_batch(batch: int, world_size: int) -> None:
    if batch % world_size:
        lower, upper = batch // world_size * world_size, (batch // world_size + 1) * world_size
        nearest = " or ".join(str(b) for b in (lower, upper) if b > 0)
        raise ValueError(
            f"batch (the global batch) must be divisible by the number of processes "
            f"({world_size}), got {batch}; e.g. {nearest}"
        )


def check_batch_fits(batch: int, examples: int) -> None:
    """Refuse a batch larger than the training split: every epoch would drop its only batch."""
    if batch > examples:
        raise ValueError(
            f"batch must be at most the training split's size ({examples} examples), got {batch}"
        )


def train_loader(dataset: Dataset, cfg: TrainConfig, ctx: DistContext, epoch: int) -> DataLoader:
    """This rank's loader of `epoch`; cfg.batch was checked by check_global_batch at start-up."""
    # DistributedSampler with one replica is a seeded shuffle, so 1 and N processes agree.
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
        seed=rng.int_seed(cfg.seed, "data-order"), drop_last=True,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch // ctx.world_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )


def draw_noise(
    cfg: TrainConfig, ctx: DistContext, x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """sigma * N(0, I) of shape [B_local, k, *x.shape[1:]], this rank's rows of the global draw."""
    shape = (len(x) * ctx.world_size, cfg.k, *x.shape[1:])
    noise = torch.randn(shape, generator=generator, device=x.device, dtype=torch.float32)
    return noise[ctx.rank :: ctx.world_size].mul_(cfg.sigma)


def check_model_fits_objective(model: str, objective: str, network: nn.Module) -> None:
    """Refuse a classifier trained as a denoiser or a denoiser trained as a classifier."""
    outputs_images = getattr(network, "outputs_images", False)
    if trains_denoiser(objective) != outputs_images:
        wanted = "a denoiser (a model that outputs images" if trains_denoiser(objective) else \
            "a classifier (not a denoiser"
        raise ValueError(
            f"model: objective {objective} trains {wanted}), and {model} is not one; choose "
            "another --model or --objective"
        )


# What a checkpoint must share with a run to initialise its model (--init).
INIT_KEYS = ("model", "model_kwargs", "dataset")


def load_initial_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Load `cfg.init`'s model weights into `model`; ValueError (naming `init`) for a file that
    is not a smoothcert training checkpoint of the same architecture and classes."""
    try:
        state = read_checkpoint_state(cfg.init)
    except ValueError as err:
        raise ValueError(f"init: {err}") from None
    saved = upgrade_config(state.get("config") or {})
    if not CONFIG_SIGNATURE <= saved.keys():
        raise ValueError(f"init: '{cfg.init}' is not a checkpoint of `smoothcert train` (its "
                         f"config lacks {', '.join(sorted(CONFIG_SIGNATURE - saved.keys()))})")
    for key in INIT_KEYS:
        # A key an earlier release did not write had its default then (model_kwargs).
        recorded = saved.get(key, getattr(TrainConfig, key))
        if recorded != getattr(cfg, key):
            raise ValueError(f"init: '{cfg.init}' was trained with {key} {recorded!r}; train "
                             f"with the same {key} to start from it, got {getattr(cfg, key)!r}")
    try:
        load_weights(model, state["model"], cfg.init, f"this run's {cfg.model}")
    except CheckpointError as err:  # e.g. the data's classes differ: another head's shape
        raise ValueError(f"init: {err}") from None


class Trainer:
    """One training run in `cfg.out`: config.json, checkpoint.pt (every epoch) and log.jsonl.

    From its start until close() the run holds the output lock of `cfg.out`; use it as a
    context manager (`with Trainer(cfg) as trainer: trainer.fit()`).
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        check_output_path(self.out, "out", folder=True)
        self.progress = progress
        self.ctx = init_distributed(cfg.device)
        check_global_batch(cfg.batch, self.ctx.world_size)  # before any file is written
        device = self.ctx.device
        # The initial weights are a function of the seed too (torch's default seed is random per
        # process): a run is reproducible, and 1 and N processes start from the same weights.
        rng.seed_torch(cfg.seed, "model-init")
        model, self.record = build_network(cfg)
        model = model.to(device)
        check_model_fits_objective(cfg.model, cfg.objective, model[-1])
        if cfg.init:
            load_initial_weights(model, cfg)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: lr_factor(cfg, epoch)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.objective = get_objective(cfg.objective)
        self._load_datasets()  # before any file is written: a missing dataset leaves no run
        self._lock = contextlib.ExitStack()
        try:
            self._lock.enter_context(output_lock(self.out, holder=self.ctx.is_main))
            if self.ctx.is_main:
                for name in (CHECKPOINT, CONFIG, LOG):
                    for path in remove_stale_temporaries(self.out / name):
                        logger.info("removed '%s', left by a run killed while writing", path)
            self.start_epoch = self._restore() if resume else self._fresh()
            self.saved_epoch = self.start_epoch  # the epoch checkpoint.pt holds
            ddp_ids = [device.index] if device.type == "cuda" else None
            self.trained = DistributedDataParallel(model, device_ids=ddp_ids) \
                if self.ctx.distributed else model
        except BaseException:
            self.close()
            raise

    def _load_datasets(self) -> None:
        """The train and eval sets; with --download under torchrun, rank 0 fetches the files
        before the others read them."""
        cfg = self.cfg
        download_first = self.ctx.distributed and cfg.download
        if download_first and not self.ctx.is_main:
            self.ctx.barrier()
        self.train_set = first_n(
            get_dataset(cfg.dataset, "train", cfg.data_dir, cfg.download, **self._data_files()),
            cfg.train_subset
        )
        check_batch_fits(cfg.batch, len(self.train_set))
        self.eval_set = first_n(
            get_dataset(cfg.dataset, "test", cfg.data_dir, cfg.download, **self._data_files()),
            cfg.eval_subset
        )
        if download_first and self.ctx.is_main:
            self.ctx.barrier()

    def config(self) -> dict:
        """config.json: the TrainConfig, and a user's data as the model was built for it."""
        return {**asdict(self.cfg), **self.record}

    def _data_files(self) -> dict:
        """get_dataset's options for a user's data."""
        if not self.record:
            return {}
        return {"data_file": self.cfg.data_file,
                "image_size": self.record[USER_RECORD]["image_size"]}

    def close(self) -> None:
        """Release the output lock."""
        self._lock.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_own_files(self) -> None:
        """Refuse an --out whose config.json or log.jsonl smoothcert did not write."""
        config = self.out / CONFIG
        if config.exists() and not is_own_config(config):
            raise ValueError(
                f"out: '{config}' is not a config.json smoothcert wrote; move it away or choose "
                "another --out"
            )
        read_log(self.out / LOG)

    def _fresh(self) -> int:
        if (self.out / CHECKPOINT).exists():
            raise ValueError(
                f"out: '{self.out}' already holds a checkpoint; pass --resume to continue it or "
                "choose another --out"
            )
        self._check_own_files()
        if self.ctx.is_main:
            atomic_write_json(self.out / CONFIG, self.config())
            atomic_write_text(self.out / LOG, "")
        return 0

    def _restore(self) -> int:
        path = self.out / CHECKPOINT
        if not path.exists():
            return self._fresh()
        state = read_checkpoint_state(path, map_location=self.ctx.device)
        missing = [key for key in ("optimizer", "scheduler", "scaler", "epoch") if key not in state]
        if missing:
            raise CheckpointError(
                f"resume: '{path}' holds the model but not the training state "
                f"({', '.join(missing)}); it can be certified, not resumed: train into a new --out"
            )
        saved = upgrade_config(state["config"])
        # An option the saved config lacks is newer than the run, which did not depend on it.
        changed = {k for k, v in asdict(self.cfg).items() if saved.get(k, v) != v}
        changed -= RESUMABLE_CHANGES
        if changed:
            raise ValueError(
                f"resume: '{path}' was trained with different {', '.join(sorted(changed))}; "
                "start a new --out instead"
            )
        if int(state["epoch"]) > self.cfg.epochs:
            raise ValueError(
                f"epochs: '{path}' has already trained {int(state['epoch'])} epochs; resume it "
                f"with --epochs {int(state['epoch'])} or more, got {self.cfg.epochs}"
            )
        self._check_own_files()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        epoch = int(state["epoch"])
        if self.ctx.is_main:
            atomic_write_json(self.out / CONFIG, self.config())
            self._truncate_log(epoch)
        logger.info("resuming '%s' after epoch %d of %d", self.out, epoch, self.cfg.epochs)
        return epoch

    def _truncate_log(self, epoch: int) -> None:
        """Keep the complete log lines of the epochs the checkpoint holds, drop the rest."""
        path = self.out / LOG
        kept = [json.dumps(r) + "\n" for r in read_log(path) if r["epoch"] < epoch]
        atomic_write_text(path, "".join(kept))

    def fit(self, on_epoch: Callable[[int], None] | None = None) -> Path:
        """Train the remaining epochs; return the checkpoint path.

        `on_epoch(epoch)` is called on the main process after each epoch's checkpoint is saved.
        An interrupt (Ctrl-C, or SIGTERM turned into one) is re-raised saying what is kept.
        """
        try:
            self._fit(on_epoch)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(self.kept()) from None
        return self.out / CHECKPOINT

    def kept(self) -> str:
        """What an interrupted run leaves in its --out."""
        if self.saved_epoch == 0:
            return f"no epoch finished: no checkpoint in '{self.out}'"
        return f"checkpoint of epoch {self.saved_epoch} kept in '{self.out / CHECKPOINT}'"

    def _fit(self, on_epoch: Callable[[int], None] | None) -> None:
        for epoch in range(self.start_epoch, self.cfg.epochs):
            started = time.time()
            record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            with batch_memory_guard(self.cfg.batch, multiple_of=self.ctx.world_size):
                record.update(self.train_epoch(epoch))
            self.scheduler.step()
            if self.ctx.is_main:
                if self.cfg.eval_subset:
                    record.update(self._evaluate(epoch))
                record["time"] = time.time() - started
                # Log line first, checkpoint second: a kill between the two leaves a line for an
                # epoch the checkpoint lacks, which resume drops; the other order lost the line.
                with open(self.out / LOG, "a") as log_file:
                    log_file.write(json.dumps(record) + "\n")
                self._save(epoch + 1)
                self.saved_epoch = epoch + 1
                if on_epoch is not None:
                    on_epoch(epoch)
            self.ctx.barrier()
            self.saved_epoch = epoch + 1  # on every rank, once rank 0 has saved it

    def _evaluate(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        measure = evaluate_denoiser if trains_denoiser(cfg.objective) else evaluate
        return measure(
            self.model, self.eval_set, cfg.sigma, self.ctx.device, 500,
            rng.int_seed(cfg.seed, "eval-noise", epoch),
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        rng.seed_torch(cfg.seed, "training", epoch)
        noise_gen = rng.generator(cfg.seed, "training-noise", epoch, ctx.device)
        objective_cfg = cfg.objective_config(epoch)
        loader = train_loader(self.train_set, cfg, ctx, epoch)
        sums: dict[str, torch.Tensor] = {}  # the loss and the objective's terms (no per-step sync)
        self.trained.train()
        with EpochBar(len(loader), epoch, cfg.epochs, self.progress and ctx.is_main) as bar:
            for x, y in loader:
                x = x.to(ctx.device, non_blocking=True)
                y = y.to(ctx.device, non_blocking=True)
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                noise = draw_noise(cfg, ctx, x, noise_gen)
                with autocast(ctx.device, cfg.amp):
                    loss, terms = self.objective(self.trained, x, y, noise, objective_cfg)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                for key, value in {"loss": loss, **terms}.items():
                    sums[key] = sums.get(key, 0) + value.detach().float()
                bar.step(sums)
        keys = sorted(sums)
        totals = torch.stack([sums[key] for key in keys]) if keys else torch.zeros(0)
        if ctx.distributed:  # the logged means are over the global batch, as with 1 process
            dist.all_reduce(totals)
            totals /= ctx.world_size
        steps = max(len(loader), 1)
        means = dict(zip(keys, (totals / steps).tolist(), strict=True))
        if "acc" in means:
            means["train_acc"] = means.pop("acc")
        # "batches", not "steps": that is the PGD steps' name; eps only where there is an attack
        attack = {"eps": eps_at(cfg, epoch)} if hasattr(objective_cfg, "eps") else {}
        return {**means, **attack, "batches": steps}

    def _save(self, epoch: int) -> None:
        weights = self.model.state_dict()
        save_checkpoint(
            self.out / CHECKPOINT,
            {
                "model": weights,
                WEIGHTS_DIGEST: weights_digest(weights),  # verified by io.read_checkpoint_state
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "config": self.config(),
                "version": __version__,
            },
        )


def require_checkpoint(out: str | Path) -> None:
    """`train --resume`: refuse an --out with no checkpoint to continue (the library's
    resume=True starts a fresh run there, which the demo and the studies rely on)."""
    if not (Path(out) / CHECKPOINT).is_file():
        raise ValueError(
            f"resume: '{out}' holds no {CHECKPOINT} to continue; drop --resume to start a new "
            "run there, or give --out the folder of the run to continue"
        )


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training as configured; return the checkpoint path."""
    with Trainer(cfg, resume=resume, progress=progress) as trainer:
        return trainer.fit()


def load_model(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """The trained model of a checkpoint (in eval mode) and its config (today's key names)."""
    model, config = load_native(checkpoint, device)
    return model, upgrade_config(config)
