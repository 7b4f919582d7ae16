"""Deployment numbers: FP32 vs W8A8 ONNX in onnxruntime (latency, size, top-1) and postquant checkpoint sizes.

For each model (ResNet-56 on CIFAR-10 and EfficientNet-Lite0 by default):

* the float model and two W8A8 quantizations are exported with `postquant.io.export_onnx` (the float one as
  a plain float graph). Both W8A8 variants use ``rtn`` with 256 calibration images (or data-free ``squant``):
  ``asym`` keeps the SQuant reference grid (asymmetric, per channel), ``sym`` uses ``symmetric=True``
  (weight zero point 0, the form onnxruntime's integer convolutions are fast with);
* latency in onnxruntime (CPU, ``--threads`` intra-op threads) at batch 1 and 32: the median of the timed
  runs after warm-up, the three models alternating run by run so that they see the same machine load;
* top-1 on the full evaluation set of PyTorch FP32, each PyTorch W8A8 simulation, ONNX FP32 and each ONNX
  W8A8, and the top-1 agreement of each ONNX W8A8 with its simulation;
* the size of saved postquant checkpoints (`postquant.io.save`) at W8/W4/W3/W2 (weight-only RTN) against the
  FP32 size of the float model (parameters and buffers).

Finally ResNet-20 W8A8 (``asym``) is exported and compared with its PyTorch simulation on the full CIFAR-10
test set.

    python benchmarks/export_bench.py --out benchmarks/results/export.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import postquant
from postquant.io import checkpoint_size, export_onnx, float_size, save
from postquant.store.files import write_text_atomic
from postquant_lab.zoo import ZooModel, load_model

log = logging.getLogger("export_bench")

VARIANTS = {"asym": {}, "sym": {"symmetric": True}}  # recipe changes of the W8A8 variants


def quantize_w8a8(zoo: ZooModel, method: str, calib_size: int, **changes: Any) -> torch.nn.Module:
    """W8A8 per the brief: data-free SQuant, or RTN with `calib_size` calibration images."""
    recipe = {"method": method, "w_bits": 8, "a_bits": 8, **changes}
    if method == "squant":
        return postquant.quantize(zoo.model, recipe, example_inputs=zoo.example_inputs)
    return postquant.quantize(zoo.model, recipe, calib=zoo.calib_batches(limit=calib_size))


def session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latency_ms(
    sessions: dict[str, Any], shape: tuple[int, ...], runs: int, warmup: int = 3
) -> dict[str, float]:
    """Median wall time (ms) per session on one random batch, the sessions alternating run by run."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for i in range(warmup + runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, {"input": x})
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def top1(
    zoo: ZooModel, models: dict[str, Any], limit: int | None
) -> tuple[dict[str, float], dict[str, float], int]:
    """Top-1 (%) of PyTorch models and ONNX sessions on the evaluation set, and ONNX vs simulation agreement.

    `models` maps ``torch:<v>`` / ``onnx:<v>`` to a module or an onnxruntime session; agreement is reported per
    ``<v>`` that has both.
    """
    correct = dict.fromkeys(models, 0)
    variants = [
        k.split(":")[1] for k in models if k.startswith("onnx:") and f"torch:{k.split(':')[1]}" in models
    ]
    agree = dict.fromkeys(variants, 0)
    n = 0
    for x, y in zoo.eval_batches(limit=limit, batch_size=128):
        preds = {}
        for name, model in models.items():
            if isinstance(model, torch.nn.Module):
                with torch.inference_mode():
                    preds[name] = model(x).argmax(dim=1)
            else:
                preds[name] = torch.from_numpy(model.run(None, {"input": x.numpy()})[0]).argmax(dim=1)
            correct[name] += int((preds[name] == y).sum())
        for v in variants:
            agree[v] += int((preds[f"onnx:{v}"] == preds[f"torch:{v}"]).sum())
        n += len(y)
    return {k: 100.0 * c / n for k, c in correct.items()}, {v: 100.0 * a / n for v, a in agree.items()}, n


