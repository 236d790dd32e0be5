"""The base classifier run by OpenVINO (`--openvino`; the optional extra smoothcert[openvino]).

The model is exported to ONNX with a static batch (torch.onnx.export, whose constant folding
gives OpenVINO the simpler graph: LeNet's input standardisation folded, its adaptive pooling
a fixed one), read by OpenVINO and compiled for the CPU at the precision of `amp` (float32,
or OpenVINO's bf16 / f16 inference precision, which decides per operation what runs in low
precision: another network than torch's autocast, recorded as such). The compiled network
takes exactly `batch` inputs, like inductor's static graph.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .extras import import_extra

PRECISION_HINTS = {None: "f32", "bf16": "bf16", "fp16": "f16"}


def require_openvino(device: torch.device) -> ModuleType:
    """The openvino module, once the extra is installed and the model is on the CPU;
    MissingExtraError / ValueError saying which is not."""
    openvino = import_extra("openvino", "openvino", "--openvino")
    import_extra("onnx", "openvino", "--openvino")  # torch.onnx.export writes with it
    if device.type != "cpu":
        raise ValueError(f"--openvino runs the base classifier on the CPU, got device "
                         f"{device} (use --device cpu)")
    return openvino


def openvino_network(model: nn.Module, batch: torch.Tensor, amp: str | None,
                     threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` compiled by OpenVINO for inputs shaped like `batch` (CPU, float32 in, float32
    logits out), on `threads` threads at amp's precision."""
    openvino = require_openvino(batch.device)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), \
            torch.autocast(batch.device.type, enabled=False):  # the float32 network: OpenVINO
        warnings.simplefilter("ignore")  # applies amp; the exporter's deprecation notes
        path = Path(folder) / "model.onnx"
        torch.onnx.export(model, (batch,), str(path), input_names=["x"], dynamo=False)
        converted = openvino.convert_model(str(path))
    network = openvino.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": PRECISION_HINTS[amp]})

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return torch.tensor(network(inputs.numpy())[0])  # a copy: OpenVINO reuses its buffer

    return forward
