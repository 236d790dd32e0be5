"""The offline end-to-end job on the shipped MNIST: train Basic and ADREREG, certify, report.

Every stage resumes: re-running the same command finishes what a killed run left undone.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .analyze import analyze
from .io import atomic_write_text
from .presets import resolve_config
from .runner import RunConfig, run
from .train import train

logger = logging.getLogger(__name__)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--lam", type=float, default=0.2, help="ADREREG lambda")
    parser.add_argument("--k", type=int, default=4, help="noise draws per training example")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=20_000,
                        help="train on the first N MNIST images (0: all 60,000)")
    parser.add_argument("--certify", type=int, default=300, dest="num_certify",
                        help="number of test images certified")
    parser.add_argument("--skip", type=int, default=10, help="certify every skip-th test image")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--N", "--n", dest="n", type=int, default=2_000, help="estimation samples")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=1_000, help="certification batch")
    parser.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace, progress: bool = True) -> Path:
    """Train, certify and report as the arguments say; return the report's path."""
    out = Path(args.out)
    started = time.time()
    results = []
    for name, method, lam in (("basic", "gaussian", 0.0), ("adre", "adre", args.lam)):
        cfg = resolve_config(
            "mnist-lenet", method=method, lam=lam, k=args.k, sigma=args.sigma,
            epochs=args.epochs, train_subset=args.train_subset, eval_subset=1000,
            seed=args.seed, out=str(out / name),
        )
        logger.info("[demo] training %s (%s, lambda=%s, k=%s, sigma=%s)", name, method, lam, args.k,
                    args.sigma)
        checkpoint = train(cfg, resume=True, progress=progress)
        logger.info("[demo] certifying %s test images with CERTIFY and T-CERTIFY", args.num_certify)
        results.append(run(RunConfig(
            checkpoint=str(checkpoint), out=str(out / f"{name}.tsv"), method="both",
            n0=args.n0, n=args.n, alpha=args.alpha, batch=args.batch, skip=args.skip,
            max=args.num_certify, seed=args.seed, extra={"label": name},
            restart_if_stale=True,  # a retrained model or new settings: recompute, never mix
        ), progress=progress))
    plot = out / "certified_accuracy.png"
    table = analyze([str(p) for p in results], plot=str(plot))
    minutes = (time.time() - started) / 60
    report = out / "report.md"
    atomic_write_text(report, _report(args, table, plot, minutes))
    logger.info("%s", table)
    logger.info("[demo] report: %s  plot: %s  (%.1f min)", report, plot, minutes)
    return report


def _report(args: argparse.Namespace, table: str, plot: Path, minutes: float) -> str:
    return f"""# smoothcert demo: Basic vs ADREREG on MNIST, CERTIFY vs T-CERTIFY

LeNet, sigma = {args.sigma}, k = {args.k}, {args.epochs} epochs on the first
{args.train_subset or 60000} training images; ADREREG lambda = {args.lam}.
Certification: {args.num_certify} test images (every {args.skip}th), n0 = {args.n0},
n = {args.n}, alpha = {args.alpha}; CERTIFY and T-CERTIFY (paper and strict modes) from the
same samples. Certified accuracy at each L2 radius (abstentions count as wrong) and the
average certified radius (ACR):

{table}

![certified accuracy]({plot.name})

Wall time: {minutes:.1f} minutes (training and certification; a re-run resumes).
"""


def run_demo_from_args(args: argparse.Namespace) -> None:
    run_demo(args, progress=not args.no_progress)
