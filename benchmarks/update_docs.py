"""Copy the benchmark tables into the README and the pages of ``docs/``, between their markers.

    python benchmarks/update_docs.py

In README.md and docs/*.md:

* a section ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` receives ``benchmarks/results/NAME.md`` (NAME may
  name a subfolder, e.g. ``study/verdicts``), its headings shifted to sit one level below the heading the
  section stands under;
* a section ``<!-- summary:NAME -->`` ... ``<!-- /summary:NAME -->`` receives the short table that
  ``benchmarks/summaries.py`` computes from the results files (the README's one table per capability).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from postquant.store.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from summaries import SUMMARIES  # noqa: E402

log = logging.getLogger("benchmarks.update_docs")


HEADING = re.compile(r"^(#+) ", re.M)


def pages(root: Path = ROOT) -> list[Path]:
    """The files that hold markers: the README and every page of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def nested(markdown: str, top: int = 3) -> str:
    """`markdown` with its headings shifted so that the highest one is of level `top` (code blocks aside)."""
    parts = re.split(r"(^```.*?^```)", markdown, flags=re.S | re.M)
    levels = [len(m.group(1)) for part in parts[::2] for m in HEADING.finditer(part)]
    if not levels:
        return markdown
    shift = top - min(levels)
    for i in range(0, len(parts), 2):
        parts[i] = HEADING.sub(lambda m: "#" * (len(m.group(1)) + shift) + " ", parts[i])
    return "".join(parts)


def _level_above(text: str, name: str) -> int:
    """The level of the last heading before section `name`, not counting other sections' contents."""
    before = text[: text.index(f"<!-- results:{name} -->")]
    own = re.sub(r"<!-- results:([\w/-]+) -->.*?<!-- /results:\1 -->", "", before, flags=re.S)
    levels = [len(m.group(1)) for m in HEADING.finditer(own)]
    return levels[-1] if levels else 1


def _fill(text: str, kind: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {kind}:{name} -->\n).*?(<!-- /{kind}:{name} -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def update_text(text: str, results: Path) -> tuple[str, list[str]]:
    """`text` with every results and summary section refilled, and the names of the sections filled."""
    done = []
    for name in re.findall(r"<!-- results:([\w/-]+) -->", text):
        table = results / f"{name}.md"
        if not table.exists():
            log.warning("no %s: section %s left as it is", table, name)
            continue
        text = _fill(text, "results", name, nested(table.read_text().strip(), _level_above(text, name) + 1))
        done.append(name)
    for name in re.findall(r"<!-- summary:([\w-]+) -->", text):
        if name not in SUMMARIES:
            log.warning("no summary named %s: section left as it is", name)
            continue
        text = _fill(text, "summary", name, SUMMARIES[name](results))
        done.append(f"summary:{name}")
    return text, done


def update(files: list[Path] | None = None, results: Path = ROOT / "benchmarks" / "results") -> list[str]:
    """Refill the sections of `files` (default: README.md and docs/*.md); returns 'file: section' names.

    A file is rewritten only when its text changed, and atomically (never half written, its date kept
    otherwise).
    """
    done = []
    for path in files if files is not None else pages():
        before = path.read_text()
        text, names = update_text(before, results)
        if text != before:
            write_text_atomic(path, text)
            log.info("rewrote %s", path)
        done += [f"{path.name}: {name}" for name in names]
    return done


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("updated sections: %s", ", ".join(update()) or "none")
