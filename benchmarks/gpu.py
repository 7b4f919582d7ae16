"""postquant on a CUDA GPU: SQuant speed, learned rounding end to end, and the CUDA test selection.

One command, about 10 minutes on one H200 (the qdrop preset alone about 8); it refuses to run without CUDA.

1. SQuant on the 21 layer shapes of ResNet-18 at 4 bits (random weights on the reference's per-channel
   grid, as ``benchmarks/squant_speed.py``): whole-model and per-layer time of ``squant_codes`` (its default
   on a GPU, the whole-layer path; and the CPU's blocked path on the GPU for comparison) against nearest
   rounding, CUDA-synchronised wall time, best of ``--repeats``. The published SQuant CUDA kernel took
   34.6 ms on these shapes on an H200 (a reference figure; it is not run here). Codes are compared with the CPU's
   (integer for integer), and the golden reference vectors are checked on the GPU.
2. Learned rounding on resnet20 / CIFAR-10 W4A4, the model and its calibration batches on the GPU: the
   default recipe (200 iterations per unit) and the ``qdrop`` preset at 2000 iterations per unit, top-1
   on the 10,000 test images and quantize seconds, beside the CPU run of the same recipes
   (``benchmarks/results/default_vs_qdrop/learned.json``). On an H200 the default takes about a minute and
   the qdrop preset about 8 (37-64 s per residual block): give the run 10 minutes, or `--parts` a subset.
   Each row is saved as soon as it is measured; a row still running when the run is stopped says so.
3. ``pytest -m cuda``: every test that has a CUDA parameter.

    python benchmarks/gpu.py --out benchmarks/results/gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from squant_speed import resnet18_shapes  # a sibling script: benchmarks/ is on sys.path when run

import postquant
from postquant.grids import fit_uniform_grid
from postquant.paths import shared_path
from postquant.rounding import SquantMode, nearest_codes, squant_codes, squant_codes_many
from postquant.store.files import write_json_atomic, write_text_atomic

log = logging.getLogger("gpu")

PUBLISHED_KERNEL_MS = 34.6  # the published SQuant CUDA kernel, ResNet-18 shapes at 4 bits, H200
CPU_RESULTS = Path(__file__).resolve().parent / "results" / "default_vs_qdrop" / "learned.json"
GOLDEN_MODES = {"squant-e": "e", "squant-k": "ek", "squant-c": "ec", "squant": "ekc"}


def cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` CUDA-synchronised wall times of `fn`, in seconds (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def squant_part(repeats: int, seed: int) -> dict[str, Any]:
    """SQuant vs nearest rounding on ResNet-18's shapes on the GPU; codes against the CPU's."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for name, shape in resnet18_shapes():
        w = torch.randn(shape, generator=gen) * 0.05
        grid = fit_uniform_grid(w, 4)
        layers.append((name, shape, grid.to_int(w), grid.qmin, grid.qmax))
    gpu = [(n, s, x.cuda(), a, b) for n, s, x, a, b in layers]

    def run(fn: Callable[[torch.Tensor, int, int], torch.Tensor]) -> Callable[[], None]:
        def every_layer() -> None:
            for _, _, x, a, b in gpu:
                fn(x, a, b)

        return every_layer

    def whole(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return squant_codes(x, a, b, SquantMode.EKC)

    def blocked(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return squant_codes(x, a, b, SquantMode.EKC, whole_layer=False)

    ranges = {(a, b) for *_, a, b in gpu}
    assert len(ranges) == 1, ranges
    (qmin, qmax), xs = ranges.pop(), [x for _, _, x, _, _ in gpu]
    total = {
        "squant_many": cuda_time(lambda: squant_codes_many(xs, qmin, qmax), repeats),
        "squant": cuda_time(run(whole), repeats),
        "squant_blocked": cuda_time(run(blocked), max(3, repeats // 4)),
        "nearest": cuda_time(run(nearest_codes), repeats),
    }
    many_differ = sum(
        int((q.cpu() != squant_codes(x_cpu, a, b)).sum())
        for q, (_, _, x_cpu, a, b) in zip(squant_codes_many(xs, qmin, qmax), layers, strict=True)
    )
    rows, differ, weights = [], 0, 0
    for (name, shape, x_cpu, a, b), (_, _, x, _, _) in zip(layers, gpu, strict=True):
        cpu_codes = squant_codes(x_cpu, a, b)
        gpu_codes = whole(x, a, b).cpu()
        changed = int((gpu_codes != cpu_codes).sum())
        differ += changed
        weights += x.numel()
        rows.append(
            {
                "name": name,
                "shape": "x".join(map(str, shape)),
                "weights": x.numel(),
                "squant_ms": 1e3 * cuda_time(lambda x=x, a=a, b=b: whole(x, a, b), repeats),
                "nearest_ms": 1e3 * cuda_time(lambda x=x, a=a, b=b: nearest_codes(x, a, b), repeats),
                "differ_from_cpu": changed,
            }
        )
    return {
        "total_s": total,
        "layers": rows,
        "differ_from_cpu": differ,
        "many_differ_from_cpu": many_differ,
        "weights": weights,
    }


def golden_part() -> dict[str, Any]:
    """Golden reference vectors checked on the GPU (both paths)."""
    cases, wrong = 0, []
    for stem in ("edge_cases", "efficientnet_lite0_layers", "random_layers", "resnet20_layers"):
        path = shared_path("golden", "squant", f"{stem}.npz")
        if not path.is_file():
            return {"error": f"golden vectors not found at {path}"}
        with np.load(path) as d:
            for tid, mode in zip(d["index/tensor"], d["index/mode"], strict=True):
                x = torch.from_numpy(d[f"{tid}/x"]).cuda()
                expected = torch.from_numpy(d[f"{tid}/q_{mode}"])
                tmin, tmax = int(d[f"{tid}/tmin"]), int(d[f"{tid}/tmax"])
                for whole in (True, False):
                    q = squant_codes(x, tmin, tmax, GOLDEN_MODES[str(mode)], whole_layer=whole).cpu()
                    if not torch.equal(q, expected):
                        wrong.append(f"{stem}/{tid}/{mode}/{'whole' if whole else 'blocked'}")
                cases += 1
    return {"cases": cases, "wrong": wrong}


def learned_part(
    iters_qdrop: int, seed: int, calib_size: int, rows: list[dict[str, Any]], save: Callable[[], None]
) -> None:
    """resnet20 W4A4 learned rounding (default, qdrop preset) with the model and data on the GPU; each
    row is appended to `rows` and saved as soon as it is measured."""
    from postquant_lab.evaluate import evaluate
    from postquant_lab.zoo import load_model

    zoo = load_model("resnet20-cifar10")
    model = zoo.model.cuda()
    calib = [b.cuda() if isinstance(b, torch.Tensor) else b for b in zoo.calib_batches(limit=calib_size)]
    start = time.perf_counter()
    fp = evaluate(model, zoo, progress=False)
    rows.append(
        {
            "method": "fp32",
            "value": fp.value,
            "n": fp.n,
            "quantize_s": 0.0,
            "eval_s": time.perf_counter() - start,
        }
    )
    for method, iters in (("learned", None), ("qdrop", iters_qdrop)):
        learned: dict[str, Any] = {"progress": False, "first_last_w_bits": None}
        if iters is not None:
            learned["iters"] = iters
        recipe = {
            "method": method,
            "w_bits": 4,
            "a_bits": 4,
            "seed": seed,
            "a_observer": "mse",
            "learned": learned,
            "calib_size": calib_size,
        }
        rows.append(
            {"method": method, "iters": iters or "default", "error": "not finished when the run ended"}
        )
        save()  # a run stopped at its time limit shows which row it was measuring
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            qmodel = postquant.quantize(model, recipe, calib=calib, example_inputs=zoo.example_inputs)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            devices = sorted({str(t.device) for t in [*qmodel.parameters(), *qmodel.buffers()]})
            start = time.perf_counter()
            res = evaluate(qmodel, zoo, progress=False)
            rows[-1] = {
                "method": method,
                "iters": iters or "default",
                "value": res.value,
                "n": res.n,
                "quantize_s": seconds,
                "eval_s": time.perf_counter() - start,
                "devices": devices,
            }
        except Exception as exc:  # recorded in the report: a failure on the GPU is a result here
            log.exception("%s failed on CUDA", method)
            rows[-1] = {
                "method": method,
                "iters": iters or "default",
                "error": f"{type(exc).__name__}: {exc}",
            }
        log.info("%s", rows[-1])
        save()


def tests_part(timeout: int) -> dict[str, Any]:
    """`pytest -m cuda`: its closing line and exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"rc": None, "summary": f"timed out after {timeout} s", "seconds": timeout}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {
        "rc": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr[-500:],
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }


def cpu_reference() -> dict[str, Any]:
    if not CPU_RESULTS.is_file():
        return {}
    rows = json.loads(CPU_RESULTS.read_text())
    return {r["method"]: r for r in rows if r.get("model") == "resnet20-cifar10" and r.get("bits") == "W4A4"}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# postquant on a GPU",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `python benchmarks/gpu.py` on "
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, Python {platform.python_version()}, {os.cpu_count()} CPUs.",
    ]
    sq = results.get("squant")
    if sq:
        t = sq["total_s"]
        lines += [
            "",
            f"## SQuant, ResNet-18 layer shapes at 4 bits (21 layers, {sq['weights']:,} weights)",
            "",
            f"CUDA-synchronised wall time, best of {args.repeats} after a warm-up; random weights (randn * 0.05) "
            "on the per-channel min/max grid, as `benchmarks/squant_speed.py`.",
            "",
            "| | whole model (ms) | vs nearest rounding |",
            "|---|---:|---:|",
            f"| `squant_codes_many` (layers of one shape together; what `quantize` does on a GPU) "
            f"| {t['squant_many'] * 1e3:.2f} | {t['squant_many'] / t['nearest']:.1f}x |",
            f"| `squant_codes` (GPU default: whole layer) | {t['squant'] * 1e3:.2f} | {t['squant'] / t['nearest']:.1f}x |",
            f"| `squant_codes(whole_layer=False)` (the CPU's blocked path) | {t['squant_blocked'] * 1e3:.2f} "
            f"| {t['squant_blocked'] / t['nearest']:.1f}x |",
            f"| nearest rounding | {t['nearest'] * 1e3:.2f} | 1x |",
            f"| published SQuant CUDA kernel (H200; not run here) | {PUBLISHED_KERNEL_MS} | |",
            "",
            f"Codes differing from the CPU's: {sq['differ_from_cpu']} of {sq['weights']:,} layer by layer, "
            f"{sq['many_differ_from_cpu']} with `squant_codes_many`.",
        ]
        g = results.get("golden", {})
        if "cases" in g:
            lines.append(
                f"Golden reference vectors on the GPU: {g['cases']} cases x 2 paths, "
                f"{len(g['wrong'])} differ{': ' + ', '.join(g['wrong'][:10]) if g['wrong'] else ''}."
            )
        elif g:
            lines.append(f"Golden vectors: {g['error']}")
        lines += [
            "",
            "| layer | shape | weights | SQuant (ms) | nearest (ms) | codes differing from CPU |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in sq["layers"]:
            lines.append(
                f"| {r['name']} | {r['shape']} | {r['weights']:,} | {r['squant_ms']:.3f} | {r['nearest_ms']:.3f} "
                f"| {r['differ_from_cpu']} |"
            )
    learned = results.get("learned")
    if learned:
        cpu = cpu_reference()
        lines += [
            "",
            "## Learned rounding, resnet20 / CIFAR-10 W4A4, model and data on the GPU",
            "",
            f"Seed {args.seed}, {args.calib_size} calibration images, MSE activation ranges, top-1 on the "
            "10,000 test images. CPU column: the same recipes on a shared 2-core CPU, 1 thread "
            "(`benchmarks/results/default_vs_qdrop/learned.md`).",
            "",
            "| method | iterations per unit | GPU top-1 | GPU quantize s | CPU top-1 | CPU quantize s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in learned:
            c = cpu.get(r["method"], {})
            cpu_cells = f"{c['value']:.2f} | {c['quantize_s']:.0f}" if c else "- | -"
            if "error" in r:
                lines.append(
                    f"| {r['method']} | {r.get('iters', '-')} | {r['error'][:200]} | | {cpu_cells} |"
                )
            else:
                lines.append(
                    f"| {r['method']} | {r.get('iters', '-')} | {r['value']:.2f} | {r['quantize_s']:.1f} | {cpu_cells} |"
                )
    tests = results.get("tests")
    if tests:
        lines += [
            "",
            "## `pytest -m cuda`",
            "",
            f"`{tests['summary']}` (exit {tests['rc']}, {tests['seconds']:.0f} s)",
        ]
        lines += [f"- {f}" for f in tests.get("failed", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.md"))
    parser.add_argument("--parts", nargs="+", default=["squant", "learned", "tests"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--qdrop-iters", type=int, default=2000)
    parser.add_argument("--tests-timeout", type=int, default=240)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; none is visible to torch")
    results: dict[str, Any] = {}
    json_path = args.out.with_suffix(".json")

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, results, default=str)
        write_text_atomic(args.out, report(results, args))

    if "squant" in args.parts:
        results["squant"] = squant_part(args.repeats, args.seed)
        results["golden"] = golden_part()
        log.info("SQuant whole model (s): %s", results["squant"]["total_s"])
        save()
    if "tests" in args.parts:
        results["tests"] = tests_part(args.tests_timeout)
        log.info("pytest -m cuda: %s", results["tests"]["summary"])
        save()
    if "learned" in args.parts:
        results["learned"] = []
        learned_part(args.qdrop_iters, args.seed, args.calib_size, results["learned"], save)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
