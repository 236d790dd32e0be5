"""Shared machinery of the reproduction studies: train -> certify -> summarise, resumably.

Checkpoints live under `runs/experiments/<study>/` (not committed); result TSVs, their
sidecars, a per-run training summary, the plots and `summary.md` live under
`experiments/results/<study>/` (committed). A run whose result file is complete is skipped
entirely, so a study can be finished across several sittings, even on a new machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smoothcert.analyze import (
    average_certified_radius,
    format_table,
    load_results,
    plot_curves,
)
from smoothcert.data import get_dataset
from smoothcert.io import atomic_write_json, atomic_write_text
from smoothcert.perf import set_threads, tune_allocator
from smoothcert.presets import resolve_config
from smoothcert.results import read_results
from smoothcert.runner import RunConfig, run, selected_indices
from smoothcert.train import CHECKPOINT, LOG, train

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


@dataclass
class Run:
    """One trained model and its certification."""

    name: str
    train: dict
    label: str = ""
    certify: dict = field(default_factory=dict)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--skip", type=int, default=20, help="certify every skip-th test image")
    parser.add_argument("--max", type=int, default=500, help="number of test images certified")
    parser.add_argument("--batch", type=int, default=2_000, help="certification batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these run names")
    parser.add_argument("--train-subset", type=int, default=0,
                        help="train on the first N examples (0: all; for smoke runs)")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                        help="autocast for training and certification (certificates are then "
                             "of the autocast model)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--root", type=Path, default=None,
                        help="write results to ROOT/results/<study> and checkpoints to "
                             "ROOT/runs/<study> (default: experiments/results/<study> and "
                             "runs/experiments/<study>)")


def result_dir(study: str, root: Path | None) -> Path:
    return (root or ROOT) / "results" / study


def run_dir(study: str, name: str, root: Path | None) -> Path:
    return (root / "runs" if root else REPO / "runs" / "experiments") / study / name


def certify_config(run_: Run, args: argparse.Namespace, checkpoint: str, tsv: Path) -> RunConfig:
    """`run_.certify` may replace `checkpoint` (the run's own), e.g. by a classifier that the
    run's checkpoint, a denoiser, is certified in front of (`denoiser`)."""
    return RunConfig(**{
        "checkpoint": checkpoint, "out": str(tsv), "method": "both",
        "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch": args.batch, "skip": args.skip,
        "max": args.max, "seed": args.seed, "amp": amp_of(args),
        "extra": {"label": run_.label or run_.name}, **run_.certify,
    })


def amp_of(args: argparse.Namespace) -> str | None:
    return None if args.amp == "none" else args.amp


def is_complete(tsv: Path, dataset: str, args: argparse.Namespace, data_dir: str | None) -> bool:
    if not tsv.exists():
        return False
    expected = selected_indices(len(get_dataset(dataset, "test", data_dir)), args.skip, args.max)
    return set(read_results(tsv, allow_cut=True).values["idx"]) >= set(expected)


def execute(study: str, runs: list[Run], args: argparse.Namespace) -> list[Path]:
    """Train and certify every run not yet complete; return the result files in order."""
    tune_allocator()  # as the CLI does: big batches otherwise page-fault heavily
    set_threads()
    out = result_dir(study, args.root)
    files = [out / f"{run_.name}.tsv" for run_ in runs]
    todo = []
    try:  # every run's settings are checked before hours of training start
        for run_, tsv in zip(runs, files, strict=True):
            if args.only and run_.name not in args.only:
                continue
            cfg = resolve_config(seed=args.seed, out=str(run_dir(study, run_.name, args.root)),
                                 train_subset=args.train_subset, amp=amp_of(args),
                                 channels_last=True, **run_.train)
            checkpoint = str(Path(cfg.out) / CHECKPOINT)
            todo.append((run_, tsv, cfg, certify_config(run_, args, checkpoint, tsv).validate()))
    except ValueError as err:
        sys.exit(f"{study}: error: {err}")
    out.mkdir(parents=True, exist_ok=True)
    for run_, tsv, cfg, certify in todo:
        if is_complete(tsv, cfg.dataset, args, cfg.data_dir):
            print(f"[{study}] {run_.name}: complete, skipped")
            continue
        print(f"[{study}] {run_.name}: training ({cfg.objective}, sigma={cfg.sigma}, "
              f"lam={cfg.lam})")
        train(cfg, resume=True, progress=not args.no_progress)
        summarise_training(Path(cfg.out), out / f"{run_.name}.train.json")
        print(f"[{study}] {run_.name}: certifying")
        run(certify, progress=not args.no_progress)
    return files


def summarise_training(run_path: Path, target: Path) -> None:
    """Keep the training log's essentials beside the results (checkpoints are not committed)."""
    records = [json.loads(line) for line in (run_path / LOG).read_text().splitlines() if line]
    config = json.loads((run_path / "config.json").read_text())
    atomic_write_json(target, {
        "config": config,
        "epochs": len(records),
        "train_seconds": sum(r["time"] for r in records),
        "final": records[-1] if records else {},
    })


def certification_seconds(tsv: Path) -> float:
    """Total certification time recorded in a result file's time column."""
    return float(read_results(tsv).column("time").sum())


def timing_table(files: list[Path]) -> str:
    lines = [
        "| run | epochs | train time (min) | final loss | test noisy acc | certify time (min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tsv in files:
        meta_path = tsv.with_name(tsv.stem + ".train.json")
        if not (tsv.exists() and meta_path.exists()):
            continue
        meta = json.loads(meta_path.read_text())
        loss, noisy = (meta["final"].get(key, float("nan")) for key in ("loss", "test_noisy_acc"))
        lines.append(
            f"| {tsv.stem} | {meta['epochs']} | {meta['train_seconds'] / 60:.1f} | {loss:.3f} | "
            f"{noisy:.3f} | {certification_seconds(tsv) / 60:.1f} |"
        )
    return "\n".join(lines)


def curves_of(files: list[Path], methods: tuple[str, ...] = ("certify",)) -> list:
    """The curves of the given certification methods from every existing result file."""
    curves = []
    for tsv in files:
        if tsv.exists():
            curves += [c for c in load_results(tsv) if c.method in methods]
    return curves


def tcertify_gain_table(files: list[Path]) -> str:
    """ACR of CERTIFY, T-CERTIFY and strict T-CERTIFY (same samples) and the gains, per run."""
    lines = [
        "| run | ACR CERTIFY | ACR T-CERTIFY | gain | ACR strict | gain (strict) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tsv in files:
        if not tsv.exists():
            continue
        acr = {c.method: average_certified_radius(c) for c in load_results(tsv)}
        base, paper, strict = acr["certify"], acr["tcertify"], acr["tcertify-strict"]
        lines.append(f"| {tsv.stem} | {base:.4f} | {paper:.4f} | {paper - base:+.4f} | "
                     f"{strict:.4f} | {strict - base:+.4f} |")
    return "\n".join(lines)


def certified_indicators(tsv: Path, radii: tuple[float, ...]) -> np.ndarray:
    """[examples, radii] booleans: CERTIFY correct with radius >= r, rows sorted by index."""
    curve = next(c for c in load_results(tsv) if c.method == "certify")
    order = np.argsort(curve.idx)
    return (curve.correct[:, None] & (curve.radius[:, None] >= np.array(radii)))[order]


def paired_gain_table(baseline: Path, others: list[Path],
                      radii: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)) -> str:
    """Certified-accuracy gain of each run over `baseline` on the same examples, ± its
    standard error (of the mean of the per-example paired differences)."""
    base = certified_indicators(baseline, radii)
    lines = [f"| {baseline.stem} → | " + " | ".join(f"r = {r}" for r in radii) + " |",
             "|---|" + "---:|" * len(radii)]
    for tsv in others:
        if not tsv.exists():
            continue
        other = certified_indicators(tsv, radii)
        if other.shape != base.shape:
            raise ValueError(f"{tsv} and {baseline} do not hold the same examples")
        diff = other.astype(float) - base
        se = diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
        lines.append(f"| {tsv.stem} | " + " | ".join(
            f"{100 * m:+.1f} ± {100 * e:.1f}" for m, e in zip(diff.mean(axis=0), se, strict=True)
        ) + " |")
    return "\n".join(lines)


def write_summary(study: str, title: str, sections: list[tuple[str, list, str | None]],
                  notes: str, files: list[Path],
                  comparisons: list[tuple[Path, list[Path]]] = (),
                  gain_radii: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)) -> Path:
    """summary.md beside the result files: one table (and plot) per section, the paired
    gains of each comparison (baseline, others), the T-CERTIFY gains and the costs."""
    out = files[0].parent
    parts = [f"# {title}", "", notes, ""]
    for heading, curves, plot_name in sections:
        if not curves:
            continue
        parts += [f"## {heading}", "", format_table(curves), ""]
        if plot_name:
            plot_curves(curves, out / plot_name, title=heading)
            parts += [f"![{heading}]({plot_name})", ""]
    gains = [paired_gain_table(base, others, gain_radii) for base, others in comparisons
             if base.exists()]
    if gains:
        parts += ["## Certified-accuracy gain over the baseline, same test points (CERTIFY)", "",
                  "Percentage points, ± one standard error of the paired difference.", ""]
        parts += [line for table in gains for line in (table, "")]
    parts += ["## T-CERTIFY vs CERTIFY: average certified radius, same samples", "",
              tcertify_gain_table(files), ""]
    parts += ["## Cost", "", timing_table(files), ""]
    path = out / "summary.md"
    atomic_write_text(path, "\n".join(parts))
    print(f"[{study}] summary: {path}")
    return path
