"""Chained caching of unit inputs vs rerunning the model prefix for every unit: time and identical codes.

    OMP_NUM_THREADS=1 python benchmarks/chain_cache.py --models resnet20-cifar10
    OMP_NUM_THREADS=1 python benchmarks/chain_cache.py --models efficientnet-lite0 --calib-size 64 --iters 20

Learned rounding (the QDrop-style default at W4A4, or W4A8 for EfficientNet-Lite0) runs twice in one process,
alternating order per repeat: with chained caching (a unit's inputs are the previous unit's outputs where the
model chains them, checked on the first batch) and with every unit cached from model prefixes
(``learned.chain_inputs: false``). The table gives the wall time of both, their ratio, and whether the integer
codes are bit-identical. Writes ``benchmarks/results/chain_cache.json`` and ``.md`` (rows of other models are
kept).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

import postquant
from postquant.model import quantized_layers
from postquant.store.files import write_text_atomic
from postquant.store.table import ResultTable
from postquant_lab.zoo import load_model

log = logging.getLogger("benchmarks.chain_cache")
RESULTS = Path(__file__).parent / "results"
A_BITS = {"efficientnet-lite0": 8}


def _timed(model: str, recipe: dict[str, Any], chain: bool) -> tuple[float, dict[str, torch.Tensor]]:
    zoo = load_model(model)
    calib = zoo.calib_batches(limit=recipe["calib_size"])
    recipe = {**recipe, "learned": {**recipe["learned"], "chain_inputs": chain}}
    torch.manual_seed(0)
    start = time.perf_counter()
    q = postquant.quantize(zoo.model, recipe, calib=calib, example_inputs=zoo.example_inputs)
    seconds = time.perf_counter() - start
    return seconds, {n: m.codes.clone() for n, m in quantized_layers(q).items()}


def run(model: str, calib_size: int, iters: int, repeats: int) -> dict[str, Any]:
    recipe = {
        "method": "learned",
        "w_bits": 4,
        "a_bits": A_BITS.get(model, 4),
        "calib_size": calib_size,
        "learned": {"iters": iters, "progress": False},
    }
    times: dict[bool, list[float]] = {True: [], False: []}
    codes: dict[bool, dict[str, torch.Tensor]] = {}
    for r in range(repeats):
        for chain in (True, False) if r % 2 == 0 else (False, True):
            seconds, codes[chain] = _timed(model, recipe, chain)
            times[chain].append(seconds)
            log.info("%s chain=%s: %.1f s", model, chain, seconds)
    identical = all(torch.equal(codes[True][n], codes[False][n]) for n in codes[True])
    chained, prefixes = min(times[True]), min(times[False])
    return {
        "model": model,
        "bits": f"W4A{recipe['a_bits']}",
        "calib_size": calib_size,
        "iters": iters,
        "repeats": repeats,
        "chained_s": round(chained, 1),
        "prefixes_s": round(prefixes, 1),
        "speedup": round(prefixes / chained, 2),
        "identical_codes": identical,
        "torch": torch.__version__,
    }


def write_markdown(rows: dict[str, dict[str, Any]]) -> None:
    lines = [
        "| model | bits | calib | iters | chained | model prefixes | speed-up | identical codes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['bits']} | {r['calib_size']} | {r['iters']} | {r['chained_s']} s | "
        f"{r['prefixes_s']} s | {r['speedup']}x | {'yes' if r['identical_codes'] else 'NO'} |"
        for r in rows.values()
    ]
    write_text_atomic(RESULTS / "chain_cache.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20-cifar10"])
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind (the fastest counts)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    table = ResultTable(RESULTS / "chain_cache.json", indent=2, newline=True)
    for model in args.models:  # measured again (a timing), beside the rows of other models
        table.put(model, run(model, args.calib_size, args.iters, args.repeats))
        write_markdown(table.rows)
        log.info("%s", table.get(model))


if __name__ == "__main__":
    main()
