"""Showing an allocation: a rich table, a PNG plot of bits per layer, and ``allocation.json``.

The plot is drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend
switch), like `postquant.io.report`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.table import Table

from postquant.errors import OutputError
from postquant.mixed.apply import MixedResult

__all__ = ["allocation_table", "plot_bits", "write_allocation"]

log = logging.getLogger(__name__)

PLOT_FILE = "bits.png"
JSON_FILE = "allocation.json"


def _title(result: MixedResult) -> str:
    budget = (
        f"budget {result.w_bits_budget:g} average bits"
        if result.w_bits_budget is not None
        else f"budget {result.size_budget} bytes"
    )
    return (
        f"mixed precision ({result.importance} importance, {budget}): "
        f"{result.avg_w_bits:.3f} average weight bits, {result.size_bytes / 1e6:.3f} MB"
    )


def allocation_table(result: MixedResult) -> Table:
    """A rich table: one row per layer with its weights, bits and predicted cost (fixed layers marked)."""
    table = Table(title=_title(result))
    for col, justify in (("layer", "left"), ("weights", "right"), ("bits", "right"), ("cost", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in result.layers:
        bits = f"{row.bits} (fixed)" if row.fixed else str(row.bits)
        table.add_row(row.name, f"{row.numel:,}", bits, "-" if row.fixed else f"{row.cost:.4g}")
    return table


def plot_bits(result: MixedResult, path: str | Path) -> Path:
    """Write a PNG bar chart of weight bits per layer (hatched: fixed by the recipe) to `path`.

    Raises:
        OutputError: `path` cannot be written.
    """
    from matplotlib.figure import Figure  # optional dependency (the report extra)

    path = Path(path)
    rows = result.layers
    fig = Figure(figsize=(max(6.0, 0.25 * len(rows) + 2), 4.5))
    ax = fig.add_subplot()
    colors = {
        2: "#d7301f",
        3: "#fc8d59",
        4: "#fdcc8a",
        5: "#c7e9b4",
        6: "#7fcdbb",
        7: "#41b6c4",
        8: "#225ea8",
    }
    bars = ax.bar(range(len(rows)), [r.bits for r in rows], color=[colors[r.bits] for r in rows])
    for bar, row in zip(bars, rows, strict=True):
        if row.fixed:
            bar.set_hatch("//")
    ax.axhline(result.avg_w_bits, color="black", linestyle="--", linewidth=1, label="average (by weights)")
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_ylim(0, 8.5)
    ax.set_title(_title(result), fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"cannot write the bits plot {path}: {exc.strerror or exc}") from exc
    log.info("wrote %s", path)
    return path


def write_allocation(result: MixedResult, directory: str | Path) -> tuple[Path, Path]:
    """Write ``allocation.json`` and ``bits.png`` to `directory`; return their paths."""
    directory = Path(directory)
    json_path = directory / JSON_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {json_path}: {exc.strerror or exc}") from exc
    return json_path, plot_bits(result, directory / PLOT_FILE)
