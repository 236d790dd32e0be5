"""The `smoothcert` command: argument parsing only; every command calls into a module."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import typing
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent

DEBUG_HELP = "show the full traceback of any error (and debug log messages)"
TRAIN_HELP = {
    "method": "training objective: gaussian, adre (ADREREG), smoothadv, adreadv",
    "lam": "ADRE regularisation weight lambda (>= 0)",
    "k": "Gaussian draws per example",
    "single_draw": "l_per from one random draw per example (the paper's Table-1 variant)",
    "eps": "L2 attack radius for smoothadv/adreadv",
    "steps": "PGD steps",
    "eps_warmup": "epochs over which eps grows linearly to its value",
    "batch": "GLOBAL batch in examples (split over torchrun processes; k noisy copies each)",
    "schedule": "step (lr * gamma every lr_step epochs), cosine (after warmup_epochs), constant",
    "train_subset": "train on the first N examples only (0: all)",
    "eval_subset": "examples of the test split evaluated after each epoch (0: none)",
    "out": "run directory: config.json, checkpoint.pt, log.jsonl",
    "amp": "autocast dtype: bf16 or fp16",
    "adre_floor": "l_adre = -log max(G_runner-up, floor); 0 = unbounded (may diverge)",
}


def _add_train(sub) -> None:
    from .presets import PRESETS, TrainConfig

    parser = sub.add_parser("train", help="train a base classifier")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the paper's recipes")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default
        text = TRAIN_HELP.get(f.name, "") + f" (default {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=scalar, default=None, help=text)


def _example_count(text: str) -> int:
    """--max-examples: a count of examples, or -1 for no limit (Cohen's spelling)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count of examples, got {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be a count >= 0 (or -1: no limit), got {value}")
    return value


def _add_run_options(parser: argparse.ArgumentParser, certify: bool) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pt of `smoothcert train`, or a Cohen "
                        "et al./SmoothAdv/Consistency/SmoothMix or MACER checkpoint")
    parser.add_argument("--format", choices=["auto", "smoothcert", "cohen", "macer"],
                        default="auto", help="the checkpoint's format (default: from its keys)")
    parser.add_argument("--arch", help="a MACER checkpoint's architecture: resnet110 or lenet")
    parser.add_argument("--out", required=True, help="result TSV (re-running resumes it)")
    parser.add_argument("--split", default="test")
    # --N / --max-examples: torchrun swallows --n and --max as abbreviations of its own
    # options (pytorch/pytorch#120601), so every option needs a spelling it passes through.
    parser.add_argument("--N", "--n", dest="n", type=int, default=100_000,
                        help="estimation samples (use --N under torchrun)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--batch", type=int, default=1000, help="noisy samples per forward")
    parser.add_argument("--skip", type=int, default=1, help="certify every skip-th example")
    parser.add_argument("--max-examples", "--max", dest="max", type=_example_count, default=None,
                        help="at most this many examples (a COUNT; Cohen's --max is an index; "
                        "use --max-examples under torchrun)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma", type=float, help="noise level: required for Cohen/MACER "
                        "checkpoints, overrides a smoothcert checkpoint's")
    parser.add_argument("--dataset", help="override the checkpoint's dataset")
    parser.add_argument("--data-dir", help="dataset folder (or set SMOOTHCERT_DATA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["bf16", "fp16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model in channels_last memory format (default on)")
    parser.add_argument("--restart-stale", dest="restart_if_stale", action="store_true",
                        help="discard rows in --out that another run wrote (other settings or "
                        "checkpoint content) and recompute them, instead of refusing")
    if certify:
        parser.add_argument("--n0", type=int, default=100, help="selection samples")
        parser.add_argument("--method", choices=["certify", "tcertify", "both"],
                            help="default: both; certify with --radii/--max-n")
        parser.add_argument("--grid", type=int, default=10, help="T-CERTIFY alpha' grid size")
        _add_sequential_options(parser)


def _radii(text: str) -> tuple[float, ...]:
    """--radii: comma-separated radii."""
    try:
        return tuple(float(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected radii like 0.25,0.5,1.0, got {text!r}"
                                         ) from None


def _add_sequential_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--radii", type=_radii, help="certify at these radii only, sampling "
                        "sequentially until each is decided (default with --max-n: the "
                        "Table-1 radii max-n can reach)")
    parser.add_argument("--max-n", type=int, help="at most this many estimation samples per "
                        "input, with --radii or --adaptive-n (default: --N)")
    parser.add_argument("--confidence-sequence", choices=["mixture", "bonferroni"],
                        help="anytime-valid bound of sequential certification (default mixture)")
    parser.add_argument("--adaptive-n", action="store_true", help="choose each input's n from "
                        "its selection samples, radius loss against --max-n <= --tolerance")
    parser.add_argument("--tolerance", type=float, help="--adaptive-n: radius loss (0.02)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothcert",
        description="Certified L2 robustness by randomized smoothing (ADRE, T-CERTIFY).",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_run_options(sub.add_parser("certify", help="CERTIFY / T-CERTIFY over a split"), True)
    _add_run_options(sub.add_parser("predict", help="Cohen's PREDICT over a split"), False)
    analyze = sub.add_parser("analyze", help="certified-accuracy tables, ACR and plots")
    analyze.add_argument("files", nargs="+", help="result TSVs of `smoothcert certify`")
    style = analyze.add_mutually_exclusive_group()
    style.add_argument("--latex", action="store_true")
    style.add_argument("--csv", action="store_true")
    analyze.add_argument("--plot", help="write a PNG of certified accuracy against radius")
    verify = sub.add_parser("verify", help="recompute every certificate of result files")
    verify.add_argument("files", nargs="+", help="result TSVs of `smoothcert certify`")
    demo = sub.add_parser("demo", help="the offline end-to-end MNIST job")
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    for command in sub.choices.values():  # --debug after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
    return parser


def _train(args) -> None:
    from .presets import resolve_config
    from .train import train

    skip = {"command", "no_progress", "debug", "preset", "resume"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    cfg = resolve_config(args.preset, **overrides)
    path = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"checkpoint: {path}")


def _run(args) -> None:
    from .runner import RunConfig, abstention_rate, run

    options = {k: v for k, v in vars(args).items()
               if k not in {"command", "no_progress", "debug"}}
    cfg = RunConfig(mode=args.command, **options)
    path = run(cfg, progress=not args.no_progress)
    print(f"results: {path}")
    if args.command == "predict":
        print(f"abstention rate: {abstention_rate(path):.4f}")


def _analyze(args) -> None:
    from .analyze import analyze

    fmt = "latex" if args.latex else "csv" if args.csv else "markdown"
    print(analyze(args.files, fmt=fmt, plot=args.plot, protocol_note=fmt != "csv"))
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr)


def is_usage_error(err: BaseException) -> bool:
    """Whether `err` is the user's to fix (bad argument, missing data, bad file), not a bug.

    Usage errors: OSError (missing, unreadable or unwritable files), a file's content that is
    not text or JSON, and a ValueError raised by smoothcert's own checks. A ValueError raised
    inside torch or another library is a bug in how smoothcert called it.
    """
    if isinstance(err, (OSError, UnicodeDecodeError, json.JSONDecodeError)):
        return True
    if not isinstance(err, ValueError) or err.__traceback__ is None:
        return False
    frame = err.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


@contextlib.contextmanager
def logging_to_stderr(debug: bool = False) -> Iterator[None]:
    """Library messages (the "smoothcert" loggers) to stderr for the block; debug ones too."""
    logger = logging.getLogger("smoothcert")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _verify(args) -> int:
    from .results import verify

    failed = False
    for path in args.files:
        checked, problems = verify(path)
        for problem in problems:
            print(problem)
        failed |= bool(problems)
        verdict = (f"mismatches listed above: {len(problems)}" if problems
                   else "every certificate matches")
        print(f"{path}: {checked} rows recomputed from their counts and sidecar: {verdict}",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .perf import set_threads, tune_allocator

    tune_allocator()  # big batches otherwise page-fault heavily (docs/benchmarks.md)
    set_threads()  # one thread per physical core unless OMP_NUM_THREADS says otherwise
    from .demo import run_demo_from_args
    from .distributed import shutdown_distributed

    commands = {"train": _train, "certify": _run, "predict": _run, "analyze": _analyze,
                "verify": _verify, "demo": run_demo_from_args}
    try:
        with logging_to_stderr(args.debug):
            code = commands[args.command](args)
    except Exception as err:
        if args.debug or not is_usage_error(err):
            raise  # a bug (or --debug): the full traceback
        print(f"smoothcert {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return code or 0
