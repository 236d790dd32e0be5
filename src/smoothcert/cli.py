"""The `smoothcert` command: argument parsing only; every command calls into a module."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import typing
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path

from .perf import AMP

_PACKAGE_DIR = Path(__file__).resolve().parent

DEBUG_HELP = "show the full traceback of any error (and debug log messages)"
PROGRESS_HELP = "no progress bars"
TRAIN_HELP = {
    "objective": "training objective (see `smoothcert objectives`; `train --objective NAME "
                 "--help` lists its options)",
    "eps_warmup": "epochs over which eps grows linearly to its value",
    "batch": "GLOBAL batch in examples (split over torchrun processes; k noisy copies each)",
    "schedule": "step (lr * gamma every lr_step epochs), cosine (after warmup_epochs), constant",
    "train_subset": "train on the first N examples only (0: all)",
    "eval_subset": "examples of the test split evaluated after each epoch (0: none)",
    "out": "run directory: config.json, checkpoint.pt, log.jsonl",
    "amp": "autocast dtype (none: float32)",
}
# train's options that are not TrainConfig fields: they steer the command, not the run.
TRAIN_COMMAND_OPTIONS = {"resume"}
# Old spellings of train's options, kept for one release: {old flag: new flag}.
TRAIN_DEPRECATED_FLAGS = {"--method": "--objective"}

logger = logging.getLogger(__name__)


class _DeprecatedFlag(argparse.Action):
    """An option's old spelling: stores into the new option's field and logs a warning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = TRAIN_DEPRECATED_FLAGS[option_string]
        logger.warning("smoothcert: %s is deprecated and will be removed in the next release; "
                       "use %s", option_string, new)
        setattr(namespace, self.dest, values)


