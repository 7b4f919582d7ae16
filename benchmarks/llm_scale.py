"""Scale of block-sequential quantization from a checkpoint: peak RSS and wall time against the decoder depth.

    python benchmarks/llm_scale.py                       # 12 / 24 / 48 layers, RTN and learned rounding
    python benchmarks/llm_scale.py --layers 12 24 --methods rtn

Random-weight Llama configs (hidden 512, 8 heads, intermediate 1408, vocabulary 4096, float32) are written
once as safetensors shards to a cache folder outside the repository (``--cache``). Each row runs in its own
subprocess, with one torch thread, so its peak RSS (``ru_maxrss``) is its own: `postquant.blockwise.
quantize_checkpoint` on the directory (W4, groups of 64, ``lm_head`` float), RTN and learned rounding (few
iterations per layer on random token windows), the activation chains bounded by ``--chain-bytes``. A row
reports its peak RSS, the RSS after imports (the baseline), its wall time, one decoder layer's float weight
bytes, the non-decoder float bytes and the quantized model's bytes. The issue's targets (issue 18) are checked
per method with their measured values: peak RSS at the largest depth <= 1.15 x at the smallest; time ~ the
depth ratio (within 15 %); peak RSS <= 2 x one layer's float weights + chain bound + baseline.
Writes ``benchmarks/results/llm_scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
HIDDEN, HEADS, INTERMEDIATE, VOCAB = 512, 8, 1408, 4096  # 1408 = 22 groups of 64
GROUP = 64
# glibc malloc settings (environment of a row's process): its default raises the mmap threshold after the
# first large free, so later large tensors come from the heap; a fixed threshold gives them back at once.
ALLOCATORS = {"default": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
log = logging.getLogger("benchmarks.llm_scale")


def write_model(folder: Path, layers: int) -> None:
    """A random Llama of `layers` decoder layers saved as safetensors shards (skipped when present)."""
    if (folder / "config.json").is_file():
        return
    import torch
    import transformers

    torch.manual_seed(layers)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="50MB")
    tmp.rename(folder)  # the cache holds only complete models


def run_row(folder: Path, method: str, iters: int, n: int, seqlen: int, chain_bytes: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import psutil
    import torch
    from safetensors import safe_open

    import postquant
    from postquant.blockwise import quantize_checkpoint
    from postquant.model.lazy import LazyCheckpoint
    from postquant.model.walk import quantized_layers

    torch.set_num_threads(1)
    # the model's code is imported before the baseline is read (importing it costs ~130 MiB)
    __import__("accelerate")
    __import__("transformers.models.llama.modeling_llama")
    ids = torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))
    calib = list(ids.split(4))
    baseline = psutil.Process().memory_info().rss
    recipe: dict[str, Any] = {
        "method": method,
        "w_bits": 4,
        "granularity": "group",
        "group_size": GROUP,
        "ignore": ["lm_head"],
        "calib_size": n,
    }
    if method == "learned":
        recipe["learned"] = {"iters": iters, "batch_size": 4, "progress": False}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    q = quantize_checkpoint(folder, recipe, calib if method != "rtn" else None, chain_bytes=chain_bytes)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    checkpoint = LazyCheckpoint(folder)
    block = other = 0
    for name, file in checkpoint.files.items():
        with safe_open(str(file), framework="pt") as f:
            sl = f.get_slice(name)
            size = 1
            for d in sl.get_shape():
                size *= d
            nbytes = size * {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
        if name.startswith("model.layers.0."):
            block += nbytes
        elif not name.startswith("model.layers."):
            other += nbytes
    quantized = sum(b.numel() * b.element_size() for m in quantized_layers(q).values() for b in m.buffers())
    ids_eval = ids[:1]
    finite = bool(torch.isfinite(q(ids_eval).logits).all())
    layers = len(q.model.layers)
    del q, postquant
    return {
        "layers": layers,
        "method": method,
        "iters": iters if method == "learned" else None,
        "calib": f"{n}x{seqlen}",
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss": peak,
        "baseline_rss": baseline,
        "block_float_bytes": block,
        "non_decoder_float_bytes": other,
        "quantized_buffer_bytes": quantized,
        "chain_bytes_bound": chain_bytes,
        "chain_bytes_each": n * seqlen * HIDDEN * 4,
        "finite_logits": finite,
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets per method, with the measured values."""
    out = []
    for method, allocator in sorted({(r["method"], r["allocator"]) for r in rows}):
        mine = sorted(
            (r for r in rows if r["method"] == method and r["allocator"] == allocator),
            key=lambda r: r["layers"],
        )
        method = f"{method} ({allocator})"
        if len(mine) >= 2:
            small, big = mine[0], mine[-1]
            ratio = big["peak_rss"] / small["peak_rss"]
            out.append(
                {
                    "method": method,
                    "target": f"peak RSS at {big['layers']} layers <= 1.15 x at {small['layers']}",
                    "measured": f"{ratio:.3f} x ({big['peak_rss'] / 2**20:.0f} / {small['peak_rss'] / 2**20:.0f} MiB)",
                    "pass": ratio <= 1.15,
                }
            )
            depth = big["layers"] / small["layers"]
            for key, what in (("seconds", "wall time"), ("cpu_seconds", "CPU time")):
                tratio = big[key] / small[key]
                out.append(
                    {
                        "method": method,
                        "target": f"{what} at {big['layers']} ~ {depth:.0f} x at {small['layers']} (+-15 %)",
                        "measured": f"{tratio:.2f} x ({big[key]:.1f} / {small[key]:.1f} s)",
                        "pass": abs(tratio / depth - 1) <= 0.15,
                    }
                )
        for r in mine:
            allowed = 2 * r["block_float_bytes"] + r["chain_bytes_bound"] + r["baseline_rss"]
            out.append(
                {
                    "method": method,
                    "target": f"{r['layers']} layers: peak RSS <= 2 x block float + chain bound + baseline",
                    "measured": f"{r['peak_rss'] / 2**20:.1f} MiB vs {allowed / 2**20:.1f} MiB "
                    f"(over by {(r['peak_rss'] - allowed) / 2**20:+.1f} MiB)",
                    "pass": r["peak_rss"] <= allowed,
                }
            )
    return out


