"""One name per concept on the command line (docs/CONTRIBUTING.md, "Vocabulary"): the new
spellings, the old ones still parsing the same for scripts written before, and `--amp none`."""

from __future__ import annotations

import re

import pytest
from test_cli import cli as run

from smoothcert.cli import build_parser

CERTIFY = ["certify", "c.pt", "--out", "r.tsv"]
# (new spelling, old spelling, a value, the RunConfig field both fill)
RENAMED = [("--layout", "--method", "tcertify", "method"),
           ("--checkpoint-format", "--format", "macer", "format"),
           ("--model", "--arch", "lenet", "arch"),
           ("--N", "--n", "500", "n"),
           ("--max-examples", "--max", "7", "max")]


def parse(*argv: str):
    return build_parser(list(argv)).parse_args(list(argv))


@pytest.mark.parametrize("new, old, value, field", RENAMED)
def test_the_new_and_the_old_spelling_fill_the_same_field(new, old, value, field):
    by_new, by_old = parse(*CERTIFY, new, value), parse(*CERTIFY, old, value)
    assert getattr(by_new, field) == getattr(by_old, field) != getattr(parse(*CERTIFY), field)
    assert vars(by_new) == vars(by_old)


def test_without_either_spelling_the_defaults_are_those_of_before():
    args = parse(*CERTIFY)
    assert (args.method, args.format, args.arch, args.n, args.max) == (
        None, "auto", None, 100_000, None)


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_help_shows_the_new_spelling_and_names_the_old_one_as_alias(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    for new, old, _, _ in RENAMED:
        if new == "--layout" and command == "predict":
            continue
        assert f"(alias: {old})" in " ".join(out.split())
        assert f"  {new} " in out
        assert not re.search(rf"(  |, ){old}[ \n]", out)  # the old spelling is not listed


@pytest.mark.parametrize("argv", [CERTIFY, ["predict", "c.pt", "--out", "r.tsv"], ["demo"],
                                  ["train"]])
def test_amp_none_means_float32_in_every_command(argv):
    assert parse(*argv, "--amp", "none").amp is None
    assert parse(*argv, "--amp", "fp16").amp == "fp16"
    assert parse(*argv, "--amp", "bf16").amp == "bf16"


@pytest.mark.parametrize("command", [CERTIFY, ["demo"], ["train"]])
def test_an_unknown_amp_is_a_usage_error_naming_the_choices(capsys, command):
    code, _, err = run(capsys, *command, "--amp", "fp32")
    assert code == 2
    assert "argument --amp: invalid choice: 'fp32' (choose from 'none', 'bf16', 'fp16')" in err


def test_the_demo_still_defaults_to_bf16():
    assert parse("demo").amp == "bf16"


def test_the_demo_counts_its_examples_with_certifys_name_and_keeps_its_old_one():
    assert parse("demo", "--max-examples", "6").num_certify == 6
    assert parse("demo", "--certify", "6").num_certify == 6
    assert parse("demo").num_certify == 250
