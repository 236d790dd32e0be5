"""Inference backends against torch.compile: is OpenVINO or ONNX Runtime worth adopting?

Issue 26 adopts another backend only if it runs the base classifier >= 1.2x faster than
torch.compile (inductor, freezing, static shapes: what `--compile` runs) on a model that
matters. This times the forward pass alone (argmax included) of one fixed noisy batch, at the
thread count given, interleaved:

- eager fp32 / eager bf16 (autocast): what certify runs without --compile;
- compile fp32 / compile bf16: `--compile` and `--compile --amp bf16` (sampling.CastNetwork);
- OpenVINO fp32 / bf16 (INFERENCE_PRECISION_HINT) and ONNX Runtime fp32, both reading the
  model exported by `torch.onnx.export` (static batch).

A second table times what certify runs end to end, `NoiseSampler.counts` (noise, forward
pass, argmax, counting) with compile=False, True and "openvino", fp32 and bf16, interleaved on
the same input and generator: the speed of `--openvino` against eager and against
`--compile` at the same precision.

A backend that is not installed (`pip install openvino onnxruntime onnx onnxscript`) or fails
to convert gets a row saying so. Printed: microseconds per sample and the speed against the
faster compiled variant of the same precision (> 1: the backend is faster).

    python benchmarks/bench_backends.py --threads 1
    python benchmarks/bench_backends.py --models lenet --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import Table, emit, interleaved, machine_info, median, parse_args, setup, spread
from _loops import LABELS, make_input, make_model

from smoothcert.sampling import CastNetwork, NoiseSampler

DATASETS = {"lenet": "mnist", "cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10"}
BATCH = {"lenet": 1000, "cifar_resnet20": 250, "cifar_resnet110": 100}
COLUMNS = ["model", "backend", "precision", "µs/sample", "±", "vs compile (same precision)"]
SAMPLING_COLUMNS = ["model", "precision", "eager µs/sample", "--compile", "--openvino",
                    "openvino vs eager", "±", "openvino vs compile", "±"]
COMPILERS = {"eager": False, "compile": True, "openvino": "openvino"}


def torch_variants(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, Callable]:
    """Eager and compiled forward passes, fp32 and bf16, each returning the argmax."""
    def eager_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(batch).argmax(1)

    compiled = torch.compile(model, dynamic=False, fullgraph=True, options={"freezing": True})
    cast = torch.compile(CastNetwork(model, torch.bfloat16), dynamic=False, fullgraph=True,
                         options={"freezing": True})
    return {("eager", "fp32"): lambda: model(batch).argmax(1), ("eager", "bf16"): eager_bf16,
            ("compile", "fp32"): lambda: compiled(batch).argmax(1),
            ("compile", "bf16"): lambda: cast(batch).argmax(1)}


def export_onnx(model: torch.nn.Module, batch: torch.Tensor, folder: Path) -> Path:
    """The model as ONNX (static batch), which both other backends read."""
    path = folder / "model.onnx"
    torch.onnx.export(model, (batch,), str(path), input_names=["x"], dynamo=False)
    return path


def openvino_variants(path: Path, batch: torch.Tensor, threads: int) -> dict:
    import openvino

    converted = openvino.convert_model(str(path))  # the direct torch route fails on ResNets'
    core, array = openvino.Core(), batch.numpy()  # avg_pool2d of a size read off the input
    found = {}
    for precision in ("fp32", "bf16"):
        network = core.compile_model(converted, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision.replace(
                "fp", "f")})
        found[("OpenVINO", precision)] = lambda n=network: n(array)[0].argmax(1)
    return found


def onnxruntime_variants(path: Path, batch: torch.Tensor, threads: int) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy
    # waiting between calls, which would take the core from the other variants
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    array = batch.numpy()
    return {("ONNX Runtime", "fp32"): lambda: session.run(None, {"x": array})[0].argmax(1)}


def measure(name: str, threads: int, reps: int, table: Table) -> None:
    dataset, size = DATASETS[name], BATCH[name]
    model = make_model(name, dataset, channels_last=True).eval()
    x = make_input(dataset)
    batch = (x + 0.5 * torch.randn(size, *x.shape)).clamp(0, 1).contiguous()
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        variants = torch_variants(model, batch)
        for backend, build in (("OpenVINO", openvino_variants),
                               ("ONNX Runtime", onnxruntime_variants)):
            try:
                variants.update(build(export_onnx(model, batch, Path(folder)), batch, threads))
            except Exception as err:  # not installed, or the model did not convert
                reason = (str(err).strip().splitlines() or [""])[0][:60]
                table.add(LABELS[name], backend, "-", "-", "-",
                          f"not run: {type(err).__name__}: {reason}")
        for run in variants.values():  # warm-up: compiles, converts, allocates
            run()
        times = interleaved(variants, reps)
    for (backend, precision), values in times.items():
        compiled = median(times[("compile", precision)])
        table.add(LABELS[name], backend, precision, median(values) / size * 1e6,
                  f"{spread(values):.0%}", f"{compiled / median(values):.2f}x")


def measure_sampling(name: str, reps: int, table: Table) -> None:
    """NoiseSampler.counts per compiler, fp32 and bf16, interleaved (about 2 s a call)."""
    dataset, size = DATASETS[name], BATCH[name]
    model, x = make_model(name, dataset, channels_last=True), make_input(dataset)
    for amp in (None, "bf16"):
        samplers = {k: NoiseSampler(model, 10, 0.25, amp=amp, compile=c)
                    for k, c in COMPILERS.items()}
        generator = torch.Generator().manual_seed(0)
        for sampler in samplers.values():  # compiles; then one call's size
            sampler.counts(x, size, size, generator)
        started = time.perf_counter()
        samplers["eager"].counts(x, size, size, generator)
        n = size * max(1, round(2.0 / (time.perf_counter() - started)))
        times = interleaved({k: lambda s=s, n=n, g=generator: s.counts(x, n, size, g)
                             for k, s in samplers.items()}, reps)
        per = {k: median(v) / n * 1e6 for k, v in times.items()}
        ratios = {k: [a / b for a, b in zip(times[k], times["openvino"], strict=True)]
                  for k in ("eager", "compile")}
        table.add(LABELS[name], amp or "fp32", per["eager"], per["compile"], per["openvino"],
                  f"{median(ratios['eager']):.2f}x", f"{spread(ratios['eager']):.0%}",
                  f"{median(ratios['compile']):.2f}x", f"{spread(ratios['compile']):.0%}")


def main(argv=None) -> list[Table]:
    def extra(parser):
        parser.add_argument("--models", default="lenet,cifar_resnet20",
                            help="comma-separated, of " + ", ".join(DATASETS))
        parser.add_argument("--reps", type=int, default=7)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    settings = setup(args.threads or 1)
    table = Table("backends", f"Forward pass per sample by backend, {settings['threads']} "
                  "thread(s), channels_last model, interleaved", COLUMNS)
    sampling = Table("sampling", "NoiseSampler.counts (what certify runs) eager, --compile and "
                     f"--openvino, {settings['threads']} thread(s), interleaved",
                     SAMPLING_COLUMNS)
    reps = 2 if args.quick else args.reps
    for name in args.models.split(","):
        measure(name, settings["threads"], reps, table)
        measure_sampling(name, reps, sampling)
    table.notes.append("vs compile: the compiled variant's median time / this one's (> 1: "
                       "faster than --compile); ±: half the relative range of the repetitions")
    sampling.notes.append("µs per sample (median); ratios: medians of the per-repetition "
                          "ratios (> 1: --openvino is faster)")
    emit([table, sampling], args.json, {**machine_info(), **settings})
    return [table, sampling]


if __name__ == "__main__":
    main(sys.argv[1:])
