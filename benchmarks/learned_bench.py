"""Learned rounding beside FP32, RTN and SQuant on the zoo models: accuracy and wall time.

Writes ``benchmarks/results/learned.md`` (a table) and ``benchmarks/results/learned.json`` (one row per
model x bits x method). Resumable: rows already in the JSON file are skipped, so an interrupted run can be
restarted with the same command; several runs at once (one per core) share the file and split the rows.

The published iteration counts (AdaRound 10k, BRECQ/QDrop 20k per unit) do not fit a shared 2-core CPU:
``--classic-iters`` caps them, and the table says so in its "iters" column.

Example:
    python benchmarks/learned_bench.py --models resnet20-cifar10 --bits W4A4 --classic-iters 400
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import postquant
from postquant.reconstruct import PRESETS
from postquant.store.files import write_text_atomic
from postquant.store.table import ListedRows, ResultTable
from postquant_lab.evaluate import evaluate
from postquant_lab.zoo import load_model

log = logging.getLogger("learned_bench")

BITS = {
    "resnet20-cifar10": ["W4A4", "W2A4", "W2", "W3"],
    "resnet56-cifar10": ["W4A4", "W2A4", "W2", "W3"],
    "efficientnet-lite0": ["W4A8", "W4A4"],
    "minilm-l6": ["W4", "W4A8"],
}
METHODS = ["fp32", "rtn", "squant", "adaround", "brecq", "qdrop", "learned", "learned-fast"]
CLASSIC = ("adaround", "brecq", "qdrop")


def parse_bits(text: str) -> tuple[int, int | None]:
    """'W4A4' -> (4, 4); 'W3' -> (3, None)."""
    w, _, a = text.upper().removeprefix("W").partition("A")
    return int(w), (int(a) if a else None)


def recipe_for(method: str, bits: str, args: argparse.Namespace) -> dict[str, Any]:
    """The recipe of one row. Every method shares the plan (first/last layers as the recipe default says) and
    the activation observer, so that the rows differ only in how codes are chosen."""
    w_bits, a_bits = parse_bits(bits)
    recipe: dict[str, Any] = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "seed": args.seed}
    if a_bits is not None:
        recipe["a_observer"] = args.a_observer
    if method in PRESETS:
        learned: dict[str, Any] = {"progress": False, "first_last_w_bits": None}
        if method in CLASSIC and args.classic_iters is not None:
            learned["iters"] = min(args.classic_iters, PRESETS[method]["iters"])
        if method == "learned" and args.default_iters is not None:
            learned["iters"] = args.default_iters
        recipe["learned"] = learned
        recipe["calib_size"] = args.calib_size
    return recipe


def row_key(model: str, bits: str, method: str) -> str:
    return f"{model}|{bits}|{method}"


def run_row(zoo: Any, model: str, bits: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    limit = args.limit.get(model)
    if method == "fp32":
        start = time.perf_counter()
        res = evaluate(zoo.model, zoo, limit=limit)
        return {
            "model": model,
            "bits": "-",
            "method": "fp32",
            "metric": res.metric,
            "value": res.value,
            "n": res.n,
            "quantize_s": 0.0,
            "iters": "-",
            "calib": "-",
            "eval_s": time.perf_counter() - start,
        }
    recipe = postquant.Recipe.coerce(recipe_for(method, bits, args))
    needs_calib = method in PRESETS or recipe.a_bits is not None
    calib_n = args.calib_size if method in PRESETS else args.act_calib_size
    calib = zoo.calib_batches(limit=calib_n) if needs_calib else None
    start = time.perf_counter()
    qmodel = postquant.quantize(zoo.model, recipe, calib=calib, example_inputs=zoo.example_inputs)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    res = evaluate(qmodel, zoo, limit=limit)
    iters: Any = "-"
    if recipe.learned is not None:
        published = PRESETS[method]["iters"]
        iters = f"{recipe.learned.iters}" + (
            "" if recipe.learned.iters == published else f" (of {published})"
        )
    report = postquant.result(qmodel).learned
    return {
        "model": model,
        "bits": bits,
        "method": method,
        "metric": res.metric,
        "value": res.value,
        "n": res.n,
        "quantize_s": seconds,
        "iters": iters,
        "calib": calib_n if needs_calib else 0,
        "eval_s": time.perf_counter() - start,
        "units": report.as_dict()["units"] if report is not None else None,
    }


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model x bits, one column per method: ``value (seconds s, iters)``; '-' = not measured."""
    fp = {r["model"]: r["value"] for r in rows if r["method"] == "fp32"}
    cell = {(r["model"], r["bits"], r["method"]): r for r in rows}
    methods = [m for m in METHODS if m != "fp32"]
    lines = [
        "Summary: value (quantize seconds; iterations per unit where cut from the preset's).",
        "",
        "| model | bits | FP32 | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for model, bits_list in BITS.items():
        for bits in bits_list:
            if not any((model, bits, m) in cell for m in methods):
                continue
            cells = []
            for m in methods:
                r = cell.get((model, bits, m))
                if r is None:
                    cells.append("-")
                    continue
                cut = f", {str(r['iters']).split()[0]} it" if "(of" in str(r["iters"]) else ""
                cells.append(f"{r['value']:.2f} ({r['quantize_s']:.0f} s{cut})")
            lines.append(
                f"| {model} | {bits} | {fp.get(model, float('nan')):.2f} | " + " | ".join(cells) + " |"
            )
    return lines


def write_markdown(rows: list[dict[str, Any]], path: Path, commands: list[str]) -> None:
    lines = [
        "# Learned rounding on the zoo models",
        "",
        "Produced by (resumable; each command adds the rows it was given):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "Accuracy (top-1 %, or Spearman x100 for minilm-l6) on the evaluation set (`n` samples), quantize wall",
        "time on a shared 2-core CPU (1 torch thread; other jobs were running, so times are noisy).",
        "`iters` is per reconstruction unit; `(of N)` marks a preset cut from its N iterations (the published",
        "ones for adaround/brecq/qdrop) to fit the CPU budget. All methods share the plan (every layer at the",
        "row's bits, the first layer's",
        "input float, the last layer's input 8-bit) and activation ranges from the same observer on the",
        "calibration set (MSE, `--a-observer`; the default of learned rounding); BRECQ/QDrop's 8-bit first/last",
        "weights are *not* used here (same plan for all rows).",
        "",
        *summary_table(rows),
        "",
        "All rows:",
        "",
        "| model | bits | method | value | delta vs FP32 | quantize s | iters | calib | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp = {r["model"]: r["value"] for r in rows if r["method"] == "fp32"}
    order = {m: i for i, m in enumerate(METHODS)}
    models = list(dict.fromkeys(r["model"] for r in rows))
    for r in sorted(
        rows,
        key=lambda r: (models.index(r["model"]), r["bits"] != "-", r["bits"], order.get(r["method"], 99)),
    ):
        delta = "" if r["method"] == "fp32" or r["model"] not in fp else f"{r['value'] - fp[r['model']]:+.2f}"
        lines.append(
            f"| {r['model']} | {r['bits']} | {r['method']} | {r['value']:.2f} | {delta} | {r['quantize_s']:.1f} | "
            f"{r['iters']} | {r['calib']} | {r['n']} |"
        )
    write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BITS))
    p.add_argument("--bits", nargs="+", default=None, help="e.g. W4A4 W2 (default: each model's list)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument(
        "--classic-iters", type=int, default=None, help="cap the iterations of adaround/brecq/qdrop"
    )
    p.add_argument("--default-iters", type=int, default=None, help="iterations of the 'learned' default")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration samples of learned methods")
    p.add_argument(
        "--act-calib-size", type=int, default=256, help="calibration samples for RTN/SQuant act ranges"
    )
    p.add_argument("--a-observer", default="mse")
    p.add_argument("--limit", nargs="*", default=[], help="MODEL=N: evaluate on N samples of that model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON rows")
    args = p.parse_args()
    args.limit = {k: int(v) for k, v in (item.split("=") for item in args.limit)}
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("postquant.model.fold", "postquant.reconstruct.loop"):
        logging.getLogger(name).setLevel(logging.WARNING)

    args.out.mkdir(parents=True, exist_ok=True)
    md_path, commands_path = args.out / "learned.md", args.out / "learned_commands.txt"
    table = ResultTable(
        args.out / "learned.json",
        layout=ListedRows(lambda r: row_key(r["model"], r["bits"], r["method"])),
        lock_path=args.out / "learned.lock",
    )
    if args.render:
        write_markdown(list(table.rows.values()), md_path, commands_path.read_text().splitlines())
        return
    commands = commands_path.read_text().splitlines() if commands_path.is_file() else []
    command = "python benchmarks/learned_bench.py " + " ".join(sys.argv[1:])
    if command not in commands:
        commands.append(command)
        write_text_atomic(commands_path, "\n".join(commands) + "\n")
    for model in args.models:
        zoo = None
        todo = [("-", "fp32")] if "fp32" in args.methods else []
        todo += [
            (b, m)
            for b in (args.bits or BITS[model])
            if b in BITS[model]
            for m in args.methods
            if m != "fp32"
        ]
        rows = {row_key(model, bits, method): (bits, method) for bits, method in todo}
        for key in table.todo(rows):  # rows already in the JSON file, or in another process's hands, skipped
            bits, method = rows[key]
            zoo = zoo or load_model(model)
            log.info("row %s %s %s", model, bits, method)
            row = run_row(zoo, model, bits, method, args)
            log.info("-> %.2f in %.1f s", row["value"], row["quantize_s"])
            table.put(key, row)
            write_markdown(list(table.rows.values()), md_path, commands_path.read_text().splitlines())


if __name__ == "__main__":
    main()
