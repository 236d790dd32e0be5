"""The torch-free parts start without importing torch (seconds of start-up on a CPU machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "torchvision")


def imported(*argv: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """The top-level packages `python -X importtime argv` imports, and the process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                          text=True, env=env, timeout=120)
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +([\w]+)", done.stderr, re.M))
    return names, done


def test_the_import_listing_sees_torch_where_it_is_imported():
    names, done = imported("-c", "import smoothcert.smooth")
    assert done.returncode == 0 and {"torch", "smoothcert"} <= names


@pytest.mark.parametrize("module", ["stats", "results", "sequential", "analyze", "cli"])
def test_torch_free_modules_do_not_import_torch(module):
    names, done = imported("-c", f"import smoothcert.{module}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smoothcert" in names and not names & set(HEAVY)


@pytest.mark.parametrize("argv", [["--help"], ["analyze", "--help"], ["verify", "--help"],
                                  ["certify", "--help"], ["analyze", "missing.tsv"],
                                  ["verify", "missing.tsv"]])
def test_commands_without_a_network_start_without_torch(argv, tmp_path):
    names, done = imported("-m", "smoothcert", *argv)
    assert done.returncode in (0, 2), done.stderr[-2000:]
    if argv[-1] == "missing.tsv":  # the command ran (and refused the missing file)
        assert done.returncode == 2 and "missing.tsv" in done.stderr
    assert not names & set(HEAVY)
