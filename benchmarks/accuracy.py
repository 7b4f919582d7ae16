"""Accuracy of nearest rounding (RTN) and SQuant on the real models, beside FP32, with quantization times.

    python benchmarks/accuracy.py --suite all          # every table (about 30-60 min on 2 cores)
    python benchmarks/accuracy.py --suite rtn --models resnet20-cifar10

Rows already in the JSON file are skipped (delete it to start over), so an interrupted run resumes; processes
running at once (one per core) share the file and split the rows (`postquant.store.table.ResultTable`).
Writes ``benchmarks/results/accuracy.json`` and the markdown tables ``benchmarks/results/accuracy.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import postquant
from postquant.store.files import write_text_atomic
from postquant.store.table import ResultTable
from postquant_lab.evaluate import evaluate
from postquant_lab.zoo import ZooModel, load_model

log = logging.getLogger("benchmarks.accuracy")
RESULTS = Path(__file__).parent / "results"
IMAGE_MODELS = ["resnet20-cifar10", "resnet56-cifar10", "efficientnet-lite0"]
TEXT_MODELS = ["minilm-l6"]
CALIB_SIZE = 256


def _suite_rows(suite: str, model: str) -> list[dict[str, Any]]:
    """The recipes of one suite for one model (each a dict of Recipe fields plus a 'label')."""
    image = model in IMAGE_MODELS
    rows: list[dict[str, Any]] = []
    if suite == "rtn":  # foundation table: RTN, activation ranges from 256 calibration samples (min/max)
        bits = (
            [(8, 8), (6, 6), (4, 8), (4, 4), (4, None), (3, None)]
            if image
            else [(8, 8), (8, None), (6, None), (4, None)]
        )
        rows = [
            {"label": "rtn", "method": "rtn", "w_bits": w, "a_bits": a, "act_ranges": "calib"}
            for w, a in bits
        ]
    elif suite == "squant":  # SQuant table: data-free; RTN beside it with the same activation rule
        if image:
            bits = [(8, 8), (6, 6), (4, 4), (4, None), (3, None)]
            for w, a in bits:
                for method in ("rtn", "squant"):
                    rows.append(
                        {
                            "label": f"{method} (data-free acts)" if a else method,
                            "method": method,
                            "w_bits": w,
                            "a_bits": a,
                            "act_ranges": "squant-noise",
                        }
                    )
                if a is not None and a <= 6:
                    rows.append(
                        {
                            "label": "squant (bn-noise acts)",
                            "method": "squant",
                            "w_bits": w,
                            "a_bits": a,
                            "act_ranges": "bn-noise",
                            "a_observer": "percentile",
                        }
                    )
        else:
            for w, a in [(8, None), (6, None), (4, None), (8, 8)]:
                for method in ("rtn", "squant"):
                    rows.append(
                        {
                            "label": method + (" (calib acts)" if a else ""),
                            "method": method,
                            "w_bits": w,
                            "a_bits": a,
                            "act_ranges": "calib",
                        }
                    )
    elif suite == "gptq":  # weights only, beside RTN and SQuant (rows the squant suite may already hold)
        for w in (4, 3):
            for method in ("rtn", "squant", "gptq"):
                rows.append({"label": method, "method": method, "w_bits": w, "a_bits": None})
    elif suite == "ablation" and model in ("resnet20-cifar10", "efficientnet-lite0"):
        for w in (4, 3):
            for mode in ("e", "ek", "ec", "ekc"):
                rows.append(
                    {
                        "label": f"squant-{mode}",
                        "method": "squant",
                        "squant_mode": mode,
                        "w_bits": w,
                        "a_bits": None,
                    }
                )
    return rows


@dataclass
class CachedEval:
    """An evaluation set decoded once and kept in memory (the benchmark evaluates it many times)."""

    path: Path
    task: str
    batches: list[Any]
    n: int

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _row_id(model: str, row: dict[str, Any]) -> str:
    if row.get("a_bits") is None:  # weight-only: the activation rule plays no part
        row = {k: v for k, v in row.items() if k not in ("act_ranges", "a_observer")}
    return model + ":" + ",".join(f"{k}={v}" for k, v in sorted(row.items()))


def run(
    models: list[str], suites: list[str], table: ResultTable, limit: int | None
) -> dict[str, dict[str, Any]]:
    """Evaluate every row of `models` that `table` lacks (FP32 first), writing each row as it is done."""
    for name in models:
        rows = {_row_id(name, r): (s, r) for s in suites for r in _suite_rows(s, name)}
        fp_id = f"{name}:fp32"
        todo = table.missing([fp_id, *rows])
        if not todo:
            continue
        zoo: ZooModel = load_model(name)
        data = zoo.eval_batches(limit=limit)
        cached = CachedEval(data.path, data.task, list(data), data.n)
        calib = zoo.calib_batches(limit=CALIB_SIZE)
        for key in table.todo(todo):
            if key == fp_id:
                fp = evaluate(zoo.model, zoo, data=cached)
                table.put(
                    fp_id, {"model": name, "suite": "fp32", "metric": fp.metric, "value": fp.value, "n": fp.n}
                )
                continue
            suite, row = rows[key]
            recipe = {k: v for k, v in row.items() if k != "label"}
            start = time.perf_counter()
            qmodel = postquant.quantize(zoo.model, recipe, calib=calib, example_inputs=zoo.example_inputs)
            seconds = time.perf_counter() - start
            res = evaluate(qmodel, zoo, data=cached)
            table.put(
                key,
                {
                    "model": name,
                    "suite": suite,
                    **row,
                    "metric": res.metric,
                    "value": res.value,
                    "n": res.n,
                    "quantize_seconds": seconds,
                },
            )
            log.info("%s %s: %.2f (%.2f s)", name, row, res.value, seconds)
    return table.rows


def _bits(r: dict[str, Any]) -> str:
    return f"W{r['w_bits']}A{r['a_bits']}" if r.get("a_bits") else f"W{r['w_bits']} (weights only)"


def markdown(done: dict[str, dict[str, Any]], limit: int | None) -> str:
    fp = {r["model"]: r for r in done.values() if r["suite"] == "fp32"}
    titles = {
        "rtn": "Nearest rounding (RTN), activation ranges from 256 calibration samples (min/max)",
        "squant": "SQuant vs RTN, data-free (RTN uses the same activation rule)",
        "ablation": "SQuant stages (E = RTN, K = kernel, C = channel), weights only",
        "gptq": "GPTQ (calibration data) vs RTN and SQuant (data-free), weights only",
    }
    out = []
    for suite, title in titles.items():
        sel = [
            done[_row_id(m, r)] | {"label": r["label"]}
            for m in fp
            for r in _suite_rows(suite, m)
            if _row_id(m, r) in done
        ]
        if not sel:
            continue
        out += [
            f"### {title}",
            "",
            "| model | bits | method | FP32 | quantized | delta | quantize time |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            f = fp[r["model"]]
            out.append(
                f"| {r['model']} | {_bits(r)} | {r['label']} | {f['value']:.2f} | {r['value']:.2f} | "
                f"{r['value'] - f['value']:+.2f} | {r['quantize_seconds']:.2f} s |"
            )
        out.append("")
    metrics = ", ".join(f"{m}: {r['metric']} on {r['n']} samples" for m, r in fp.items())
    if limit:
        metrics += (
            f" (--limit {limit}: samples spread evenly over the set; FP32 measured on the same samples)"
        )
    out.append(
        f"Metrics: {metrics}. Times are wall-clock on a shared 2-core CPU and include activation calibration."
    )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["rtn", "squant", "ablation", "gptq", "all"], default="all")
    parser.add_argument("--models", nargs="*", default=IMAGE_MODELS + TEXT_MODELS)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N samples (default: all)")
    parser.add_argument("--json", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.md")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="JSON results of other runs to include"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    suites = ["rtn", "squant", "ablation", "gptq"] if args.suite == "all" else [args.suite]
    table = ResultTable(args.json)
    for extra in args.merge:  # results of other runs (e.g. one process per model); rows here are kept
        if extra.exists():
            table.put_many({k: v for k, v in ResultTable(extra).rows.items() if k not in table})
    done = run(args.models, suites, table, args.limit)
    write_text_atomic(args.out, markdown(done, args.limit))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
