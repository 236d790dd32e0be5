"""The `smoothcert` command: argument parsing only; every command calls into a module."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path

from .options import (
    DefaultsHelpFormatter,
    add_analyze_options,
    add_demo_arguments,
    add_run_options,
    add_train_arguments,
    run_argument_problem,
)

_PACKAGE_DIR = Path(__file__).resolve().parent

DEBUG_HELP = "show the full traceback of any error (and debug log messages)"
PROGRESS_HELP = "no progress bars"
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
    parser.add_argument("--version", action="version", version=f"smoothcert {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a base classifier")
    if argv is None or "train" in argv:
        add_train_arguments(train, argv or [])
    add_run_options(sub.add_parser("certify", help="CERTIFY / T-CERTIFY over a split"), True)
    add_run_options(sub.add_parser("predict", help="Cohen's PREDICT over a split"), False)
    analyze = sub.add_parser("analyze", help="certified-accuracy tables, ACR and plots")
    analyze.add_argument("files", nargs="+", help="result TSVs of `smoothcert certify`")
    style = analyze.add_mutually_exclusive_group()
    style.add_argument("--latex", action="store_true",
                       help="a LaTeX table (booktabs; pure ASCII; best of each column bold)")
    style.add_argument("--csv", action="store_true", help="CSV at full precision")
    add_analyze_options(analyze)
    verify = sub.add_parser("verify", help="recompute every certificate of result files")
    verify.add_argument("files", nargs="+", help="result TSVs of `smoothcert certify`")
    verify.add_argument("--data-dir", help="the dataset's folder, to check each row's label "
                        "(MNIST: the shipped copy by default; the others: not checked without)")
    verify.add_argument("--data-file", help="an npz dataset's archive, to check each row's label "
                        "(not checked without)")
    add_demo_arguments(sub.add_parser("demo", help="the offline end-to-end MNIST job"))
    sub.add_parser("presets", help="list the training presets and their main settings")
    sub.add_parser("models", help="list the base-classifier architectures (--model)")
    sub.add_parser("objectives", help="list the training objectives (--objective)")
    assert tuple(sub.choices) == COMMANDS
    for command in sub.choices.values():  # the global options after the command too
        command.formatter_class = DefaultsHelpFormatter
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
        command.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                             help=PROGRESS_HELP)
    return parser


def version() -> str:
    """The installed distribution's version, else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("smoothcert")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _is_rank_zero() -> bool:
    """Whether this process reports the command's result: under torchrun only rank 0 does."""
    return os.environ.get("RANK", "0") == "0"


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
    if _is_rank_zero():
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
    from .catalogue import models

    print("\n".join(models()))


def _list_objectives(args) -> None:
    from .catalogue import objectives

    listed = objectives()
    width = max(map(len, listed))
    for name, summary in listed.items():
        print(f"{name:{width}} {summary}")


def _run(args) -> None:
    from .runner import RunConfig, abstention_rate, run

    options = {k: v for k, v in vars(args).items()
               if k not in {"command", "no_progress", "debug", "procs"}}
    cfg = RunConfig(mode=args.command, **options)
    with _on_interrupt(lambda: RESUME_HINT):
        path = run(cfg, progress=not args.no_progress)
    if not _is_rank_zero():
        return
    print(f"results: {path}")
    if args.command == "predict":
        print(f"abstention rate: {abstention_rate(path):.4f}")


def _analyze(args) -> None:
    from .analyze import analyze

    fmt = "latex" if args.latex else "csv" if args.csv else "markdown"
    print(analyze(args.files, radii=args.radii, fmt=fmt, plot=args.plot,
                  protocol_note=fmt != "csv", methods=args.methods, labels=args.label,
                  vary_sigma=args.vary_sigma))
    for plot in filter(None, (args.plot, args.vary_sigma)):
        print(f"plot: {plot}", file=sys.stderr)


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
        report = check_file(path, args.data_dir, args.data_file)
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
    if args.command in {"certify", "predict"} and (problem := run_argument_problem(args)):
        print(f"smoothcert {args.command}: error: {problem}", file=sys.stderr)
        return 2
    procs = _process_count(args)
    if procs is not None and (problem := _process_problem(procs)):
        print(f"smoothcert {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        with _sigterm_interrupts():
            if procs is not None and procs > 1 and "WORLD_SIZE" not in os.environ:
                return launch_processes(argv, procs)
            return _execute(args, threads=1 if procs == 1 else None)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, what is kept, no traceback
        if args.debug:
            raise
        note = f": {err}" if str(err) else ""
        # One write, newline included: torchrun's agent writes to the same stream meanwhile.
        sys.stderr.write(f"smoothcert {args.command}: interrupted{note}\n")
        return INTERRUPTED


def _process_count(args: argparse.Namespace) -> int | None:
    """certify/predict --procs as a number (auto: the physical cores), None without it."""
    procs = getattr(args, "procs", None)
    if procs != "auto":
        return procs
    from .perf import physical_cores

    return physical_cores()


def _process_problem(procs: int) -> str | None:
    """What is wrong with --procs under a torchrun that started this process, if anything."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or world == str(procs):
        return None
    return (f"procs: this process is one of {world} that torchrun started (WORLD_SIZE), but "
            f"--procs asks for {procs}: drop --procs under torchrun")


def launch_processes(argv: Sequence[str], procs: int) -> int:
    """Run this very command as `procs` single-thread processes under torchrun (gloo); its
    exit status. The workers see WORLD_SIZE and run the command itself; the rows they certify
    are the rows one process certifies (each example's noise has its own stream)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The workers import this very smoothcert, whichever way this process found it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_PACKAGE_DIR.parent),
                                                      env.get("PYTHONPATH"))))
    # "--": torchrun would take --n or --max for abbreviations of its own options.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
               "--standalone", "-m", "--", "smoothcert", *argv]
    proc = subprocess.Popen(command, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too; SIGTERM only this process
        proc.terminate()  # torchrun passes it on to the workers, which say what they kept
        proc.wait()
        raise


def _execute(args: argparse.Namespace, threads: int | None = None) -> int:
    """Run the command; `threads`: torch's intra-op threads (default: set_threads())."""
    from .perf import tune_allocator

    tune_allocator()  # big batches otherwise page-fault heavily (docs/benchmarks.md)
    uses_torch = args.command in TORCH_COMMANDS
    if uses_torch:  # the other commands start without importing torch
        from .perf import set_threads

        set_threads(threads)  # one thread per physical core unless OMP_NUM_THREADS says so
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
