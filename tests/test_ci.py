"""CI runs what the README tells a newcomer to run."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    """The command lines of the README's first code block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md opens without a bash block"
    return block.group(1).strip().splitlines()


def test_ci_runs_exactly_the_readmes_test_command():
    install_and_demo, install_and_test = readme_setup_commands()  # exactly two set-up commands
    assert install_and_demo.endswith("&& smoothcert demo")
    test_command = install_and_test.split(" && ")[-1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == test_command
    # The default run leaves the slow tests out; the README's command must bring them back.
    argv = shlex.split(test_command)
    assert argv[:3] == ["python", "-m", "pytest"]
    assert argv[argv.index("-m", 3) + 1] == "slow or not slow"