def _value_in(argv: Sequence[str], flag: str, accepted: Collection[str]) -> str | None:
    """The valid value of `flag` named last in `argv`, if any."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value if value in accepted else None


def _add_train_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """One option per TrainConfig field; each help shows the value the run would take, the
    field's default or the --preset's value (when `argv` names a preset). The options of
    objectives other than the one the run would train are accepted but not shown."""
    from .objectives import CommonConfig, objective_config_class, option_fields
    from .presets import PRESETS, TrainConfig, choices, resolve_config

    preset = _value_in(argv, "--preset", PRESETS)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    shown = asdict(resolve_config(preset)) if preset else defaults
    accepted = choices()
    objective = _value_in(argv, "--objective", accepted["objective"]) or shown["objective"]
    own = {f.name for f in fields(objective_config_class(objective))}
    common = {f.name for f in fields(CommonConfig)}
    options = {f.name for f in option_fields()}
    group = parser.add_argument_group(f"options of objective {objective}")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the paper's recipes (see `smoothcert presets`)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (refused if it holds no checkpoint)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        value = "none" if shown[f.name] is None else shown[f.name]
        where = f", preset {preset}" if preset and shown[f.name] != defaults[f.name] else ""
        about = TRAIN_HELP.get(f.name) or f.metadata.get("help", "")
        text = f"{about} (default {value}{where})".lstrip()
        if f.name in own - common:
            _add_train_option(group, f.name, hints[f.name], accepted, text)
        else:
            other_objectives = f.name in options - common
            _add_train_option(parser, f.name, hints[f.name], accepted,
                              argparse.SUPPRESS if other_objectives else text)
    for old, new in TRAIN_DEPRECATED_FLAGS.items():
        parser.add_argument(old, dest=new[2:].replace("-", "_"), action=_DeprecatedFlag,
                            choices=accepted.get(new[2:]), default=None, help=argparse.SUPPRESS)


def _add_train_option(parser, name: str, kind, accepted: dict, text: str) -> None:
    """--name (with underscores as dashes) for TrainConfig field `name` of type `kind`."""
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif name in accepted:
        parser.add_argument(flag, choices=accepted[name], default=None, help=text)
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


def _dataset_name(name: str) -> str:
    """--dataset of certify/predict, checked as argparse checks choices; smoothcert.data (which
    imports torch) is read only when the option is given, so `certify --help` never imports it."""
    from .data import DATASETS

    if name not in DATASETS:
        accepted = ", ".join(map(repr, DATASETS))
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {accepted})")
    return name


def _sample_count(text: str) -> int:
    """--n0, --N, --max-n: a number of samples, refused above stats.MAX_SAMPLES (the counts the
    statistics are validated for) while parsing, before torch or the model is loaded."""
    from .stats import MAX_SAMPLES, check_sample_count

    try:
        return check_sample_count(int(text), "samples")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [1, {MAX_SAMPLES}], got {text!r}") from None


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
    parser.add_argument("--N", "--n", dest="n", type=_sample_count, default=100_000,
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
    parser.add_argument("--dataset", type=_dataset_name, metavar="NAME",
                        help="override the checkpoint's dataset (mnist, cifar10, ...)")
    parser.add_argument("--data-dir", help="dataset folder (or set SMOOTHCERT_DATA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=AMP)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model in channels_last memory format (default on)")
    parser.add_argument("--restart-stale", dest="restart_if_stale", action="store_true",
                        help="discard rows in --out that another run wrote (other settings or "
                        "checkpoint content) and recompute them, instead of refusing")
    if certify:
        parser.add_argument("--n0", type=_sample_count, default=100, help="selection samples")
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
    parser.add_argument("--max-n", type=_sample_count, help="at most this many estimation "
                        "samples per input, with --radii or --adaptive-n (default: --N)")
    parser.add_argument("--confidence-sequence", choices=["mixture", "bonferroni"],
                        help="anytime-valid bound of sequential certification (default mixture)")
    parser.add_argument("--adaptive-n", action="store_true", help="choose each input's n from "
                        "its selection samples, radius loss against --max-n <= --tolerance")
    parser.add_argument("--tolerance", type=float, help="--adaptive-n: radius loss (0.02)")


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's settings (read by demo.run_demo)."""
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise level (default 1.0)")
    parser.add_argument("--lam", type=float, default=0.2, help="ADREREG lambda (default 0.2)")
    parser.add_argument("--k", type=int, default=8,
                        help="ADREREG's noise draws per training example (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    parser.add_argument("--train-subset", type=int, default=0,
                        help="train on the first N MNIST images (default 0: all 60,000)")
    parser.add_argument("--certify", type=int, default=250, dest="num_certify",
                        help="number of test images certified (default 250)")
    parser.add_argument("--skip", type=int, default=40,
                        help="certify every skip-th test image (default 40)")
    parser.add_argument("--n0", type=_sample_count, default=100,
                        help="selection samples (default 100)")
    parser.add_argument("--N", "--n", dest="n", type=_sample_count, default=5_000,
                        help="estimation samples (default 5,000)")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=1_000, help="certification batch")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16",
                        help="autocast for training and certification (default bf16)")
    parser.add_argument("--seed", type=int, default=0)


# The commands that run a network: the others never import torch.
TORCH_COMMANDS = {"train", "certify", "predict", "demo"}
COMMANDS = ("train", "certify", "predict", "analyze", "verify", "demo", "presets", "models",
            "objectives")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """smoothcert's parser. Given the `argv` it will parse, train's options (which import
    torch) are built only if train is the command, with its --preset's values shown."""
    parser = argparse.ArgumentParser(
        prog="smoothcert",
        description="Certified L2 robustness by randomized smoothing (ADRE, T-CERTIFY).",
    )
    parser.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a base classifier")
    if argv is None or "train" in argv:
        _add_train_arguments(train, argv or [])
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
    verify.add_argument("--data-dir", help="the dataset's folder, to check each row's label "
                        "(MNIST: the shipped copy by default; the others: not checked without)")
    _add_demo_arguments(sub.add_parser("demo", help="the offline end-to-end MNIST job"))
    sub.add_parser("presets", help="list the training presets and their main settings")
    sub.add_parser("models", help="list the base-classifier architectures (--model)")
    sub.add_parser("objectives", help="list the training objectives (--objective)")
    assert tuple(sub.choices) == COMMANDS
    for command in sub.choices.values():  # the global options after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
        command.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                             help=PROGRESS_HELP)
    return parser


