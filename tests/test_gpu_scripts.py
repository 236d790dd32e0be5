"""Dry runs of every experiments/gpu/*.sh: each command line goes through the real parsers.

Fake `torchrun` and `smoothcert` executables on PATH send their argv to this test process,
which parses it with torch.distributed.run's own parser (then smoothcert's, for `-m
smoothcert`) or with smoothcert.cli.build_parser(), and tells the fake to exit with the
parser's status: a script stops (set -e) at its first command line a parser rejects. Nothing
trains; a parsed `train` only creates its --out folder, so the scripts' loops over finished
runs have runs to go over.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import threading
from multiprocessing.connection import Client, Listener
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from smoothcert.cli import build_parser

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "gpu").glob("*.sh"))
FAKE = """#!{python}
import os, sys
from multiprocessing.connection import Client
with Client(os.environ["FAKE_PARSER_SOCKET"], "AF_UNIX") as connection:
    connection.send(({prog!r}, sys.argv[1:]))
    code, message = connection.recv()
sys.stderr.write(message)
sys.exit(code)
"""


def parse(parser, argv: list[str]):
    """(namespace or None, exit status, what the parser wrote to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv), 0, err.getvalue()
        except SystemExit as exit_:
            return None, int(exit_.code or 0), err.getvalue()


def check(prog: str, argv: list[str], calls: list) -> tuple[int, str]:
    if prog == "torchrun":
        args, code, message = parse(get_args_parser(), argv)
        if code:
            return code, f"torchrun: {message}"
        if not (args.module and args.training_script == "smoothcert"):
            return 2, f"torchrun: expected -m smoothcert, got {args.training_script!r}\n"
        argv = args.training_script_args
    args, code, message = parse(build_parser(), argv)
    calls.append((prog, argv, code))
    if code:
        return code, f"smoothcert: {message}"
    if args.command == "train":
        Path(args.out).mkdir(parents=True, exist_ok=True)
    return 0, ""


@contextlib.contextmanager
def fake_parsers(tmp_path: Path):
    """Fake executables in tmp_path/bin and the server that parses for them; yields calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("torchrun", "smoothcert"):
        path = bin_dir / prog
        path.write_text(FAKE.format(python=sys.executable, prog=prog))
        path.chmod(0o755)
    address = str(tmp_path / "parser.sock")
    calls: list = []
    listener = Listener(address, "AF_UNIX")

    def serve():
        while True:
            try:
                connection = listener.accept()
            except OSError:  # closed
                return
            with connection:
                prog, argv = connection.recv()
                if prog == "stop":
                    return
                connection.send(check(prog, argv, calls))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield bin_dir, address, calls
    finally:
        with Client(address, "AF_UNIX") as connection:
            connection.send(("stop", []))
        server.join(timeout=10)
        listener.close()


# Optional folders a script skips a part for when they are unset: set, so every part runs.
OPTIONAL_FOLDERS = {"certify_cohen_models.sh": ("CIFAR", "IMAGENET"),
                    "denoised_smoothing.sh": ("CIFAR", "IMAGENET")}
# Inputs a script acts on only when they exist (it skips the missing ones): created empty.
PRESENT = {
    "certify_cohen_models.sh": [
        f"MODELS/{folder}/noise_{sigma}/checkpoint.pth.tar"
        for folder, sigmas in (("cifar10/resnet110", ("0.12", "0.25", "0.50", "1.00")),
                               ("imagenet/resnet50", ("0.25", "0.50", "1.00")))
        for sigma in sigmas
    ],
}


def script_environment(script: Path, tmp_path: Path) -> dict[str, str]:
    """A folder for every variable the script requires (${X:?}) and its optional folders."""
    names = set(re.findall(r"\$\{(\w+):\?", script.read_text()))
    names |= set(OPTIONAL_FOLDERS.get(script.name, ()))
    env = {name: str(tmp_path / name) for name in names}
    env["OUT"] = str(tmp_path / "out")
    for relative in PRESENT.get(script.name, []):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return env


def test_there_are_scripts_to_check():
    assert {path.name for path in SCRIPTS} >= {"cifar10_table1.sh", "imagenet_table1.sh"}


def run_script(script: Path, tmp_path: Path) -> list:
    """The script run with the fake parsers: the calls it made (it must succeed)."""
    with fake_parsers(tmp_path) as (bin_dir, address, calls):
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   FAKE_PARSER_SOCKET=address, **script_environment(script, tmp_path))
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return calls


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_every_command_line_of_the_script_parses(script, tmp_path):
    calls = run_script(script, tmp_path)
    commands = [argv[0] for _, argv, _ in calls]
    assert "certify" in commands and "analyze" in commands, commands
    # Every run a script trains is certified afterwards.
    assert commands.count("certify") >= commands.count("train")


def test_the_denoised_smoothing_script_certifies_each_dataset_behind_its_ddpm(tmp_path):
    calls = run_script(SCRIPTS[0].with_name("denoised_smoothing.sh"), tmp_path)
    runs = [build_parser().parse_args(argv) for _, argv, _ in calls if argv[0] == "certify"]
    assert {(args.dataset, args.sigma) for args in runs} == {
        (dataset, sigma) for dataset in ("cifar10", "imagenet") for sigma in (0.25, 0.5, 1.0)}
    for args in runs:
        folder = "CIFAR_DDPM" if args.dataset == "cifar10" else "IMAGENET_DDPM"
        assert args.denoiser == f"diffusers:{tmp_path / folder}"
        assert (args.n0, args.n, args.alpha, args.max) == (100, 100_000, 0.001, 500)
