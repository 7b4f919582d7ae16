"""Check study findings against the learned-rounding default at its full budget (the CLI's defaults).

    OMP_NUM_THREADS=1 python benchmarks/default_check.py            # run what is missing, write the table
    OMP_NUM_THREADS=1 python benchmarks/default_check.py --no-run   # only rewrite the table

The study (`postquant study`) measures each choice at a reduced budget (100 iterations per unit, 256
calibration samples). Before a study finding changes the default recipe, the same change is run here with
`postquant quantize resnet20-cifar10 --method learned` at the default's full budget (200 iterations per unit,
1024 calibration samples), one row per (variant, setting, seed) of ``benchmarks/results/default_check/results.json``
(a `postquant.store.table.ResultTable`: the rows there are kept, so an interrupted run resumes, and processes
started together split the runs left). EfficientNet-Lite0 runs at the study's reduced
budget instead (20 iterations per unit, 64 calibration samples, 400 evaluation images: the full budget takes
hours on a CPU), with the default's MSE activation ranges. Writes ``default_check/table.md``: mean over the
seeds run, and each seed's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postquant.store.files import write_text_atomic
from postquant.store.table import ResultTable

log = logging.getLogger("benchmarks.default_check")
OUT = Path(__file__).parent / "results" / "default_check"
RESULTS = OUT / "results.json"  # {row key: the JSON that `postquant quantize --json` wrote}
# label -> (file prefix, recipe YAML in OUT or None for the CLI default). The YAMLs pin every field that the
# default has changed since they were run (observer, selection), so each row means the same thing tomorrow.
VARIANTS: dict[str, tuple[str, str | None]] = {
    "default (MSE ranges, selection auto)": ("default", None),
    "MSE ranges, all weights learned": ("mse_all", "mse_all.yaml"),
    "MSE ranges, random 0.5 selection at every bit width": ("random_half_mse", "random_half_mse.yaml"),
    "MSE ranges, all weights, 2 blocks per unit": ("two_blocks_mse", "two_blocks_mse.yaml"),
    "MSE ranges, all weights, no start guard": ("no_guard", "no_guard.yaml"),
    "default + learned steps (STE grid codes, weight and activation step sizes)": (
        "auto_act_scales",
        "auto_act_scales.yaml",
    ),
    "min/max ranges, all weights (the default before 2026-12-03)": (
        "minmax_observer",
        "minmax_observer.yaml",
    ),
    "min/max ranges, random 0.5 selection": ("random_half", "random_half.yaml"),
    "min/max ranges, all weights, 2 blocks per unit": ("two_blocks", "two_blocks.yaml"),
    "min/max ranges, all weights, no start guard": ("no_guard_minmax", "no_guard_minmax.yaml"),
}


@dataclass(frozen=True)
class Setting:
    """A table column: the model, its bits and the CLI arguments beyond the defaults."""

    model: str
    w_bits: int
    a_bits: int
    extra: tuple[str, ...] = ()
    prefix: str = ""  # of its JSON files


LITE0_BUDGET = ("--iters", "20", "--calib-size", "64", "--limit", "400")
SETTINGS = {
    "W4A4": Setting("resnet20-cifar10", 4, 4),
    "W2A4": Setting("resnet20-cifar10", 2, 4),
    "lite0 W4A8": Setting("efficientnet-lite0", 4, 8, LITE0_BUDGET, prefix="lite0_"),
}


def row_key(label: str, column: str, seed: int) -> str:
    """The key of a run in `RESULTS`, e.g. ``lite0_default_W4A8_seed1``."""
    setting = SETTINGS[column]
    return f"{setting.prefix}{VARIANTS[label][0]}_W{setting.w_bits}A{setting.a_bits}_seed{seed}"


def run_one(label: str, column: str, seed: int) -> dict[str, Any]:
    """One `postquant quantize` run in a subprocess (the CLI's defaults); the JSON it writes."""
    setting = SETTINGS[column]
    with tempfile.TemporaryDirectory() as tmp:
        json_file = Path(tmp) / "result.json"
        cmd = ["postquant", "quantize", setting.model, "--method", "learned"]
        cmd += ["--w-bits", str(setting.w_bits), "--a-bits", str(setting.a_bits), *setting.extra]
        cmd += ["--seed", str(seed), "--json", str(json_file)]
        recipe = VARIANTS[label][1]
        if recipe is not None:
            cmd += ["--recipe", str(OUT / recipe)]
        log.info("%s", " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=OUT)
        return json.loads(json_file.read_text())


def results_table() -> ResultTable:
    return ResultTable(
        RESULTS,
        indent=2,
        newline=True,
        what="default-check results table",
        damaged_hint="restore it from git, or move it away to run every check again",
    )


def table(rows: dict[str, Any]) -> str:
    """The markdown table of `rows` (`RESULTS`' rows): per variant and setting, the mean over seeds 0-2."""
    lines = [
        "`postquant quantize MODEL --method learned`: resnet20-cifar10 at the full default budget (W4A4, W2A4),",
        f"efficientnet-lite0 at the study's budget ({' '.join(LITE0_BUDGET)}); top-1 (%), mean over seeds",
        "(each seed in brackets).",
        "",
        "| variant | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
    ]
    for label in VARIANTS:
        cells = []
        for column in SETTINGS:
            values = [
                rows[key]["quantized"] for seed in range(3) if (key := row_key(label, column, seed)) in rows
            ]
            cells.append(
                f"{statistics.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})" if values else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-run", action="store_true", help="only rewrite the table from the JSONs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    results = results_table()
    if not args.no_run:
        runs = {
            row_key(label, column, seed): (label, column, seed)
            for label in args.variants
            for column in args.settings
            for seed in range(args.seeds)
        }
        for key in results.todo(runs):  # rows already there, or in another process's hands, skipped
            results.put(key, run_one(*runs[key]))
    results.refresh()
    write_text_atomic(OUT / "table.md", table(results.rows))
    log.info("wrote %s", OUT / "table.md")


if __name__ == "__main__":
    main()