RESUME_HINT = "run the same command to resume"


@contextlib.contextmanager
def _on_interrupt(hint: Callable[[], str]) -> Iterator[None]:
    """An interrupt's note (what the run kept) gets what running the command again does."""
    try:
        yield
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt("; ".join(filter(None, (str(err), hint())))) from None


def _train(args) -> None:
    from .presets import TrainConfig, resolve_config
    from .train import CHECKPOINT, require_checkpoint, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "preset"}
    cfg = resolve_config(args.preset, **overrides)
    if args.resume:
        require_checkpoint(cfg.out)

    def hint() -> str:
        kept = (Path(cfg.out) / CHECKPOINT).is_file()
        return "run it again with --resume to continue" if kept else "run it again to start over"

    with _on_interrupt(hint):
        path = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"checkpoint: {path}")


def _demo(args) -> None:
    from .demo import run_demo

    with _on_interrupt(lambda: RESUME_HINT):
        run_demo(args, progress=not args.no_progress)


def _list_presets(args) -> None:
    from .presets import PRESET_SUMMARY, PRESETS, resolve_config

    for name in PRESETS:
        cfg = asdict(resolve_config(name))
        print(f"{name:31} " + " ".join(f"{key}={cfg[key]}" for key in PRESET_SUMMARY))


def _list_models(args) -> None:
    from .models import list_models

    print("\n".join(list_models()))


def _list_objectives(args) -> None:
    import inspect

    from .objectives import get_objective, list_objectives

    for name in list_objectives():
        summary = inspect.getdoc(get_objective(name)).split("\n\n")[0].replace("\n", " ")
        print(f"{name:12} {summary}")


def _run(args) -> None:
    from .runner import RunConfig, abstention_rate, run

    options = {k: v for k, v in vars(args).items()
               if k not in {"command", "no_progress", "debug"}}
    cfg = RunConfig(mode=args.command, **options)
    with _on_interrupt(lambda: RESUME_HINT):
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
    from .results import check_file

    failed = False
    for path in args.files:
        report = check_file(path, args.data_dir)
        for problem in report.problems:
            print(problem)
        for note in report.notes:
            print(note, file=sys.stderr)
        failed |= bool(report.problems)
        verdict = (f"problems listed above: {len(report.problems)}" if report.problems
                   else "every certificate matches")
        print(f"{path}: {report.rows} rows recomputed from their counts and sidecar: {verdict}; "
              + ", ".join(report.checked), file=sys.stderr)
    return 1 if failed else 0


INTERRUPTED = 130  # the shell's exit status of a process stopped by SIGINT (128 + 2)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (kill, torchrun stopping its ranks) stops the command as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler (main called from a worker thread)
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with logging_to_stderr():  # a deprecated option's warning
        args = build_parser(argv).parse_args(argv)
    try:
        with _sigterm_interrupts():
            return _execute(args)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, what is kept, no traceback
        if args.debug:
            raise
        note = f": {err}" if str(err) else ""
        print(f"smoothcert {args.command}: interrupted{note}", file=sys.stderr)
        return INTERRUPTED


def _execute(args: argparse.Namespace) -> int:
    from .perf import tune_allocator

    tune_allocator()  # big batches otherwise page-fault heavily (docs/benchmarks.md)
    uses_torch = args.command in TORCH_COMMANDS
    if uses_torch:  # the other commands start without importing torch
        from .perf import set_threads

        set_threads()  # one thread per physical core unless OMP_NUM_THREADS says otherwise
    commands = {"train": _train, "certify": _run, "predict": _run, "analyze": _analyze,
                "verify": _verify, "demo": _demo, "presets": _list_presets,
                "models": _list_models, "objectives": _list_objectives}
    try:
        with logging_to_stderr(args.debug):
            code = commands[args.command](args)
    except Exception as err:
        if args.debug or not is_usage_error(err):
            raise  # a bug (or --debug): the full traceback
        print(f"smoothcert {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if uses_torch:
            from .distributed import shutdown_distributed

            shutdown_distributed()
    return code or 0
