"""`certify_dataset` and `predict_dataset`: the runner's loop (result file, sidecar, resume,
`verify`, torchrun) on an in-memory model and any torch Dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .io import weights_digest
from .runner import RunConfig, Runner
from .sampling import eval_mode, model_device
from .sources import Source

_FILE_OPTIONS = {"checkpoint", "mode", "format", "arch", "model_kwargs", "state_dict_key",
                 "trust_pickle", "mean", "std", "normalize", "dataset", "data_dir", "data_file",
                 "image_size", "split"}


def certify_dataset(model: nn.Module, dataset: Dataset, *, sigma: float, out: str | os.PathLike,
                    num_classes: int | None = None, name: str | None = None,
                    progress: bool = False, **options: Any) -> Path:
    """Certify each example of `dataset` ((x, label) pairs, x in [0, 1]) with `model` smoothed
    at `sigma`, into result file `out`: `smoothcert certify`'s loop (resume, `verify`, torchrun)
    on an in-memory model. `options` are RunConfig's sampling settings (n0, n, alpha, batch,
    skip, max, seed, method, amp, compile, device, radii, ...). The sidecar identifies the
    model by its state_dict's sha256 and the data by `name` (default: the dataset's class
    name); the number of classes is the model's output on the first example (`num_classes`,
    if given, must agree).
    """
    return _run_in_memory("certify", model, dataset, sigma, out, num_classes, name, progress,
                          options)


def predict_dataset(model: nn.Module, dataset: Dataset, *, sigma: float, out: str | os.PathLike,
                    num_classes: int | None = None, name: str | None = None,
                    progress: bool = False, **options: Any) -> Path:
    """Cohen's PREDICT over `dataset`, as `certify_dataset` certifies."""
    return _run_in_memory("predict", model, dataset, sigma, out, num_classes, name, progress,
                          options)


def _run_in_memory(mode: str, model: nn.Module, dataset: Dataset, sigma: float,
                   out: str | os.PathLike, num_classes: int | None, name: str | None,
                   progress: bool, options: dict[str, Any]) -> Path:
    named = sorted(_FILE_OPTIONS & set(options))
    if named:
        raise TypeError(f"{mode}_dataset: {', '.join(named)} name a file's model or data; "
                        "pass the model and dataset themselves")
    shown = f"<{type(model).__name__} in memory>"
    cfg = RunConfig(checkpoint=shown, out=str(out), mode=mode, sigma=sigma, **options)
    source = Source(model, dataset, name or type(dataset).__name__, sigma,
                    _model_classes(model, dataset, num_classes), state_dict_sha256(model),
                    {"checkpoint": shown, "checkpoint_format": "in-memory"})
    return Runner(cfg, progress=progress, source=source).run()


def _model_classes(model: nn.Module, dataset: Dataset, given: int | None) -> int:
    """The number of classes `model` outputs on `dataset`'s first example, checked."""
    if len(dataset) == 0:
        raise ValueError("dataset: holds no examples")
    x = torch.as_tensor(dataset[0][0])
    with torch.no_grad(), eval_mode(model):
        logits = model(x.unsqueeze(0).to(model_device(model)))
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ValueError(f"model: must return logits [batch, classes]; on the first example "
                         f"(shape {list(x.shape)}, batched) it returns {list(logits.shape)}")
    if given is not None and given != logits.shape[1]:
        raise ValueError(f"num_classes: the model outputs {logits.shape[1]} classes, "
                         f"num_classes is {given}")
    return int(logits.shape[1])


def state_dict_sha256(model: nn.Module) -> str:
    """The sha256 of `model`'s state_dict (`io.weights_digest`: names, dtypes, shapes, values)."""
    return weights_digest(model.state_dict())
