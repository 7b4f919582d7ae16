"""Importance-based mixed precision vs uniform bits at the same average weight bits, weight-only.

For each model: FP32, uniform W3, and mixed precision at an average of 3 weight bits (choices 2,3,4,6,8) for
each importance measure, with nearest rounding (RTN) and SQuant. Every quantized row reports the achieved
average weight bits and the bytes of the checkpoint's tensors (`postquant.mixed.size.model_bytes`), so that
"same size" can be checked in the table.

Every row also reports the **output error** that the allocation minimises a sum of per-layer predictions of:
the distance of the quantized model's output to the float model's with every layer quantized at once (KL of
the logits, or the masked token MSE of the embeddings: `postquant.mixed.importance.output_distance`), on the
first `ERROR_SAMPLES` calibration samples. It tells a poor allocation apart from a task metric that does not
follow the output error.

Writes ``benchmarks/results/mixed.md`` and ``benchmarks/results/mixed.json``. Resumable: rows already in the
JSON file are skipped, so an interrupted run can be restarted with the same command (processes running at once
share the file and split the rows); rows measured before the
output error existed get it from their recorded bits (the model is quantized again with those bits, and its
size is checked against the row's).

Example:
    OMP_NUM_THREADS=1 python benchmarks/mixed_bench.py --models resnet20-cifar10
    OMP_NUM_THREADS=1 python benchmarks/mixed_bench.py --models efficientnet-lite0 --limit efficientnet-lite0=500 \\
        --importances loss datafree
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
from postquant.calib.data import batch_size_of
from postquant.eval.run import run_model
from postquant.mixed.importance import batch_distance
from postquant.mixed.size import model_bytes
from postquant.recipe import LayerOverride
from postquant.store.files import write_text_atomic
from postquant.store.table import ListedRows, ResultTable
from postquant_lab.evaluate import evaluate
from postquant_lab.zoo import load_model

log = logging.getLogger("mixed_bench")

ERROR_SAMPLES = 256  # calibration samples of the output error column
MODELS = ["resnet20-cifar10", "minilm-l6", "efficientnet-lite0"]
IMPORTANCES = ["loss", "datafree", "taylor", "fisher"]
METHODS = ["rtn", "squant"]


def row_key(model: str, method: str, config: str) -> str:
    return f"{model}|{method}|{config}"


def recipe_for(method: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Uniform ``W3`` or ``mixed-<importance>`` at an average of `args.budget` weight bits, weight-only."""
    recipe: dict[str, Any] = {"method": method, "w_bits": int(args.budget), "seed": args.seed}
    if config.startswith("mixed-"):
        importance = config.removeprefix("mixed-")
        recipe["mixed"] = {
            "w_bits_budget": args.budget,
            "importance": importance,
            "calib_size": args.calib_size,
        }
    return recipe


class OutputDistance:
    """The distance of a quantized model's output to the float model's on the first calibration samples."""

    @torch.no_grad()
    def __init__(self, zoo: Any) -> None:
        self.batches = zoo.calib_batches(limit=ERROR_SAMPLES)
        self.refs = [run_model(zoo.model, b) for b in self.batches]
        self.n = sum(batch_size_of(b) for b in self.batches)

    @torch.no_grad()
    def __call__(self, qmodel: torch.nn.Module) -> float:
        total = sum(
            float(batch_distance(run_model(qmodel, b), r, b))
            for b, r in zip(self.batches, self.refs, strict=True)
        )
        return total / self.n


def fill_output_error(zoo: Any, row: dict[str, Any], error: OutputDistance, args: argparse.Namespace) -> None:
    """Add ``out_err`` to a row measured before it existed, by quantizing with the row's recorded bits."""
    recipe = postquant.Recipe.coerce(recipe_for(row["method"], f"W{int(args.budget)}", args))
    if row["bits"] is not None:
        overrides = {**recipe.overrides, **{n: LayerOverride(w_bits=b) for n, b in row["bits"].items()}}
        recipe = recipe.model_copy(update={"overrides": overrides})
    qmodel = postquant.quantize(zoo.model, recipe, example_inputs=zoo.example_inputs)
    if model_bytes(qmodel) != row["bytes"]:
        raise RuntimeError(
            f"{row_key(row['model'], row['method'], row['config'])}: quantized again with its bits, the model has "
            f"{model_bytes(qmodel)} bytes, not the row's {row['bytes']}: the row cannot be rebuilt"
        )
    row["out_err"] = error(qmodel)


def run_row(
    zoo: Any, model: str, method: str, config: str, args: argparse.Namespace, error: OutputDistance
) -> dict[str, Any]:
    limit = args.limit.get(model)
    row: dict[str, Any] = {"model": model, "method": method, "config": config}
    if method == "fp32":
        start = time.perf_counter()
        res = evaluate(zoo.model, zoo, limit=limit)
        return row | {
            "metric": res.metric,
            "value": res.value,
            "n": res.n,
            "avg_w_bits": 32.0,
            "bytes": None,
            "quantize_s": 0.0,
            "eval_s": time.perf_counter() - start,
            "bits": None,
            "out_err": 0.0,
        }
    recipe = postquant.Recipe.coerce(recipe_for(method, config, args))
    needs_calib = recipe.mixed is not None and recipe.mixed.importance.value != "datafree"
    calib = zoo.calib_batches(limit=args.calib_size) if needs_calib else None
    start = time.perf_counter()
    qmodel = postquant.quantize(zoo.model, recipe, calib=calib, example_inputs=zoo.example_inputs)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    res = evaluate(qmodel, zoo, limit=limit)
    mixed = postquant.result(qmodel).mixed
    return row | {
        "metric": res.metric,
        "value": res.value,
        "n": res.n,
        "avg_w_bits": mixed.avg_w_bits if mixed is not None else float(recipe.w_bits),
        "bytes": model_bytes(qmodel),
        "quantize_s": seconds,
        "eval_s": time.perf_counter() - start,
        "calib": args.calib_size if needs_calib else 0,
        "bits": mixed.bits if mixed is not None else None,
        "histogram": _histogram(mixed.bits) if mixed is not None else None,
        "out_err": error(qmodel),
    }


