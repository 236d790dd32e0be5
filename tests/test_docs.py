"""Every `smoothcert` command line in the README's and docs' shell blocks parses with the real
parser (parse only, nothing runs), so the documentation cannot drift from the options."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from smoothcert.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"|", "||", "&&", ";", ">", ">>"}
# Shell variables of the documented loops (for s in 0.25 0.5 1.0; ...) get a value of their kind.
VARIABLE = re.compile(r"\$\{?\w+\}?")


def shell_blocks(text: str) -> list[str]:
    """The contents of the Markdown text's fenced blocks that are shell (or unlabelled)."""
    blocks, lines, language = [], None, ""
    for line in text.splitlines():
        if not line.startswith("```"):
            if lines is not None:
                lines.append(line)
        elif lines is None:
            language, lines = line[3:].strip(), []
        else:
            if language in SHELL:
                blocks.append("\n".join(lines))
            lines = None
    return blocks


def command_lines(text: str) -> list[list[str]]:
    """The argument lists given to `smoothcert` (directly, or `-m smoothcert` under python or
    torchrun) in the shell code blocks of a Markdown text."""
    found = []
    for block in shell_blocks(text):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            if "smoothcert" not in line:  # output or prose in an unlabelled block
                continue
            lexer = shlex.shlex(VARIABLE.sub("0.5", line), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True  # "--out o.tsv;" is "--out", "o.tsv", ";"
            tokens = list(lexer)
            segment: list[str] = []
            for token in [*tokens, ";"]:
                if token not in SEPARATORS:
                    segment.append(token)
                    continue
                for i, word in enumerate(segment):
                    if Path(word).name == "smoothcert" and (i == 0 or segment[i - 1] == "-m"):
                        found.append([t for t in segment[i + 1:] if t != "..."])
                        break
                segment = []
    return found


def documented() -> list[tuple[str, list[str]]]:
    return [(f"{path.name}: smoothcert {shlex.join(argv)}", argv)
            for path in DOCS for argv in command_lines(path.read_text())]


def test_the_extraction_finds_the_documented_commands():
    text = ("```bash\nsmoothcert train --preset p \\\n  --k 2 | tee x  # note\n```\n"
            "```python\nsmoothcert.x()\n```\n"
            "```\nfor s in 1; do torchrun --nproc_per_node 4 -m smoothcert certify c \\\n"
            "  --sigma $s --out o.tsv; done && smoothcert analyze a.tsv ...\n```\n")
    assert command_lines(text) == [["train", "--preset", "p", "--k", "2"],
                                   ["certify", "c", "--sigma", "0.5", "--out", "o.tsv"],
                                   ["analyze", "a.tsv"]]
    commands = {argv[0] for _, argv in documented()}
    assert {"train", "certify", "analyze", "presets"} <= commands <= set(COMMANDS)


@pytest.mark.parametrize("where, argv", documented(), ids=[w for w, _ in documented()])
def test_every_documented_command_line_parses(where, argv):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as exit_:
            assert exit_.code == 0, f"{where}\n{stderr.getvalue()}"


def old_spellings(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The options of `command` hidden from --help that fill another, shown option's field."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = commands.choices[command]._actions
    shown = {a.dest for a in actions if a.help != argparse.SUPPRESS}
    return {flag for a in actions if a.help == argparse.SUPPRESS and a.dest in shown
            for flag in a.option_strings}


def test_the_old_spellings_are_known_to_the_test():
    parser = build_parser(["train"])
    assert old_spellings(parser, "certify") == {"--method", "--format", "--arch", "--n", "--max"}
    assert old_spellings(parser, "demo") == {"--n", "--certify"}
    assert old_spellings(parser, "train") == {"--method"}


@pytest.mark.parametrize("where, argv", documented(), ids=[w for w, _ in documented()])
def test_documented_command_lines_use_the_one_name_of_each_option(where, argv):
    old = old_spellings(build_parser(argv), argv[0])
    assert not old & {token.split("=")[0] for token in argv}, where
