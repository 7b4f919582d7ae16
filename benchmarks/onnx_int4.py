"""int4 weights in ONNX (opset 21): file sizes, agreement with the PyTorch simulation, onnxruntime latency.

MiniLM-L6 (weight-only W8, W4 per channel, W4 in groups of 32, and W4 with quantized embedding tables: 8-bit
per row, 4-bit per row, 4-bit in groups of 32; STS-B Spearman of FP32, the simulation and onnxruntime) and
ResNet-56 on CIFAR-10 (W4 and W4A8: the default storage, every layer int4, every layer int8).
Sizes: the whole ``.onnx``, and the quantized layers' weights alone (codes, scales, zero points, shapes)
against their FP32 bytes (the embedding tables' too where they are quantized). Usage:

    nice -n 10 python benchmarks/onnx_int4.py --limit 400 --calib-size 64 --images 512 --runs 20
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from scipy.stats import spearmanr

import postquant
from postquant.io import export_onnx
from postquant.model import quantized_embeddings, quantized_layers
from postquant.store.files import write_text_atomic
from postquant_lab.zoo import load_model

log = logging.getLogger("onnx_int4")

WEIGHT_SUFFIXES = (
    ".weight_quantized",
    ".weight_scale",
    ".weight_zero_point",
    ".weight_shape",
    ".weight_offset",
)


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _weight_bytes(path: Path, layers: list[str]) -> int:
    """Bytes of the quantized layers' weight tensors in the file (codes, scales, zero points, shapes)."""
    graph = onnx.load(str(path)).graph
    names = {f"{layer}{suffix}" for layer in layers for suffix in WEIGHT_SUFFIXES}
    return sum(t.ByteSize() for t in graph.initializer if t.name in names)


def _latency_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def minilm_rows(limit: int, calib_size: int, runs: int, tmp: Path) -> tuple[list[str], list[str]]:
    zoo = load_model("minilm-l6")
    calib = zoo.calib_batches(limit=calib_size)
    pairs = list(zoo.eval_batches(limit=limit, batch_size=32))
    gold = [float(s) for _, scores in pairs for s in scores]
    verify = [enc for pair, _ in pairs[:4] for enc in pair]

    def spearman(embed: Any) -> float:
        cos = []
        for pair, _ in pairs:
            a, b = (embed(enc) for enc in pair)
            cos += ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).tolist()
        return 100 * spearmanr(cos, gold).statistic

    def torch_embed(model: torch.nn.Module) -> Any:
        def embed(enc: dict[str, torch.Tensor]) -> np.ndarray:
            with torch.no_grad():
                return _pool(model(**enc)[0].numpy(), enc["attention_mask"].numpy())

        return embed

    def onnx_embed(session: ort.InferenceSession) -> Any:
        names = [i.name for i in session.get_inputs()]

        def embed(enc: dict[str, torch.Tensor]) -> np.ndarray:
            out = session.run(None, {n: enc[n].numpy() for n in names})[0]
            return _pool(out, enc["attention_mask"].numpy())

        return embed

    fp32_path = tmp / "minilm-fp32.onnx"
    fp32 = export_onnx(zoo.model, zoo.example_inputs, fp32_path, progress=False)
    session = _session(fp32_path)
    names = [i.name for i in session.get_inputs()]
    feed = {n: pairs[0][0].first[n].numpy() for n in names}
    fp32_ms = _latency_ms(session, feed, runs)
    rows = [
        f"| FP32 | - | - | {_mb(fp32['bytes'])} | 1.00x | - | - | {spearman(torch_embed(zoo.model)):.2f} | - | - "
        f"| - | {fp32_ms:.1f} |"
    ]
    recipes = {
        "W8": {"w_bits": 8},
        "W4": {"w_bits": 4},
        "W4 g32": {"w_bits": 4, "granularity": "group", "group_size": 32},
        "W4 + emb 8": {"w_bits": 4, "embeddings": {"bits": 8}},
        "W4 + emb 4": {"w_bits": 4, "embeddings": {"bits": 4}},
        "W4 + emb 4 g32": {"w_bits": 4, "embeddings": {"bits": 4, "group_size": 32}},
    }
    notes = []
    for label, recipe in recipes.items():
        qmodel = postquant.quantize(zoo.model, {"method": "rtn", "symmetric": True, **recipe}, calib=calib)
        quantized = {**quantized_layers(qmodel), **quantized_embeddings(qmodel)}
        layers = list(quantized)
        fp32_weights = sum(4 * layer.codes.numel() for layer in quantized.values())
        sim = spearman(torch_embed(qmodel))
        for storage in ["none"] if recipe["w_bits"] == 8 else ["weight-only", "none"]:
            path = tmp / f"minilm-{label.replace(' ', '')}-{storage}.onnx"
            info = export_onnx(
                qmodel, zoo.example_inputs, path, verify_batches=verify, int4=storage, progress=False
            )
            session = _session(path)
            weights = _weight_bytes(path, layers)
            stored = "/".join(sorted(set(info["weight_dtypes"].values())))
            if "embedding_dtypes" in info:
                stored += f", tables {'/'.join(sorted(set(info['embedding_dtypes'].values())))}"
            rows.append(
                f"| {label} | {stored} | {info['opset']} | {_mb(info['bytes'])} | "
                f"{fp32['bytes'] / info['bytes']:.2f}x | {_mb(weights)} | {fp32_weights / weights:.2f}x | "
                f"{sim:.2f} | {spearman(onnx_embed(session)):.2f} | {info['sqnr_db']:.1f} | "
                f"{info['max_abs_diff']:.2g} | {_latency_ms(session, feed, runs):.1f} |"
            )
            log.info("%s", rows[-1])
        tables = quantized_embeddings(qmodel)
        notes.append(
            f"{label}: {len(quantized_layers(qmodel))} quantized Linear layers"
            + (f" and {len(tables)} embedding tables ({', '.join(tables)})" if tables else "")
        )
    return rows, notes


