"""The offline end-to-end job on the shipped MNIST: train Basic and ADREREG, certify, report.

The default setting is the one where the reproduction study (docs/reproduction.md) found
both of the paper's effects: sigma = 1.0, where ADREREG's gain lives at radii 1.5-2.5 and
T-CERTIFY's gain over CERTIFY is largest. Every number and every sentence of the report's
conclusion is computed from this run's result files. Every stage resumes, and a stage whose
inputs changed (another checkpoint, other settings) is redone rather than mixed.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from .analyze import (
    ResultCurve,
    format_table,
    load_results,
    paired_difference,
    paired_radius_difference,
    plot_curves,
    save_figure,
)
from .io import atomic_write_json, atomic_write_text
from .results import METHOD_LABELS

if TYPE_CHECKING:  # both import torch, which the report's functions do not need
    from .presets import TrainConfig
    from .runner import RunConfig

log = logging.getLogger(__name__)

GAIN_RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
MNIST_SIZES = {"train": 60_000, "test": 10_000}  # images of the shipped MNIST
# Relative cost of one noisy training copy (forward + backward) against one certification
# sample (forward only under inference mode): measured on LeNet, bf16, 2 threads.
TRAIN_PASS_COST = 3.0


@dataclass(frozen=True)
class DemoModel:
    name: str
    label: str
    train: dict


def demo_models(args: argparse.Namespace) -> list[DemoModel]:
    """Basic (Gaussian augmentation, one draw) and ADREREG (the paper's Table-1 variant)."""
    common = dict(sigma=args.sigma, epochs=args.epochs, lr=args.lr,
                  lr_step=max(1, args.epochs - 1), train_subset=args.train_subset,
                  eval_subset=1000, seed=args.seed, amp=_amp(args), channels_last=True)
    return [
        DemoModel("basic", "Basic", dict(common, objective="gaussian", k=1)),
        DemoModel("adre", f"ADREREG λ={args.lam}",
                  dict(common, objective="adre", k=args.k, lam=args.lam, single_draw=True)),
    ]


def _amp(args: argparse.Namespace) -> str | None:
    return None if args.amp == "none" else args.amp


@dataclass(frozen=True)
class DemoStage:
    """One model's training run and its certification, both validated."""

    model: DemoModel
    train: TrainConfig
    certify: RunConfig


def plan_demo(args: argparse.Namespace) -> list[DemoStage]:
    """Every stage's settings, checked before anything loads: a bad option (e.g. --k 0, which
    only the second model reads) is refused at once, not after minutes of training."""
    from .presets import resolve_config
    from .rng import seed_sequence
    from .runner import RunConfig
    from .train import CHECKPOINT

    _check_range("--train-subset", args.train_subset, 0, MNIST_SIZES["train"], "(0: all)")
    _check_range("--skip", args.skip, 1, MNIST_SIZES["test"])
    most = -(-MNIST_SIZES["test"] // args.skip)
    _check_range("--max-examples", args.num_certify, 1, most,
                 f"(every {args.skip}th of the {MNIST_SIZES['test']:,} test images)")
    seed_sequence(args.seed, "model-init")  # the seed's range
    out = Path(args.out)
    stages = []
    for model in demo_models(args):
        folder = out / model.name
        certify = RunConfig(
            checkpoint=str(folder / CHECKPOINT), out=str(out / f"{model.name}.tsv"),
            method="both", n0=args.n0, n=args.n, alpha=args.alpha, batch=args.batch,
            skip=args.skip, max=args.num_certify, seed=args.seed, amp=_amp(args),
            # a retrained model or new settings: recompute, never mix
            restart_if_stale=True, extra={"label": model.label},
        ).validate()
        stages.append(DemoStage(model, resolve_config("mnist-lenet", out=str(folder),
                                                      **model.train), certify))
    return stages


def _check_range(option: str, value: int, low: int, high: int, note: str = "") -> None:
    if not low <= value <= high:
        raise ValueError(f"{option} must be an integer in [{low}, {high:,}] {note}".rstrip()
                         + f", got {value}")


class OverallProgress:
    """One progress line for the whole job: the stage, work done and an estimate of time left.

    Work is counted in network passes (a training copy weighs TRAIN_PASS_COST certification
    samples), so tqdm's rate, and with it the time left, carries over from stage to stage.
    """

    def __init__(self, total: float, enabled: bool):
        self.bar = tqdm(total=round(total), unit="pass", unit_scale=True, disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def stage(self, text: str) -> None:
        self.bar.set_description_str(f"[demo] {text}")
        log.info("%s", text)

    def advance(self, passes: float) -> None:
        self.bar.update(round(passes))

    @property
    def done(self) -> int:
        return self.bar.n

    def skip(self, passes: float) -> None:
        """Work a resumed run finds already done: out of the total, not counted as speed."""
        self.bar.total = max(self.bar.n, self.bar.total - round(passes))
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _training_passes(model: DemoModel, train_size: int) -> float:
    return TRAIN_PASS_COST * model.train["epochs"] * train_size * model.train["k"]


def run_demo(args: argparse.Namespace, progress: bool = True) -> Path:
    """Train, certify and report as the arguments say; return the report's path."""
    from .data import get_dataset
    from .runner import run
    from .train import Trainer

    stages = plan_demo(args)
    out = Path(args.out)
    started = time.time()
    models = [stage.model for stage in stages]
    train_size = args.train_subset or len(get_dataset("mnist", "train"))
    per_example = args.n0 + args.n
    total = sum(_training_passes(m, train_size) for m in models)
    total += len(models) * args.num_certify * per_example
    bar = OverallProgress(total, progress)
    try:
        for stage in stages:
            bar.stage(f"training {stage.model.label}")
            per_epoch = _training_passes(stage.model, train_size) / stage.train.epochs
            with Trainer(stage.train, resume=True, progress=False) as trainer:
                bar.skip(trainer.start_epoch * per_epoch)
                trainer.fit(on_epoch=lambda _epoch, e=per_epoch: bar.advance(e))
            bar.stage(f"certifying {stage.model.label}")
            before = bar.done
            run(stage.certify, progress=False, on_row=lambda: bar.advance(per_example))
            bar.skip(args.num_certify * per_example - (bar.done - before))
        bar.stage("writing the report")
        results = [Path(stage.certify.out) for stage in stages]
        report = write_report(args, out, models, results, time.time() - started)
    finally:
        bar.close()
    log.info("report: %s", report)
    return report


def write_report(args: argparse.Namespace, out: Path, models: list[DemoModel],
                 results: list[Path], seconds: float) -> Path:
    """report.md, certified_accuracy.png, examples.png and summary.json in `out`."""
    curves = {model.name: load_results(path) for model, path in zip(models, results, strict=True)}
    by_method = {name: {c.method: c for c in group} for name, group in curves.items()}
    plot = out / "certified_accuracy.png"
    all_curves = [c for group in curves.values() for c in group]
    plot_curves(all_curves, plot, title=f"MNIST, σ = {args.sigma}: Basic vs ADREREG")
    examples = out / "examples.png"
    plot_examples(args, models, by_method, examples)
    radii = np.asarray(GAIN_RADII)
    adre_gain = paired_difference(by_method["adre"]["certify"], by_method["basic"]["certify"],
                                  radii)
    tcert_gain = {name: paired_radius_difference(m["tcertify"], m["certify"])
                  for name, m in by_method.items()}
    strict_gain = {name: paired_radius_difference(m["tcertify-strict"], m["certify"])
                   for name, m in by_method.items()}
    conclusion = conclusions(radii, adre_gain, tcert_gain, strict_gain,
                             {m.name: m.label for m in models})
    summary = {
        "settings": vars(args) | {"no_progress": None},
        "radii": radii.tolist(),
        "adre_minus_basic": {"mean": adre_gain[0].tolist(), "se": adre_gain[1].tolist()},
        "tcertify_minus_certify_acr": {k: list(v) for k, v in tcert_gain.items()},
        "strict_minus_certify_acr": {k: list(v) for k, v in strict_gain.items()},
        "conclusion": conclusion,
        "wall_seconds_of_this_run": seconds,
    }
    atomic_write_json(out / "summary.json", summary)
    report = out / "report.md"
    atomic_write_text(report, render_report(args, models, all_curves, radii, adre_gain,
                                            tcert_gain, strict_gain, conclusion, seconds))
    for line in conclusion:
        log.info("%s", line)
    return report


def _radii_or_zero(curve: ResultCurve) -> np.ndarray:
    return np.where(curve.correct, curve.radius, 0.0)


def _significant(mean: float, se: float) -> bool:
    return abs(mean) > 2 * se


def conclusions(radii: np.ndarray, adre_gain: tuple[np.ndarray, np.ndarray],
                tcert_gain: dict, strict_gain: dict, labels: dict[str, str]) -> list[str]:
    """Sentences computed from the measured differences (two standard errors = significant)."""
    lines = []
    means, ses = adre_gain
    above = [i for i in range(len(radii)) if _significant(means[i], ses[i]) and means[i] > 0]
    below = [i for i in range(len(radii)) if _significant(means[i], ses[i]) and means[i] < 0]
    for i in above:
        lines.append(f"ADREREG certifies {100 * means[i]:.1f} ± {100 * ses[i]:.1f} points more "
                     f"than Basic at r = {radii[i]:.2f} (beyond two standard errors).")
    for i in below:
        lines.append(f"ADREREG certifies {100 * -means[i]:.1f} ± {100 * ses[i]:.1f} points "
                     f"fewer than Basic at r = {radii[i]:.2f} (beyond two standard errors).")
    rest = [f"{radii[i]:.2f}" for i in range(len(radii)) if i not in above + below]
    if rest:
        lines.append(f"At r = {', '.join(rest)} the difference between ADREREG and Basic is "
                     "within two standard errors: not significant.")
    for name, (mean, se) in tcert_gain.items():
        verdict = "beyond" if _significant(mean, se) else "within"
        strict_mean, strict_se = strict_gain[name]
        lines.append(
            f"{labels[name]}: T-CERTIFY raises the average certified radius by {mean:.3f} ± "
            f"{se:.3f} over CERTIFY on the same samples ({verdict} two standard errors); "
            f"strict T-CERTIFY by {strict_mean:.3f} ± {strict_se:.3f}."
        )
    return lines


def _gain_table(radii: np.ndarray, gain: tuple[np.ndarray, np.ndarray]) -> str:
    head = "| | " + " | ".join(f"r = {r:.2f}" for r in radii) + " |"
    cells = " | ".join(f"{100 * m:+.1f} ± {100 * s:.1f}" for m, s in zip(*gain, strict=True))
    return "\n".join([head, "|---|" + "---:|" * len(radii), f"| ADREREG − Basic | {cells} |"])


def render_report(args: argparse.Namespace, models: Sequence, curves: dict, radii: np.ndarray,
                  adre_gain: tuple, tcert_gain: dict, strict_gain: dict,
                  conclusion: list[str], seconds: float) -> str:
    """The demo's REPORT.md from its numbers."""
    table = format_table(curves)
    labels = {m.name: m.label for m in models}
    acr_rows = "\n".join(
        f"| {labels[name]} | {tcert_gain[name][0]:+.3f} ± {tcert_gain[name][1]:.3f} | "
        f"{strict_gain[name][0]:+.3f} ± {strict_gain[name][1]:.3f} |" for name in tcert_gain)
    return f"""# smoothcert demo: Basic vs ADREREG on MNIST, CERTIFY vs T-CERTIFY

## Conclusion (computed from this run's numbers)

{chr(10).join(f"- {line}" for line in conclusion)}

{_setting(args)}

## Certified accuracy (abstentions count as wrong) and average certified radius

{table}
![certified accuracy](certified_accuracy.png)

CERTIFY dashed, T-CERTIFY (paper mode) solid, strict T-CERTIFY dash-dotted.

## Paired differences on the same test images

Certified accuracy, percentage points ± one standard error of the per-example difference:

{_gain_table(radii, adre_gain)}

Average certified radius, T-CERTIFY − CERTIFY on the same samples (± standard error):

| model | T-CERTIFY (paper mode) − CERTIFY | strict T-CERTIFY − CERTIFY |
|---|---:|---:|
{acr_rows}

## What "certified at radius r" means

![test digits, noisy copies and certified radii](examples.png)

Each row: a test digit, three of the noisy copies the smoothed classifier votes over, and each
model's prediction with its certified radius: no perturbation of L2 norm below r (in [0, 1]
pixel units; a digit's own norm is about 9) changes the smoothed prediction, with
probability ≥ 1 − α over the sampling.

Wall time of the run that wrote this report: {seconds / 60:.1f} minutes (a resumed run counts
only its own work).
"""


def _setting(args: argparse.Namespace) -> str:
    """The report's section on what was trained and certified, and how."""
    ceiling = args.sigma * _norm_ppf(args.alpha ** (1 / args.n))
    amp = f"{args.amp} autocast (noise drawn in float32)" if _amp(args) else "float32"
    data = f"the first {args.train_subset}" if args.train_subset else "all 60,000"
    return f"""## Setting

LeNet trained {args.epochs} epochs on {data} MNIST training images at σ = {args.sigma}
(lr {args.lr}, divided by 10 for the last epoch). **Basic**: Gaussian augmentation, one noise
draw per example. **ADREREG**: λ = {args.lam}, the paper's Table-1 variant (l_per from one
draw, the regulariser from k = {args.k} draws). Certification of {args.num_certify} test images
(every {args.skip}th from index 0) with n0 = {args.n0} selection and n = {args.n} estimation
samples, α = {args.alpha}: CERTIFY, T-CERTIFY in the paper's mode and in strict mode, all from
the same samples. With n = {args.n} no radius can exceed σ·Φ⁻¹(α^(1/n)) = {ceiling:.2f}.
Fast paths used: {amp}, channels_last, one thread per physical core; every certificate is one
of the network as executed (docs/benchmarks.md, "bf16 and the validity of certificates").
T-CERTIFY's paper mode picks α' after seeing the counts: its provable level is 1.9α (strict
mode: exactly α); see docs/statistics.md."""


def _norm_ppf(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


# examples.png shows paper-mode T-CERTIFY's radii, and says so: strict mode's differ.
EXAMPLES_METHOD = "tcertify"
EXAMPLES_TITLE = (f"Certified radius ({METHOD_LABELS[EXAMPLES_METHOD]}, failure probability "
                  "2α − α/grid) of a few test digits")


def plot_examples(args: argparse.Namespace, models: list[DemoModel], by_method: dict,
                  path: Path, rows: int = 5, copies: int = 3) -> None:
    """A few certified test digits, noisy copies of them and each model's certified radius."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .data import get_dataset

    dataset = get_dataset("mnist", "test")
    indices = np.arange(0, len(dataset), args.skip)[: args.num_certify]
    first = by_method[models[0].name][EXAMPLES_METHOD]
    # Spread the rows over the range of radii: from the most to the least robust digit.
    order = np.argsort(-_radii_or_zero(first), kind="stable")
    chosen = order[np.linspace(0, len(order) - 1, rows).round().astype(int)]
    generator = torch.Generator().manual_seed(args.seed)
    fig = Figure(figsize=(1.6 * (copies + 1) + 3.2, 1.7 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, copies + 2, squeeze=False)
    for row, position in enumerate(chosen):
        image, label = dataset[int(indices[position])]
        noisy = image + args.sigma * torch.randn((copies, *image.shape), generator=generator)
        pictures = [image, *noisy]
        titles = [f"test #{indices[position]}, label {label}",
                  *[f"+ noise σ={args.sigma}"] * copies]
        for col, (picture, title) in enumerate(zip(pictures, titles, strict=True)):
            ax = axes[row, col]
            ax.imshow(picture.squeeze(0).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        text = []
        for model in models:
            cert = by_method[model.name][EXAMPLES_METHOD]
            radius = cert.radius[position] if cert.correct[position] else 0.0
            verdict = f"r = {radius:.2f}" if cert.correct[position] else "not certified"
            text.append(f"{model.label}:\n  {verdict}")
        axes[row, -1].text(0.0, 0.5, "\n".join(text), fontsize=8, va="center")
        axes[row, -1].axis("off")
    fig.suptitle(EXAMPLES_TITLE, fontsize=9)
    save_figure(fig, path)
