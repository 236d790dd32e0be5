"""The README's demo section is the published demo report's, not numbers typed by hand."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import publish_demo  # noqa: E402


def test_the_readme_section_is_regenerated_from_docs_demo_md():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    report = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    block = readme[readme.index(publish_demo.START):readme.index(publish_demo.END)
                   + len(publish_demo.END)]
    note = re.search(r"^A fresh run took .*$", block, re.M)
    assert note is not None
    assert block == publish_demo.readme_section(report, note.group(0))


def test_the_published_report_links_figures_that_exist():
    report = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert set(links) == set(publish_demo.FIGURES.values())
    assert all((ROOT / "docs" / link).is_file() for link in links)


def test_a_report_without_its_conclusion_is_refused():
    with pytest.raises(ValueError, match="no section starting '## Conclusion'"):
        publish_demo.readme_section("# demo\n\n## Certified accuracy\n\n| a |\n", "note")


def test_the_section_is_replaced_between_the_markers_only():
    readme = f"head\n{publish_demo.START}\nold\n{publish_demo.END}\ntail\n"
    new = f"{publish_demo.START}\nnew\n{publish_demo.END}"
    assert publish_demo.replace_section(readme, new) == f"head\n{new}\ntail\n"
    with pytest.raises(ValueError, match="exactly once"):
        publish_demo.replace_section("no markers", new)