def _histogram(bits: dict[str, int]) -> str:
    counts: dict[int, int] = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    return " ".join(f"{b}b:{n}" for b, n in sorted(counts.items()))


def write_markdown(rows: list[dict[str, Any]], path: Path, commands: list[str], budget: float) -> None:
    lines = [
        f"# Mixed precision at an average of {budget:g} weight bits vs uniform W{int(budget)} (weight-only)",
        "",
        "Produced by (resumable; each command adds the rows it was given):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "Accuracy (top-1 %, or Spearman x100 for minilm-l6) on `n` evaluation samples. `avg bits` is the",
        "average weight bits over the quantized layers, weighted by their number of weights; `bytes` is the",
        "size of the checkpoint's tensors (packed codes, grids and float tensors such as biases and",
        "embeddings; file headers excluded). Mixed rows choose per-layer bits from {2,3,4,6,8} with the exact",
        "allocator under the budget `avg bits <= 3`; the importance is measured on calibration samples",
        "(`calib`; none for datafree) with the row's own rounding method. `layers` counts layers per bit width.",
        "The budget is on average bits, not bytes: a mixed row's bytes can differ from uniform's by the",
        "per-layer rounding up of packed codes and the zero points' storage (int8/int16), e.g. +0.04 % on lite0.",
        "Quantize time on a shared 2-core CPU (1 torch thread, other jobs running: noisy).",
        "`output err`: the distance of the output to FP32's with every layer quantized (KL of the logits, or",
        f"the token MSE of the embeddings), on the first {ERROR_SAMPLES} calibration samples (the importance",
        "measures saw the first `calib` of them): what the allocation minimises a sum of predictions of.",
        "",
        "| model | method | config | value | delta vs FP32 | output err | avg bits | bytes | layers | calib | quantize s | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp = {r["model"]: r["value"] for r in rows if r["method"] == "fp32"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    order = {c: i for i, c in enumerate(["-", "W3", *[f"mixed-{i}" for i in IMPORTANCES]])}
    methods = {m: i for i, m in enumerate(["fp32", *METHODS])}
    for r in sorted(
        rows, key=lambda r: (models.index(r["model"]), methods[r["method"]], order.get(r["config"], 99))
    ):
        delta = "" if r["method"] == "fp32" or r["model"] not in fp else f"{r['value'] - fp[r['model']]:+.2f}"
        size = "" if r["bytes"] is None else f"{r['bytes']:,}"
        avg = "32" if r["method"] == "fp32" else f"{r['avg_w_bits']:.3f}"
        err = "" if r.get("out_err") is None else f"{r['out_err']:.4g}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['config']} | {r['value']:.2f} | {delta} | {err} | {avg} | {size} | "
            f"{r.get('histogram') or ''} | {r.get('calib', '')} | {r['quantize_s']:.1f} | {r['n']} |"
        )
    write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--importances", nargs="+", default=IMPORTANCES, choices=IMPORTANCES)
    p.add_argument("--budget", type=float, default=3.0, help="average weight bits")
    p.add_argument("--calib-size", type=int, default=64, help="calibration samples for the importance")
    p.add_argument("--limit", nargs="*", default=[], help="MODEL=N: evaluate on N samples of that model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    args.limit = {k: int(v) for k, v in (item.split("=") for item in args.limit)}
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("postquant.model.fold").setLevel(logging.WARNING)

    args.out.mkdir(parents=True, exist_ok=True)
    md_path = args.out / "mixed.md"
    table = ResultTable(
        args.out / "mixed.json", layout=ListedRows(lambda r: row_key(r["model"], r["method"], r["config"]))
    )
    commands_path = args.out / "mixed_commands.txt"
    commands = commands_path.read_text().splitlines() if commands_path.is_file() else []
    command = "python benchmarks/mixed_bench.py " + " ".join(sys.argv[1:])
    if command not in commands:
        commands.append(command)
        write_text_atomic(commands_path, "\n".join(commands) + "\n")
    configs = [f"W{int(args.budget)}", *[f"mixed-{i}" for i in args.importances]]
    for model in args.models:
        zoo, error = None, None
        for key, row in list(table.rows.items()):
            if row["model"] == model and "out_err" not in row:
                zoo = zoo or load_model(model)
                error = error or OutputDistance(zoo)
                if row["method"] == "fp32":
                    row["out_err"] = 0.0
                else:
                    log.info("output error of %s %s %s", model, row["method"], row["config"])
                    fill_output_error(zoo, row, error, args)
                table.put(key, row)
                write_markdown(list(table.rows.values()), md_path, commands, args.budget)
        todo = [("fp32", "-")] + [(m, c) for m in args.methods for c in configs]
        rows = {row_key(model, method, config): (method, config) for method, config in todo}
        for key in table.todo(rows):  # rows already in the JSON file, or in another process's hands, skipped
            method, config = rows[key]
            zoo = zoo or load_model(model)
            error = error or OutputDistance(zoo)
            log.info("row %s %s %s", model, method, config)
            row = run_row(zoo, model, method, config, args, error)
            log.info(
                "-> %.2f (%.3f bits, %s bytes) in %.1f s",
                row["value"],
                row["avg_w_bits"],
                row["bytes"],
                row["quantize_s"],
            )
            table.put(key, row)
            write_markdown(list(table.rows.values()), md_path, commands, args.budget)


if __name__ == "__main__":
    main()