def _working(r: dict[str, Any]) -> int:
    """Peak RSS less the baseline, the float parameters outside the decoder and the quantized model: what the
    walk itself holds at its peak (one layer in float, its method's state, chains, allocator slack)."""
    return r["peak_rss"] - r["baseline_rss"] - r["non_decoder_float_bytes"] - r["quantized_buffer_bytes"]


def write_results(rows: list[dict[str, Any]], checks: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from postquant.store.files import write_text_atomic

    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(
        RESULTS / "llm_scale.json",
        json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=2) + "\n",
    )
    mib = 2**20
    lines = [
        "# Block-sequential quantization from a checkpoint: scale",
        "",
        f"`python benchmarks/llm_scale.py {meta['args']}`; random Llama, hidden {HIDDEN}, {HEADS} heads, "
        f"intermediate {INTERMEDIATE}, vocabulary {VOCAB}, float32 safetensors shards; W4 groups of {GROUP}, "
        "`lm_head` float; `postquant.blockwise.quantize_checkpoint`, one subprocess per row, 1 torch thread. "
        f"Load before: {meta['load_before']}; after the last row: {meta['load_after']}.",
        "",
        "| layers | method | allocator | wall time | CPU time | peak RSS | baseline RSS | peak - baseline | 1 block float | non-decoder float "
        "| quantized model | walk's working memory | chain bound (each chain) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['method']}{'' if r['iters'] is None else ' (' + str(r['iters']) + ' it)'} | {r['allocator']} | "
            f"{r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {r['peak_rss'] / mib:.1f} MiB | {r['baseline_rss'] / mib:.1f} MiB | "
            f"{(r['peak_rss'] - r['baseline_rss']) / mib:.1f} MiB | {r['block_float_bytes'] / mib:.1f} MiB | "
            f"{r['non_decoder_float_bytes'] / mib:.1f} MiB | {r['quantized_buffer_bytes'] / mib:.1f} MiB | "
            f"{_working(r) / mib:.1f} MiB | "
            f"{r['chain_bytes_bound'] / mib:.1f} MiB ({r['chain_bytes_each'] / mib:.1f} MiB) |"
        )
    lines += ["", "| method | target | measured | |", "|---|---|---|---|"]
    lines += [
        f"| {c['method']} | {c['target']} | {c['measured']} | {'PASS' if c['pass'] else 'FAIL'} |"
        for c in checks
    ]
    lines += [
        "",
        "Baseline: RSS after importing torch, transformers (with the Llama modeling code), accelerate and "
        "postquant. Peak: `ru_maxrss` of the row's process. The walk's working memory is the peak less the "
        "baseline, the float parameters outside the decoder layers (embeddings, final norm, `lm_head`: loaded "
        "whole) and the quantized model (packed codes and grids of every finished layer: the output, which "
        "grows with depth). The third target does not count those two terms. Chains beyond the bound are "
        "memory-mapped files; their pages count in RSS while mapped and resident.",
        f"Load averages (1, 5, 15 min) on {meta['cpus']} CPUs shared with other work: wall times are not "
        "comparable between rows when the load exceeds the CPUs; CPU time (user + system of the row's "
        "process) is.",
    ]
    write_text_atomic(RESULTS / "llm_scale.md", "\n".join(lines) + "\n")


