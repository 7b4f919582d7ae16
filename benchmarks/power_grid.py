"""Uniform vs power grid (docs/algorithms.md 1.2): weight-only W3/W4, RTN and SQuant, beside FP32.

    OMP_NUM_THREADS=1 python benchmarks/power_grid.py --models resnet20-cifar10
    OMP_NUM_THREADS=1 python benchmarks/power_grid.py --models efficientnet-lite0 --limit 500

The power grid's exponent is searched per layer (recipe ``grid: power``, ``power_exponent: null``); the table
shows the median, min and max of the chosen exponents. Each grid is fitted with min/max ranges (the reference
convention) and with the MSE range search (``w_range: mse``; on the power grid it searches the range of u). Rows already in the JSON file are skipped (delete it
to start over), so an interrupted run resumes and runs for different models (and limits) add up; processes running
at once share the file (`postquant.store.table.ResultTable`).
Writes ``benchmarks/results/power_grid.json`` and ``benchmarks/results/power_grid.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accuracy import CachedEval  # the sibling benchmark script (its folder is on sys.path when run)
from torch import nn

import postquant
from postquant.model import quantized_layers
from postquant.store.files import write_text_atomic
from postquant.store.table import ResultTable
from postquant_lab.evaluate import evaluate
from postquant_lab.zoo import load_model

log = logging.getLogger("benchmarks.power_grid")
RESULTS = Path(__file__).parent / "results"
MODELS = ["resnet20-cifar10", "efficientnet-lite0"]
ROWS = [
    {"w_bits": bits, "method": method, "grid": grid, "w_range": w_range, "power_search": search}
    for w_range in ("minmax", "mse")
    for bits in (4, 3)
    for method in ("rtn", "squant")
    for grid, search in (("uniform", "weights"), ("power", "weights"), ("power", "outputs"))
    if not (search == "outputs" and w_range == "mse")
]
CALIB_SIZE = 256  # calibration samples for the output-error exponent search (input moments)


def _row_id(model: str, row: dict[str, Any]) -> str:
    suffix = "" if row["w_range"] == "minmax" else f":{row['w_range']}"
    suffix += ":outputs" if row["power_search"] == "outputs" else ""
    return f"{model}:W{row['w_bits']}:{row['method']}:{row['grid']}{suffix}"


def _exponents(qmodel: nn.Module) -> list[float]:
    """The exponent chosen for each quantized layer (1.0 for a uniform grid)."""
    return [
        float(layer.grid_exponent) if layer.grid_config.kind == "power" else 1.0
        for layer in quantized_layers(qmodel).values()
    ]


def run(models: list[str], table: ResultTable, limit: int | None) -> dict[str, dict[str, Any]]:
    """Evaluate every row of `models` that `table` lacks (FP32 first), writing each row as it is done."""
    for name in models:
        rows = {_row_id(name, r): r for r in ROWS}
        fp_id = f"{name}:fp32"
        todo = table.missing([fp_id, *rows])
        if not todo:
            continue
        zoo = load_model(name)
        raw = zoo.eval_batches(limit=limit)
        data = CachedEval(raw.path, raw.task, list(raw), raw.n)  # decoded once, evaluated many times
        calib = None
        for key in table.todo(todo):
            if key == fp_id:
                fp = evaluate(zoo.model, zoo, data=data)
                table.put(
                    fp_id, {"model": name, "metric": fp.metric, "value": fp.value, "n": fp.n, "limit": limit}
                )
                continue
            row = rows[key]
            recipe = {**row, "a_bits": None, "calib_size": CALIB_SIZE}
            if row["power_search"] == "outputs" and calib is None:
                calib = zoo.calib_batches(limit=CALIB_SIZE)
            start = time.perf_counter()
            qmodel = postquant.quantize(
                zoo.model,
                recipe,
                calib=calib if row["power_search"] == "outputs" else None,
                example_inputs=zoo.example_inputs,
            )
            seconds = time.perf_counter() - start
            res = evaluate(qmodel, zoo, data=data)
            table.put(
                key,
                {
                    "model": name,
                    **row,
                    "exponents": _exponents(qmodel),
                    "metric": res.metric,
                    "value": res.value,
                    "n": res.n,
                    "quantize_seconds": seconds,
                },
            )
            log.info("%s %s: %.2f (%.1f s)", name, row, res.value, seconds)
    return table.rows


def _exponent_cell(exps: list[float]) -> str:
    if all(a == 1.0 for a in exps):
        return "-"
    return f"{statistics.median(exps):.2f} ({min(exps):.2f}-{max(exps):.2f})"


def markdown(done: dict[str, dict[str, Any]]) -> str:
    """The results table, one row per (model, bits, method, grid)."""
    fp = {r["model"]: r for k, r in done.items() if k.endswith(":fp32")}
    order = {m: i for i, m in enumerate(MODELS)}
    fp = dict(sorted(fp.items(), key=lambda kv: order.get(kv[0], len(order))))
    out = [
        "### Uniform vs power grid, weights only (exponent searched per layer)",
        "",
        "| model | bits | method | grid | range | exponent median (min-max) | value | delta vs FP32 | quantize time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    grid_name = {"weights": "power", "outputs": "power (outputs)"}
    for model, f in fp.items():
        out.append(f"| {model} | FP32 | - | - | - | - | {f['value']:.2f} | - | - |")
        for row in ROWS:
            r = done.get(_row_id(model, row))
            if r is None:
                continue
            out.append(
                f"| {model} | W{r['w_bits']} | {r['method']} | "
                f"{grid_name[row['power_search']] if row['grid'] == 'power' else 'uniform'} | {row['w_range']} | "
                f"{_exponent_cell(r['exponents'])} | "
                f"{r['value']:.2f} | {r['value'] - f['value']:+.2f} | {r['quantize_seconds']:.2f} s |"
            )
    notes = []
    for m, r in fp.items():
        spread = f" (--limit {r['limit']}: spread evenly over the set)" if r.get("limit") else ""
        notes.append(f"{m}: {r['metric']} on {r['n']} samples{spread}")
    out += [
        "",
        f"Metrics: {'; '.join(notes)}. Weight-only: activations float; BatchNorm folded. 'power' searches the "
        "exponent on the weights' squared error; 'power (outputs)' on the layer's output error, diagonal "
        f"approximation sum E[x_j^2] (w - w_hat)^2 with E[x_j^2] measured on {CALIB_SIZE} calibration samples "
        "(`power_search: outputs`). Quantize time is wall-clock on one thread of a shared 2-core CPU (it "
        "includes the exponent search and, for 'outputs', the calibration pass).",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N samples (default: all)")
    parser.add_argument("--json", type=Path, default=RESULTS / "power_grid.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "power_grid.md")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="JSON results of other runs to include in the table"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    done = run(args.models, ResultTable(args.json), args.limit)
    for extra in args.merge:  # e.g. a concurrent run of another model into its own JSON file
        done = {**ResultTable(extra).rows, **done}
    write_text_atomic(args.out, markdown(done))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
