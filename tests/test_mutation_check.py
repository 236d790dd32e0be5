"""tools/mutation_check.py: every planted bug must make the statistics/smoothing tests fail."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "mutation_check.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("mutation_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_mutant_still_applies_to_the_code():
    """A refactor that moves a mutant's text must update the mutant (fast; no tests are run)."""
    tool = load_tool()
    names = [mutant.name for mutant in tool.MUTANTS]
    assert len(names) == len(set(names)) >= 8
    for mutant in tool.MUTANTS:
        tool.check_applicable(mutant)
        assert mutant.old != mutant.new
        # a test file, or one test of it (pytest's node id: file::test)
        assert all((ROOT / test.split("::")[0]).is_file() for test in mutant.tests), mutant.name


@pytest.mark.slow
def test_every_mutant_is_killed():
    done = subprocess.run([sys.executable, str(TOOL)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
