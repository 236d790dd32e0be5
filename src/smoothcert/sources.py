"""What a run certifies (`Source`): the model a checkpoint file holds, read with its dataset, and
the sidecar settings that say which model and data they were (a user's spec, normalisation,
class names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from . import results
from .checkpoints import ARCHITECTURES
from .data import USER_DATASETS, DatasetInfo, dataset_info, get_dataset
from .loading import USER_FILE_KINDS, Loaded, load
from .models.spec import USER_RECORD, parse_model_kwargs

if TYPE_CHECKING:
    from .runner import RunConfig


@dataclass(frozen=True)
class Source:
    """What a run certifies: a model reading [0, 1] pixels, its examples, and their names."""

    model: nn.Module
    dataset: Dataset
    name: str  # the dataset's, as the sidecar records it
    sigma: float
    num_classes: int
    checkpoint_sha256: str  # the content the results belong to
    record: dict  # the sidecar's further settings: the checkpoint, a user's model and data


def source_from_files(cfg: RunConfig, device: torch.device) -> Source:
    """The checkpoint and dataset `cfg` names."""
    # Hashed before loading: a checkpoint replaced meanwhile makes the next run recompute.
    digest = results.file_sha256(cfg.checkpoint) if os.path.isfile(cfg.checkpoint) else ""
    loaded, info = load_for_data(cfg, device)
    dataset = get_dataset(loaded.dataset, cfg.split, cfg.data_dir, augment=False,
                          data_file=cfg.data_file, image_size=info.image_size)
    record = dict(checkpoint=str(cfg.checkpoint), checkpoint_format=cfg.format, arch=cfg.arch,
                  **_user_settings(loaded, info))
    return Source(loaded.model, dataset, loaded.dataset, loaded.sigma, loaded.num_classes,
                  digest, record)


def load_for_data(cfg: RunConfig, device: torch.device) -> tuple[Loaded, DatasetInfo]:
    """The run's model (`loading.load`) with its dataset named, and that dataset's info;
    the model's classes and input are checked against the data's."""
    user = cfg.dataset in USER_DATASETS
    info = _user_data(cfg, cfg.dataset, cfg.image_size) if user else None
    loaded = load(
        cfg.checkpoint, sigma=cfg.sigma, dataset=None if user else cfg.dataset,
        num_classes=info.num_classes if user else None, model=_spec(cfg),
        model_kwargs=parse_model_kwargs(cfg.model_kwargs) if isinstance(
            cfg.model_kwargs, str) else cfg.model_kwargs,
        state_dict_key=cfg.state_dict_key, trust_pickle=cfg.trust_pickle, mean=cfg.mean,
        std=cfg.std, normalize=cfg.normalize, format=cfg.format, arch=cfg.arch,
        channels=info.channels if user else None, image_size=info.image_size if user else None,
        device=device)
    built = loaded.config.get(USER_RECORD) or {}  # a smoothcert run on a user's data
    if user:
        loaded = replace(loaded, dataset=cfg.dataset)
    elif loaded.dataset in USER_DATASETS:
        info = _user_data(cfg, loaded.dataset, cfg.image_size or built.get("image_size"))
    if loaded.dataset is None:
        raise ValueError(f"dataset: '{cfg.checkpoint}' does not say which data it was trained "
                         "on; give --dataset (mnist, cifar10, imagenet, imagefolder or npz)")
    info = info or dataset_info(loaded.dataset)
    _check_trained_classes(cfg.checkpoint, built.get("classes"), loaded.num_classes, info)
    return loaded, info


def _spec(cfg: RunConfig) -> str | None:
    """--model as a state_dict's spec; a MACER architecture's name (--model lenet) is not one,
    unless --checkpoint-format state_dict says so."""
    macer = cfg.format in ("auto", "macer") and cfg.arch in ARCHITECTURES["macer"]
    return None if macer else cfg.arch


def _user_data(cfg: RunConfig, name: str, image_size: int | None) -> DatasetInfo:
    return dataset_info(name, cfg.data_dir, data_file=cfg.data_file, image_size=image_size)


def _check_trained_classes(checkpoint: str, trained: list[str] | None, outputs: int,
                           info: DatasetInfo) -> None:
    """The model's classes against the data's: their number and (both named) their names."""
    if outputs != info.num_classes:
        raise ValueError(f"num_classes: the model in '{checkpoint}' outputs {outputs} classes, "
                         f"the data has {info.num_classes}")
    if trained and info.classes and list(info.classes) != list(trained):
        raise ValueError(f"dataset: '{checkpoint}' was trained on the classes "
                         f"{', '.join(trained)}, the data has {', '.join(info.classes)}")


def _user_settings(loaded: Loaded, info: DatasetInfo) -> dict:
    """The sidecar's record of a user's model and data: set only where they are a user's, so
    that runs on smoothcert's and the published checkpoints keep their fingerprints."""
    settings: dict = {"classes": list(info.classes) if info.classes else None,
                      "image_size": info.image_size if loaded.dataset in USER_DATASETS else None}
    if loaded.format in USER_FILE_KINDS:
        settings.update(model=loaded.config.get("model", loaded.format),
                        model_kwargs=loaded.config.get("model_kwargs") or None,
                        normalization=loaded.normalization or "none")
    return settings
