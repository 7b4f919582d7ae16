"""Copy the benchmark tables (benchmarks/results/*.md) into the README between their markers.

    python benchmarks/update_readme.py

A section ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` receives ``benchmarks/results/NAME.md`` (NAME may
name a subfolder, e.g. ``study/verdicts``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.update_readme")


def update(readme: Path = ROOT / "README.md", results: Path = ROOT / "benchmarks" / "results") -> list[str]:
    text = readme.read_text()
    done = []
    for name in re.findall(r"<!-- results:([\w/-]+) -->", text):
        table = results / f"{name}.md"
        if not table.exists():
            log.warning("no %s: section %s left as it is", table, name)
            continue
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m, t=table: m.group(1) + t.read_text().strip() + "\n" + m.group(2), text)
        done.append(name)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("updated sections: %s", ", ".join(update()) or "none")
