"""Quantization on 1 vs N processes (torch.distributed, gloo, one thread each): wall time and the result.

    python benchmarks/distributed.py                       # resnet20-cifar10, the learned default, W4A4
    python benchmarks/distributed.py --method squant --a-bits 8 --worlds 1 2

For each world size the script starts that many processes of itself on this machine (a file store in a
temporary directory, ``OMP_NUM_THREADS=1``), each quantizing the zoo model with the same recipe and calibration
data, as ``torchrun --nproc-per-node N -m postquant quantize`` does. Rank 0 reports the wall time of
`postquant.quantize`, its stages, the seconds its collectives waited (communication plus waiting for slower
ranks), the top-1 on `--limit` test images, and the codes; the table compares them with one process.
Writes ``benchmarks/results/distributed.json`` and ``.md`` (rows of other settings are kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.distributed")


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "method": args.method,
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "calib_size": args.calib_size,
    }
    if args.method in ("learned", "adaround", "brecq", "qdrop"):
        recipe["learned"] = {"progress": False, **({"iters": args.iters} if args.iters else {})}
    return recipe


def worker(args: argparse.Namespace) -> None:
    """One rank: quantize, time it, and (rank 0) evaluate and save what the parent compares."""
    import postquant
    import postquant.distributed as pqdist
    from postquant.model import quantized_layers
    from postquant_lab.evaluate import evaluate
    from postquant_lab.zoo import load_model

    torch.set_num_threads(1)
    waited = [0.0]
    if args.world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{args.store}/store", rank=args.rank, world_size=args.world
        )
        real_wait = pqdist.Ranks._wait

        def timed_wait(self: pqdist.Ranks, work: Any, what: str) -> None:
            start = time.perf_counter()
            try:
                real_wait(self, work, what)
            finally:
                waited[0] += time.perf_counter() - start

        pqdist.Ranks._wait = timed_wait  # type: ignore[method-assign]  # measurement only
    zoo = load_model(args.model)
    recipe = _recipe(args)
    calib = zoo.calib_batches(limit=args.calib_size)
    start = time.perf_counter()
    qmodel = postquant.quantize(zoo.model, recipe, calib=calib, example_inputs=zoo.example_inputs)
    seconds = time.perf_counter() - start
    if args.rank == 0:
        top1 = evaluate(qmodel, zoo, data=zoo.eval_batches(limit=args.limit)).value
        torch.save(
            {
                "seconds": seconds,
                "stages": postquant.result(qmodel).seconds,
                "waited": waited[0],
                "top1": top1,
                "codes": {n: m.codes.clone() for n, m in quantized_layers(qmodel).items()},
            },
            Path(args.store) / "rank0.pt",
        )
    if args.world > 1:
        torch.distributed.barrier()  # rank 0 has written its results before any rank tears the group down
        torch.distributed.destroy_process_group()


def run_world(args: argparse.Namespace, world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
        base = [sys.executable, __file__, *sys.argv[1:], "--worker", "--world", str(world), "--store", store]
        procs = [subprocess.Popen([*base, "--rank", str(r)], env=env) for r in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"world {world}: ranks exited with {codes}")
        return torch.load(Path(store) / "rank0.pt", weights_only=False)


def write_markdown(rows: dict[str, dict[str, Any]]) -> None:
    """``benchmarks/results/distributed.md`` from the rows of ``distributed.json``."""
    from postquant.store.files import write_text_atomic

    lines = [
        "Wall time of `postquant.quantize` on N processes (gloo, 1 thread each, one 2-core machine shared with "
        "other work: `load` is the 1-minute load average before the run). `collectives` is the share of the "
        "time rank 0 spent in collectives (communication and waiting for the other rank). Codes are compared "
        "with the 1-process run; top-1 on `n` test images spread over the test set.",
        "",
        "| model | recipe | processes | quantize | stages (s) | speed-up | collectives | codes differing "
        "| top-1 | n | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        stages = ", ".join(f"{k} {v}" for k, v in row["stages"].items() if v >= 0.1)
        lines.append(
            f"| {row['model']} | {row['recipe']} | {row['processes']} | {row['seconds']} s | {stages} | "
            f"{row['speedup']}x | {row['collective_share']:.1%} | {row['codes_differing']} | {row['top1']:.2f} | "
            f"{row['limit']} | {row['load_1min']} |"
        )
    write_text_atomic(RESULTS / "distributed.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20-cifar10")
    parser.add_argument("--method", default="learned")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=None, help="learned rounding steps per unit (preset's)")
    parser.add_argument("--limit", type=int, default=1000, help="test images for top-1")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        worker(args)
        return

    from postquant.store.table import ResultTable

    table = ResultTable(RESULTS / "distributed.json", indent=2, newline=True)
    load = os.getloadavg()[0]
    runs = {world: run_world(args, world) for world in args.worlds}
    one = runs[min(runs)]
    n_codes = sum(c.numel() for c in one["codes"].values())
    for world, r in runs.items():
        differ = sum(int((r["codes"][n] != c).sum()) for n, c in one["codes"].items())
        key = (
            f"{args.model}|{args.method}|W{args.w_bits}A{args.a_bits}|{args.calib_size}|{args.iters}|{world}"
        )
        table.put(
            key,
            {
                "model": args.model,
                "recipe": f"{args.method} W{args.w_bits}A{args.a_bits}, calib {args.calib_size}"
                + (f", iters {args.iters}" if args.iters else ""),
                "processes": world,
                "seconds": round(r["seconds"], 1),
                "stages": {k: round(v, 1) for k, v in r["stages"].items()},
                "speedup": round(one["seconds"] / r["seconds"], 2),
                "collective_share": round(r["waited"] / r["seconds"], 3),
                "codes_differing": f"{differ}/{n_codes}",
                "top1": r["top1"],
                "limit": args.limit,
                "load_1min": round(load, 1),
                "torch": torch.__version__,
            },
        )
    write_markdown(table.rows)
    log.info("wrote %s", RESULTS / "distributed.md")


if __name__ == "__main__":
    main()
