"""One int4 Linear in onnxruntime: ``DequantizeLinear -> Gemm`` (what `export_onnx` writes) against the
``DequantizeLinear -> MatMul`` form that onnxruntime fuses into ``com.microsoft.MatMulNBits``, and float.

Weight (N, K) = (1536, 384), int4 codes in blocks of 32 inputs with int4 zero points (MiniLM's FFN shape);
median latency over `--runs` runs, 1 thread; the error of each graph against the float Gemm on the same
dequantized weight. MatMulNBits runs at the session's accuracy level: onnxruntime's default for the fusion
(``session.qdq_matmulnbits_accuracy_level``, 4: int8 activations), and 1 (float32). Usage:

    python benchmarks/onnx_int4_kernels.py --out benchmarks/results/onnx_int4_kernels.md
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from postquant.store.files import write_text_atomic

log = logging.getLogger("onnx_int4_kernels")

K, N, GROUP = 384, 1536, 32


def _graph(kind: str, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> bytes:
    """A one-Linear graph: ``gemm`` (codes (N, K) blocked along axis 1, Gemm transB=1), ``matmul`` (codes
    (K, N) blocked along axis 0, MatMul) or ``float`` (the dequantized weight)."""
    if kind == "float":
        weight = (codes.astype(np.float32) - np.repeat(zp, GROUP, 1)) * np.repeat(scale, GROUP, 1)
        inits = [numpy_helper.from_array(weight, "w")]
        nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    else:
        axis = 1 if kind == "gemm" else 0
        q, s, z = (codes, scale, zp) if kind == "gemm" else (codes.T, scale.T, zp.T)
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(q).astype(ml_dtypes.int4), "q"),
            numpy_helper.from_array(np.ascontiguousarray(s), "s"),
            numpy_helper.from_array(np.ascontiguousarray(z).astype(ml_dtypes.int4), "z"),
        ]
        dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=axis, block_size=GROUP)
        mm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1) if kind == "gemm" else None
        nodes = [dq, mm or helper.make_node("MatMul", ["x", "w"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])
    model = helper.make_model(
        helper.make_graph(nodes, kind, [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    return model.SerializeToString()


def _run(
    graph: bytes, x: np.ndarray, runs: int, accuracy: str | None, tmp: Path
) -> tuple[list[str], float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp)
    if accuracy is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp)).graph.node]
    y = session.run(None, {"x": x})[0]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return ops, 1e3 * float(np.median(times)), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_int4_kernels.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (N, K)).astype(np.int8)
    scale = (0.01 * rng.random((N, K // GROUP))).astype(np.float32)
    zp = rng.integers(-8, 8, (N, K // GROUP)).astype(np.int8)
    load = os.getloadavg()
    rows = []
    tmp = args.out.parent / f".{args.out.name}.optimized.onnx"
    try:
        for m in (1, 32, 128):
            x = rng.standard_normal((m, K)).astype(np.float32)
            _, float_ms, ref = _run(_graph("float", codes, scale, zp), x, args.runs, None, tmp)
            for kind, accuracy in (("gemm", None), ("matmul", None), ("matmul", "1")):
                ops, ms, y = _run(_graph(kind, codes, scale, zp), x, args.runs, accuracy, tmp)
                error = float(np.abs(y - ref).max() / np.abs(ref).max())
                level = "default" if accuracy is None else accuracy
                rows.append(
                    f"| {m} | `{kind}` | {' + '.join(ops)} | {level} | {ms:.3f} | {float_ms:.3f} | {error:.1e} |"
                )
                log.info("%s", rows[-1])
    finally:
        tmp.unlink(missing_ok=True)
    text = "\n".join(
        [
            "# One int4 Linear (1536 x 384, groups of 32) in onnxruntime",
            "",
            f"`python benchmarks/onnx_int4_kernels.py --runs {args.runs}` on {time.strftime('%Y-%m-%d')}, "
            f"onnxruntime {ort.__version__}, 1 thread, {os.cpu_count()} CPUs (shared: load average "
            f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). `gemm`: what `export_onnx` "
            "writes; `matmul`: the transposed codes onnxruntime fuses into MatMulNBits; accuracy: the session's "
            "`session.qdq_matmulnbits_accuracy_level` (default: onnxruntime's). Error: max |y - y_float| / "
            "max |y_float| against the float Gemm on the same dequantized weight.",
            "",
            "| batch | graph | ops after optimization | accuracy level | ms | float Gemm ms | relative error |",
            "|---:|---|---|---|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    write_text_atomic(args.out, text)
    log.info("%s", text)


if __name__ == "__main__":
    main()
