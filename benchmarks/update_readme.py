"""Copy the benchmark tables (benchmarks/results/*.md) into the README between their markers.

    python benchmarks/update_readme.py

A section ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` receives ``benchmarks/results/NAME.md`` (NAME may
name a subfolder, e.g. ``study/verdicts``). Its headings are shifted to sit one level below the README heading the
section stands under.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.update_readme")


HEADING = re.compile(r"^(#+) ", re.M)


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
    """The level of the last README heading before section `name`, not counting other sections' contents."""
    before = text[: text.index(f"<!-- results:{name} -->")]
    own = re.sub(r"<!-- results:([\w/-]+) -->.*?<!-- /results:\1 -->", "", before, flags=re.S)
    levels = [len(m.group(1)) for m in HEADING.finditer(own)]
    return levels[-1] if levels else 1


def update(readme: Path = ROOT / "README.md", results: Path = ROOT / "benchmarks" / "results") -> list[str]:
    text = readme.read_text()
    done = []
    for name in re.findall(r"<!-- results:([\w/-]+) -->", text):
        table = results / f"{name}.md"
        if not table.exists():
            log.warning("no %s: section %s left as it is", table, name)
            continue
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        body = nested(table.read_text().strip(), _level_above(text, name) + 1)
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
        done.append(name)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("updated sections: %s", ", ".join(update()) or "none")
