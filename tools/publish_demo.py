"""Publish a finished `smoothcert demo` run: docs/demo.md, its figures, the README's section.

    python tools/publish_demo.py runs/demo --machine "2-core AMD EPYC, idle" --wall 8.4 --peak 1.1

The README's "The demo's result" section lies between two marker comments and is rewritten
from the run's report.md (its conclusion and its table), so nothing in it is typed by hand;
tests/test_publish_demo.py checks that README and docs/demo.md agree.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from smoothcert.io import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo:start -->", "<!-- demo:end -->"
FIGURES = {"certified_accuracy.png": "demo_certified_accuracy.png",
           "examples.png": "demo_examples.png"}


def section(report: str, title: str) -> str:
    """The body of the report's `## title…` section, without its heading."""
    match = re.search(rf"^## {re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", report, re.S | re.M)
    if match is None:
        raise ValueError(f"report.md has no section starting '## {title}'")
    return match.group(1).strip()


def docs_report(report: str) -> str:
    """report.md with its figure links pointing at the published copies in docs/."""
    for name, published in FIGURES.items():
        report = report.replace(f"]({name})", f"]({published})")
    return report


def readme_section(report: str, run_note: str) -> str:
    """The README's demo section, from the report's conclusion and table."""
    table = section(report, "Certified accuracy").split("![", 1)[0].strip()
    return "\n".join([
        START,
        "`smoothcert demo` (the first command above; full report: [docs/demo.md](docs/demo.md)):",
        "",
        section(report, "Conclusion"),
        "",
        table,
        "",
        "![certified accuracy of the demo](docs/demo_certified_accuracy.png)",
        "",
        run_note,
        END,
    ])


def replace_section(readme: str, new: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md must hold {START} and {END} exactly once")
    head, rest = readme.split(START)
    return head + new + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the demo's --out folder")
    parser.add_argument("--machine", required=True, help="where it ran, e.g. '2-core EPYC, idle'")
    parser.add_argument("--wall", type=float, required=True, help="wall minutes of a fresh run")
    parser.add_argument("--peak", type=float, required=True, help="peak resident memory, GiB")
    args = parser.parse_args()
    report = (args.run / "report.md").read_text(encoding="utf-8")
    note = (f"A fresh run took {args.wall:.1f} minutes of wall time with a peak resident memory "
            f"of {args.peak:.1f} GiB on {args.machine}.")
    readme = ROOT / "README.md"
    new_readme = replace_section(readme.read_text(encoding="utf-8"), readme_section(report, note))
    atomic_write_text(ROOT / "docs" / "demo.md", docs_report(report))
    for name, published in FIGURES.items():
        atomic_write_bytes(ROOT / "docs" / published, (args.run / name).read_bytes())
    atomic_write_text(readme, new_readme)


if __name__ == "__main__":
    main()