def checkpoint_sizes(zoo: ZooModel, tmp: Path) -> dict[int, int]:
    sizes = {}
    for bits in (8, 4, 3, 2):
        qmodel = postquant.quantize(zoo.model, {"w_bits": bits}, example_inputs=zoo.example_inputs)
        sizes[bits] = checkpoint_size(save(qmodel, tmp / f"{zoo.name}-w{bits}", model_name=zoo.name))
    return sizes


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    zoo = load_model(name)
    paths = {"fp32": str(tmp / f"{name}-fp32.onnx")}
    exports = {"fp32": export_onnx(zoo.model, zoo.example_inputs, paths["fp32"])}
    models: dict[str, Any] = {"torch:fp32": zoo.model}
    for variant, changes in VARIANTS.items():
        log.info("%s: W8A8 %s (%s)", name, variant, args.method)
        models[f"torch:{variant}"] = quantize_w8a8(zoo, args.method, args.calib, **changes)
        paths[variant] = str(tmp / f"{name}-w8a8-{variant}.onnx")
        exports[variant] = export_onnx(models[f"torch:{variant}"], zoo.example_inputs, paths[variant])
    sessions = {v: session(p, args.threads) for v, p in paths.items()}
    lat = {}
    for batch in (1, 32):
        runs = args.runs if batch == 1 else max(3, args.runs // 4)
        lat[batch] = latency_ms(sessions, (batch, *zoo.input_shape), runs)
        log.info("%s batch %d: %s", name, batch, lat[batch])
    log.info("%s: top-1 on the evaluation set", name)
    models |= {f"onnx:{v}": s for v, s in sessions.items()}
    acc, agreement, n = top1(zoo, models, args.limit)
    log.info("%s: %s, agreement %s on %d", name, acc, agreement, n)
    return {
        "name": name,
        "exports": exports,
        "latency": lat,
        "top1": acc,
        "agreement": agreement,
        "n": n,
        "fp32_bytes": float_size(zoo.model),
        "checkpoints": checkpoint_sizes(zoo, tmp),
    }


def resnet20_agreement(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    zoo = load_model("resnet20-cifar10")
    qmodel = quantize_w8a8(zoo, args.method, args.calib)
    batches = zoo.eval_batches(limit=args.limit, batch_size=256)
    return export_onnx(qmodel, zoo.example_inputs, tmp / "resnet20-w8a8.onnx", verify_batches=batches)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _header(args: argparse.Namespace, seconds: float) -> list[str]:
    import onnxruntime as ort

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    calib = (
        f" with {args.calib} calibration images" if args.method == "rtn" else " (data-free activation ranges)"
    )
    return [
        "# Export and deployment benchmark",
        "",
        f"`python benchmarks/export_bench.py {' '.join(args.argv)}` on {datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared: load average {load[0]:.1f} at the end), torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, postquant {postquant.__version__}; {seconds / 60:.1f} min.",
        "",
        f"W8A8 = `{args.method}`{calib}; per-channel weights, per-tensor activations, the first layer's input "
        "float. `asym`: the SQuant reference grid (asymmetric, zero point -Z); `sym`: `symmetric=True` (zero "
        f"point 0). onnxruntime: CPUExecutionProvider, all graph optimizations, {args.threads} intra-op thread(s); "
        f"PyTorch {args.torch_threads} thread(s).",
    ]


def markdown(
    rows: list[dict[str, Any]], r20: dict[str, Any], args: argparse.Namespace, seconds: float
) -> str:
    lines = [
        *_header(args, seconds),
        "",
        "## onnxruntime latency and size: FP32 vs W8A8",
        "",
        "| model | batch | FP32 ms | asym ms | sym ms | asym speed-up | sym speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for batch, t in r["latency"].items():
            lines.append(
                f"| {r['name']} | {batch} | {t['fp32']:.2f} | {t['asym']:.2f} | {t['sym']:.2f} "
                f"| {t['fp32'] / t['asym']:.2f}x | {t['fp32'] / t['sym']:.2f}x |"
            )
    lines += [
        "",
        "| model | variant | .onnx size | integer kernels | layers in float (why) |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        for v, e in r["exports"].items():
            floats = e["float_compute_layers"]
            why = f"{len(floats)} ({sorted(set(floats.values()))[0].split(':')[0]})" if floats else "0"
            kernels = "-" if v == "fp32" else f"{e['integer_kernels']} of {e['int8_weight_layers']} layers"
            lines.append(
                f"| {r['name']} | {v} | {_mb(e['bytes'])} | {kernels} | {why if v != 'fp32' else '-'} |"
            )
    lines += [
        "",
        "Latency: median of the timed runs, the three models alternating in one loop. Integer kernels: QLinearConv",
        "and QGemm nodes after onnxruntime's graph optimizations. A conv becomes QLinearConv when its input comes",
        "from a DequantizeLinear and its output goes to a QuantizeLinear (through ReLU/ReLU6); convs whose output",
        "feeds a float residual Add (as in the PyTorch simulation) stay float Convs on a weight dequantized at run",
        "time, which also keeps them off onnxruntime's NCHWc float kernels.",
        "",
        "## Top-1 on the full evaluation sets",
        "",
        "| model | samples | PyTorch FP32 | ONNX FP32 | simulation asym | ONNX asym | simulation sym | ONNX sym "
        "| ONNX = simulation (asym / sym) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, g = r["top1"], r["agreement"]
        lines.append(
            f"| {r['name']} | {r['n']} | {a['torch:fp32']:.2f} | {a['onnx:fp32']:.2f} | {a['torch:asym']:.2f} "
            f"| {a['onnx:asym']:.2f} | {a['torch:sym']:.2f} | {a['onnx:sym']:.2f} "
            f"| {g['asym']:.2f} % / {g['sym']:.2f} % |"
        )
    lines += [
        "",
        f"ResNet-20 W8A8 (asym), ONNX vs PyTorch simulation on the CIFAR-10 test set ({int(r20['n'])} images): "
        f"top-1 agreement **{r20['top1_agreement']:.2f} %** (target >= 99 %), output SQNR {r20['sqnr_db']:.1f} dB, "
        f"max |diff| {r20['max_abs_diff']:.3g}; {r20['integer_kernels']} integer kernels.",
        "",
        "## postquant checkpoint sizes (weight-only RTN, packed codes + manifest)",
        "",
        "| model | FP32 | W8 | W4 | W3 | W2 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp32 = r["fp32_bytes"]
        cells = [f"{_mb(s)} ({fp32 / s:.1f}x)" for _, s in sorted(r["checkpoints"].items(), reverse=True)]
        lines.append(f"| {r['name']} | {_mb(fp32)} | " + " | ".join(cells) + " |")
    lines += ["", "FP32 = bytes of the float model's parameters and buffers; (Nx) = FP32 / checkpoint size."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56-cifar10", "efficientnet-lite0"])
    parser.add_argument("--method", choices=["rtn", "squant"], default="rtn")
    parser.add_argument("--calib", type=int, default=256, help="calibration images for rtn")
    parser.add_argument("--runs", type=int, default=40, help="timed runs at batch 1 (a quarter at batch 32)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="PyTorch threads (quantization, evaluation)"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluation samples (default: the full sets)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export.md"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(name, args, Path(tmp)) for name in args.models]
        r20 = resnet20_agreement(args, Path(tmp))
    text = markdown(rows, r20, args, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