def resnet_rows(images: int, tmp: Path) -> list[str]:
    zoo = load_model("resnet56-cifar10")
    calib = zoo.calib_batches(limit=256)
    batches = [x for x, _ in zoo.eval_batches(limit=images, batch_size=64)]
    fp32 = export_onnx(zoo.model, zoo.example_inputs, tmp / "r56-fp32.onnx", progress=False)
    rows = [f"| FP32 | - | - | {_mb(fp32['bytes'])} | 1.00x | - | - | - | - |"]
    for label, recipe in {"W4": {"w_bits": 4}, "W4A8": {"w_bits": 4, "a_bits": 8}}.items():
        qmodel = postquant.quantize(zoo.model, {"method": "rtn", "symmetric": True, **recipe}, calib=calib)
        layers = list(quantized_layers(qmodel))
        fp32_weights = sum(4 * layer.codes.numel() for layer in quantized_layers(qmodel).values())
        for storage in ["weight-only", "all", "none"] if "a_bits" in recipe else ["weight-only", "none"]:
            path = tmp / f"r56-{label}-{storage}.onnx"
            info = export_onnx(
                qmodel, zoo.example_inputs, path, verify_batches=batches, int4=storage, progress=False
            )
            dtypes = list(info["weight_dtypes"].values())
            counts = ", ".join(f"{d} {dtypes.count(d)}" for d in sorted(set(dtypes)))
            weights = _weight_bytes(path, layers)
            rows.append(
                f"| {label} | `{storage}`: {counts} | {info['opset']} | {_mb(info['bytes'])} | "
                f"{fp32['bytes'] / info['bytes']:.2f}x | {fp32_weights / weights:.2f}x | "
                f"{info['top1_agreement']:.2f} % | {info['sqnr_db']:.1f} | {info['integer_kernels']} |"
            )
            log.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=400, help="STS-B test pairs")
    parser.add_argument("--calib-size", type=int, default=64, help="calibration sentences")
    parser.add_argument("--images", type=int, default=512, help="CIFAR-10 test images to verify ResNet-56 on")
    parser.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per MiniLM graph")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_int4.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("postquant").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    start, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        minilm, notes = minilm_rows(args.limit, args.calib_size, args.runs, Path(tmp))
        resnet = resnet_rows(args.images, Path(tmp))
    command = (
        f"python benchmarks/onnx_int4.py --limit {args.limit} --calib-size {args.calib_size} "
        f"--images {args.images} --runs {args.runs}"
    )
    text = "\n".join(
        [
            "# int4 weights in ONNX (opset 21): size, agreement, latency",
            "",
            f"`{command}` on {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
            f"{(time.time() - start) / 60:.1f} min; load average at the start {load[0]:.1f}, at the end "
            f"{os.getloadavg()[0]:.1f} (shared machine: latencies are noisy, compare within a column).",
            "",
            "postquant `rtn`, symmetric weights. `+ emb b`: the recipe's `embeddings: {bits: b}` (and `group_size: "
            "32` for g32): the word, position and token-type tables quantized weight-only by nearest rounding on an "
            "asymmetric grid per row (or per group of 32 values of a row), the Linears as in the W4 row; an ONNX "
            "table is its codes and a `DequantizeLinear` feeding the `Gather`. Storage: what `export_onnx` chose (`int4='weight-only'`, the "
            "default) or forced (`int4='none'`: 4-bit codes as int8, opset 17; `int4='all'`). Size ratios: FP32 "
            "ONNX / this ONNX, for the whole file and for the quantized layers' weights alone (codes + scales + "
            "zero points against their FP32 bytes).",
            "",
            f"## MiniLM-L6 (STS-B test, {args.limit} pairs, Spearman x100; onnxruntime 1 thread, batch 32)",
            "",
            "| model | weights stored | opset | .onnx | vs FP32 | quantized weights | vs FP32 | Spearman "
            "simulation | Spearman onnxruntime | SQNR vs simulation dB | max abs diff | ms / batch |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *minilm,
            "",
            "; ".join(notes)
            + ". Without `+ emb` the embeddings (30522 x 384 words, 512 positions: 11.9 M of the 22.7 M "
            "parameters) stay FP32 and dominate the whole file. onnxruntime runs a table's `DequantizeLinear` "
            "(the whole table) at every call, which the ms / batch column pays.",
            "",
            f"## ResNet-56 CIFAR-10 ({args.images} test images)",
            "",
            "| model | weights stored (layers) | opset | .onnx | vs FP32 | quantized weights vs FP32 | top-1 "
            "agreement with the simulation | SQNR dB | integer kernels |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            *resnet,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    log.info("%s", text)


if __name__ == "__main__":
    main()