def _meta(load_before: tuple[float, ...]) -> dict[str, Any]:
    return {
        "args": " ".join(sys.argv[1:]),
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument(
        "--methods", nargs="+", default=["rtn", "learned"], choices=["rtn", "learned", "gptq"]
    )
    parser.add_argument("--iters", type=int, default=5, help="learned-rounding iterations per layer")
    parser.add_argument("--calib-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--chain-bytes", type=int, default=4 * 2**20, help="bound of the chains in memory")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per row (the fastest time, the largest RSS)"
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/postquant-llm-scale"))
    parser.add_argument(
        "--allocators",
        nargs="+",
        default=["default"],
        choices=sorted(ALLOCATORS),
        help="glibc settings of the rows' processes (each a set of rows)",
    )
    parser.add_argument("--row", nargs=2, metavar=("LAYERS", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.row:  # the child: one measurement, printed as the last line
        layers, method = int(args.row[0]), args.row[1]
        row = run_row(
            args.cache / f"llama-{layers}", method, args.iters, args.calib_size, args.seqlen, args.chain_bytes
        )
        print(json.dumps(row))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for layers in args.layers:
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.llm_scale import write_model; "
            f"from pathlib import Path; write_model(Path({str(args.cache / f'llama-{layers}')!r}), {layers})"
        )
        args.cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    load_before = os.getloadavg()
    rows = []
    for allocator in args.allocators:
        for layers in args.layers:
            for method in args.methods:
                runs = []
                for _ in range(args.repeats):
                    cmd = [sys.executable, __file__, "--row", str(layers), method, "--iters", str(args.iters),
                           "--calib-size", str(args.calib_size), "--seqlen", str(args.seqlen),
                           "--chain-bytes", str(args.chain_bytes), "--cache", str(args.cache)]  # fmt: skip
                    done = subprocess.run(
                        cmd, env={**env, **ALLOCATORS[allocator]}, capture_output=True, text=True, check=False
                    )
                    if done.returncode != 0:
                        raise SystemExit(f"row {layers} {method} failed:\n{done.stderr[-3000:]}")
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                row = min(runs, key=lambda r: r["seconds"])
                row["peak_rss"] = max(r["peak_rss"] for r in runs)
                row["repeats"] = args.repeats
                row["allocator"] = allocator
                rows.append(row)
                log.info("%s", row)
                checks = targets(rows)
                write_results(
                    rows, checks, _meta(load_before)
                )  # after every row: a stopped run keeps its rows
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['method']}: {c['target']}: {c['measured']}")


if __name__ == "__main__":
    main()
