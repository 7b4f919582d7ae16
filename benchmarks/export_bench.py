"""Deployment numbers: FP32 vs quantized ONNX in onnxruntime (latency, kernels, top-1) and checkpoint sizes.

For each model (ResNet-56 on CIFAR-10 and EfficientNet-Lite0 by default):

* the float model is exported as a plain float graph; postquant's quantized models (``rtn``, symmetric
  per-channel weights, per-tensor activations, ``--calib`` calibration images) are exported with
  `postquant.io.export_onnx` in three forms: ``qdq`` (W8A8, the simulation's quantization points only),
  ``full`` (W8A8, ``full_integer=True``: residual adds and global pooling on quantized tensors, the new
  ranges calibrated on the same images) and ``full-w7`` (W7A8 full-integer: 7-bit codes lie in [-64, 63],
  stored int8, onnxruntime's fast u8 x s8 kernels cannot saturate on any x86 CPU);
* ``full-sim`` and ``full-sim-w7``: the same full-integer graphs of models quantized with integer residuals
  (recipe ``a_residual: true``): the graph's new points are the simulation's own, with the scales of the model;
* the peer: ``onnxruntime.quantization.quantize_static`` on the same float ONNX model (QDQ, per-channel,
  uint8 activations, MinMax on the same calibration images), with int8 weights (``ort-s8``, its default)
  and with ``reduce_range=True`` (``ort-s7``, 7-bit weights);
* latency in onnxruntime (CPU) at batch 1 and 32 with 1 and 2 intra-op threads: the median of the timed runs
  after warm-up, all graphs of a model alternating run by run so that they see the same machine load;
* the kernels onnxruntime runs (op counts after its graph optimizations);
* top-1 on `--limit` evaluation images of PyTorch FP32, each simulation and each ONNX graph, the top-1
  agreement of each postquant ONNX graph with its simulation, and of every graph with the FP32 ONNX model;
* the size of saved postquant checkpoints (`postquant.io.save`) at W8/W4/W3/W2 (weight-only RTN).

Finally ResNet-20 W8A8 (``qdq``) is exported and compared with its PyTorch simulation on `--limit` images.

    python benchmarks/export_bench.py --limit 1000 --out benchmarks/results/export.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from host import cpu_model  # the sibling module (benchmarks/ is on sys.path when run)

import postquant
from postquant.io import checkpoint_size, export_onnx, float_size, save
from postquant.io.onnx import count_kernels
from postquant.store.files import write_text_atomic
from postquant_lab.zoo import ZooModel, load_model

log = logging.getLogger("export_bench")

# postquant variants: (weight bits, full_integer, integer residuals in the simulation: recipe a_residual,
# int8_weights, the first layer's input quantized to 8 bits)
OURS = {
    "qdq": (8, False, False, "portable", False),
    "full": (8, True, False, "portable", False),
    "full-w7": (7, True, False, "portable", False),
    "full-sim": (8, True, True, "portable", False),
    "full-sim-w7": (7, True, True, "portable", False),
    "full-sim-s8": (8, True, True, "signed", False),
    "full-sim-s8-in8": (8, True, True, "signed", True),
    "full-sim-w7-in8": (7, True, True, "portable", True),
}
PEERS = {"ort-s8": False, "ort-s7": True}  # quantize_static, reduce_range
KERNELS = ("QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm")
FLOAT_OPS = ("Conv", "FusedConv", "Add", "GlobalAveragePool", "Gemm", "FusedGemm")


def quantize(
    zoo: ZooModel, bits: int, calib: list[Any], residual: bool = False, first_input: bool = False
) -> torch.nn.Module:
    """W`bits`A8: RTN, symmetric per-channel weights, per-tensor activations from `calib`; `residual`: with
    integer residuals (``a_residual``: the full-integer graph's points in the simulation); `first_input`: the
    first layer's input quantized to 8 bits too (by default it stays float)."""
    recipe: dict[str, Any] = {
        "method": "rtn",
        "w_bits": bits,
        "a_bits": 8,
        "symmetric": True,
        "a_residual": residual,
    }
    if first_input:
        recipe["overrides"] = {"@first": {"a_bits": 8}, "@last": {"a_bits": 8}}
    return postquant.quantize(zoo.model, recipe, calib=calib)


def quantize_static_peer(fp32: str, out: str, calib: list[torch.Tensor], reduce_range: bool) -> None:
    """onnxruntime's own static quantization of the float graph (QDQ, per channel, MinMax on `calib`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        fp32,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


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
    """Top-1 (%) of PyTorch models (``torch:<v>``) and ONNX sessions (``onnx:<v>``) on the evaluation set, and
    top-1 agreement (%): ``<v>`` = ONNX vs the simulation ``torch:<v>``, ``<v>/fp32`` = ONNX vs ONNX FP32."""
    correct = dict.fromkeys(models, 0)
    agree: dict[str, int] = {}
    n = 0
    for x, y in zoo.eval_batches(limit=limit, batch_size=128):
        preds: dict[str, torch.Tensor] = {}
        done: dict[int, str] = {}  # one simulation may stand for several graphs: run it once
        for name, model in models.items():
            if id(model) in done:
                preds[name] = preds[done[id(model)]]
            elif isinstance(model, torch.nn.Module):
                with torch.inference_mode():
                    preds[name] = model(x).argmax(dim=1)
            else:
                preds[name] = torch.from_numpy(model.run(None, {"input": x.numpy()})[0]).argmax(dim=1)
            done.setdefault(id(model), name)
            correct[name] += int((preds[name] == y).sum())
        for name in models:
            kind, v = name.split(":")
            if kind != "onnx":
                continue
            if f"torch:{v}" in preds:
                agree[v] = agree.get(v, 0) + int((preds[name] == preds[f"torch:{v}"]).sum())
            agree[f"{v}/fp32"] = agree.get(f"{v}/fp32", 0) + int((preds[name] == preds["onnx:fp32"]).sum())
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
    calib = zoo.calib_batches(limit=args.calib)
    paths = {"fp32": str(tmp / f"{name}-fp32.onnx")}
    exports = {"fp32": export_onnx(zoo.model, zoo.example_inputs, paths["fp32"], progress=False)}
    models: dict[str, Any] = {"torch:fp32": zoo.model}
    sims: dict[tuple[int, bool, bool], torch.nn.Module] = {}
    for variant, (bits, full, residual, int8_weights, first) in OURS.items():
        log.info(
            "%s: %s (W%dA8, full_integer=%s, a_residual=%s, int8_weights=%s, first input 8-bit: %s)",
            *(name, variant, bits, full, residual, int8_weights, first),
        )
        if (bits, residual, first) not in sims:
            sims[bits, residual, first] = quantize(zoo, bits, calib, residual, first)
        models[f"torch:{variant}"] = sims[bits, residual, first]
        paths[variant] = str(tmp / f"{name}-{variant}.onnx")
        exports[variant] = export_onnx(
            sims[bits, residual, first],
            zoo.example_inputs,
            paths[variant],
            full_integer=full,
            calib_batches=calib if full and not residual else None,
            int8_weights=int8_weights,
            progress=False,
        )
    for variant, reduce_range in PEERS.items():
        log.info("%s: %s (onnxruntime quantize_static)", name, variant)
        paths[variant] = str(tmp / f"{name}-{variant}.onnx")
        quantize_static_peer(paths["fp32"], paths[variant], calib, reduce_range)
        exports[variant] = {"bytes": Path(paths[variant]).stat().st_size, **count_kernels(paths[variant])}
    lat: dict[tuple[int, int], dict[str, float]] = {}
    for threads in args.threads:
        sessions = {v: session(p, threads) for v, p in paths.items()}
        for batch in (1, 32):
            runs = args.runs if batch == 1 else max(3, args.runs // 4)
            lat[threads, batch] = latency_ms(sessions, (batch, *zoo.input_shape), runs)
            log.info("%s %d thread(s) batch %d: %s", name, threads, batch, lat[threads, batch])
    log.info("%s: top-1 on %s evaluation images", name, args.limit)
    models |= {f"onnx:{v}": session(p, 1) for v, p in paths.items()}
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
    qmodel = quantize(zoo, 8, zoo.calib_batches(limit=args.calib))
    batches = zoo.eval_batches(limit=args.limit, batch_size=256)
    path = tmp / "resnet20-w8a8.onnx"
    return export_onnx(qmodel, zoo.example_inputs, path, verify_batches=batches, progress=False)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def _header(args: argparse.Namespace, seconds: float, load_start: str) -> list[str]:
    import onnxruntime as ort

    return [
        "# Export and deployment benchmark",
        "",
        f"`python benchmarks/export_bench.py {' '.join(args.argv)}` on {datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs: {cpu_model()}, torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, postquant {postquant.__version__}; {seconds / 60:.1f} min. The machine is shared: "
        f"`uptime` at the start `{load_start}`, at the end `{_uptime()}`.",
        "",
        f"postquant: `rtn` with {args.calib} calibration images, symmetric per-channel weights, per-tensor "
        "activations, the first layer's input float (but in `-in8`). `qdq`: W8A8, the simulation's quantization points only; "
        "`full`: W8A8 with `full_integer=True` (the new points calibrated in onnxruntime, not in the simulation); "
        "`full-w7`: W7A8 likewise; `full-sim`, `full-sim-w7`: the same graphs of models quantized with integer "
        "residuals (`a_residual: true`: the points in the simulation, calibrated with its activation ranges, "
        "their scales taken from the model by the export); `-s8`: every 8-bit weight stored int8 "
        "(`int8_weights='signed'`, for CPUs with VNNI; otherwise full-range codes are stored uint8, exact on every "
        "CPU but on slower kernels); `-in8`: the first layer's input quantized to 8 bits too. Peer: onnxruntime's "
        "`quantize_static` on the same FP32 ONNX graph (QDQ, per-channel, uint8 activations, MinMax on the same "
        "calibration images; it also quantizes the first layer's input): `ort-s8` int8 weights (its default), "
        "`ort-s7` `reduce_range=True` (7-bit weights). onnxruntime: CPUExecutionProvider, all graph "
        f"optimizations; PyTorch {args.torch_threads} thread(s).",
    ]


def _variants(row: dict[str, Any]) -> list[str]:
    return [v for v in row["exports"] if v != "fp32"]


def markdown(
    rows: list[dict[str, Any]], r20: dict[str, Any], args: argparse.Namespace, seconds: float, load: str
) -> str:
    variants = _variants(rows[0])
    lines = [
        *_header(args, seconds, load),
        "",
        "## onnxruntime speed-up over the FP32 ONNX model (ratio of median latencies in one run)",
        "",
        "| model | threads | batch | FP32 ms | " + " | ".join(variants) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(variants),
    ]
    for r in rows:
        for (threads, batch), t in r["latency"].items():
            cells = " | ".join(f"{t['fp32'] / t[v]:.2f}x ({t[v]:.1f} ms)" for v in variants)
            lines.append(f"| {r['name']} | {threads} | {batch} | {t['fp32']:.1f} | {cells} |")
    lines += [
        "",
        "## Top-1 and agreement on the evaluation images",
        "",
        "Agreement with the simulation: the share of images on which the ONNX graph's top-1 class is the "
        "PyTorch simulation's (postquant graphs only); with FP32: the same against the FP32 ONNX model.",
        "",
        "| model | images | graph | top-1 PyTorch | top-1 ONNX | agreement with the simulation | agreement with FP32 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, g = r["top1"], r["agreement"]
        lines.append(
            f"| {r['name']} | {r['n']} | fp32 | {a['torch:fp32']:.2f} | {a['onnx:fp32']:.2f} | - | - |"
        )
        for v in variants:
            sim = f"{a[f'torch:{v}']:.2f}" if f"torch:{v}" in a else "-"
            agree = f"{g[v]:.2f} %" if v in g else "-"
            lines.append(
                f"| {r['name']} | {r['n']} | {v} | {sim} | {a[f'onnx:{v}']:.2f} | {agree} | {g[f'{v}/fp32']:.2f} % |"
            )
    lines += [
        "",
        "## Kernels onnxruntime runs and file sizes",
        "",
        "Op counts after onnxruntime's graph optimizations (`postquant.io.count_kernels`): integer kernels, and "
        "the float compute ops left.",
        "",
        "| model | graph | .onnx size | " + " | ".join(KERNELS) + " | float ops | weights stored as uint8 |",
        "|---|---|---:|" + "---:|" * len(KERNELS) + "---|---:|",
    ]
    for r in rows:
        for v, e in r["exports"].items():
            ops = e["ops"]
            floats = ", ".join(f"{op} {ops[op]}" for op in FLOAT_OPS if ops.get(op)) or "0"
            uint8 = (
                f"{e['uint8_weight_layers']} of {e['int8_weight_layers']}"
                if "uint8_weight_layers" in e
                else "-"
            )
            counts = " | ".join(str(ops.get(k, 0)) for k in KERNELS)
            lines.append(
                f"| {r['name']} | {v} | {_mb(e['bytes'])} | {counts} | {floats} | {uint8 if v != 'fp32' else '-'} |"
            )
    lines += [
        "",
        "## ResNet-20 W8A8 `qdq` against its simulation",
        "",
        f"{int(r20['n'])} CIFAR-10 test images: top-1 agreement **{r20['top1_agreement']:.2f} %** (target >= 99 %), "
        f"output SQNR {r20['sqnr_db']:.1f} dB, max |diff| {r20['max_abs_diff']:.3g}; {r20['integer_kernels']} "
        "integer kernels.",
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
    parser.add_argument("--calib", type=int, default=256, help="calibration images")
    parser.add_argument("--runs", type=int, default=40, help="timed runs at batch 1 (a quarter at batch 32)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="PyTorch threads (quantization, evaluation)"
    )
    parser.add_argument("--limit", type=int, default=1000, help="evaluation images per model (None: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export.md"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.torch_threads)
    start, load = time.perf_counter(), _uptime()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(name, args, Path(tmp)) for name in args.models]
        r20 = resnet20_agreement(args, Path(tmp))
    text = markdown(rows, r20, args, time.perf_counter() - start, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
