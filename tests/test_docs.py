"""The README stays a front door, the docs' links resolve, and the generated tables match the results files."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 15_000
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _update_docs():
    spec = importlib.util.spec_from_file_location("update_docs", ROOT / "benchmarks" / "update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_15_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert missing == [], f"{page.name} links to missing files: {missing}"


def test_generated_tables_match_the_results_files(tmp_path):
    """Running benchmarks/update_docs.py changes nothing: no table was edited by hand or left stale."""
    update_docs = _update_docs()
    copies = []
    for page in PAGES:
        copy = tmp_path / page.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, copy)
        copies.append(copy)
    update_docs.update(copies, ROOT / "benchmarks" / "results")
    stale = [
        p.relative_to(ROOT).as_posix()
        for p, c in zip(PAGES, copies, strict=True)
        if p.read_text() != c.read_text()
    ]
    assert stale == [], f"run `python benchmarks/update_docs.py`: {stale} differ from benchmarks/results/"


def test_update_rewrites_only_the_pages_that_changed_by_renaming_a_whole_file(tmp_path):
    update_docs = _update_docs()
    results = tmp_path / "results"
    results.mkdir()
    (results / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    page = "# Page\n<!-- results:t -->\n{}\n<!-- /results:t -->\n"
    fresh, stale = tmp_path / "fresh.md", tmp_path / "stale.md"
    fresh.write_text(page.format("| a |\n|---|\n| 1 |"))
    stale.write_text(page.format("an old table"))
    inodes = {p: p.stat().st_ino for p in (fresh, stale)}
    done = update_docs.update([fresh, stale], results)
    assert done == ["fresh.md: t", "stale.md: t"]
    assert fresh.stat().st_ino == inodes[fresh]  # same text: the file is not touched
    assert stale.stat().st_ino != inodes[stale]  # a new file renamed over the old one
    assert stale.read_text() == fresh.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.md", "results", "stale.md"]  # no temp file
