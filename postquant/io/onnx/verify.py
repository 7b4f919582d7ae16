"""Checks of an exported graph in onnxruntime: the kernels it runs, and agreement with the PyTorch simulation.

onnxruntime is imported inside the functions: it is an optional dependency (``postquant[onnx]``).
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from postquant.errors import OnnxMismatchError, UnsupportedModelError
from postquant.eval.metrics import sqnr_from_sums
from postquant.eval.run import call_model, eval_mode, main_output, output_tensors
from postquant.nn.layer import upcast_half
from postquant.progress import progress_bar

__all__ = [
    "FLOAT_COMPUTE_OPS",
    "INTEGER_OPS",
    "MIN_SQNR_DB",
    "MIN_TOP1_AGREEMENT",
    "count_kernels",
    "int4_unsupported",
    "verify_onnx",
]

INTEGER_OPS = frozenset(
    {"QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
)
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})
MIN_SQNR_DB = 20.0  # verify_onnx's default floors: below them the graph computes another function
MIN_TOP1_AGREEMENT = 90.0


def ort_session(path: Path, optimized_path: Path | None = None) -> Any:
    """An onnxruntime CPU session on `path`; with `optimized_path`, the optimized graph is written there."""
    import onnxruntime as ort  # optional dependency (extra: onnx)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:  # the extended level keeps the model portable (no NCHWc layouts)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
        # its tensors in a file beside it: a model over protobuf's 2 GB cannot be written whole
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{optimized_path.name}.data"
        )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


INT4_OPSET = 21  # the first opset whose DequantizeLinear takes INT4 codes and a block_size


@functools.cache
def int4_unsupported() -> str:
    """Why the installed onnx/onnxruntime cannot write or run opset-21 int4 ``DequantizeLinear`` ("" when they
    can): a 2-block int4 weight dequantized and multiplied in an onnxruntime CPU session, checked exactly."""
    import onnx  # optional dependency (extra: onnx)
    import onnxruntime as ort  # optional dependency (extra: onnx)
    from onnx import TensorProto, helper, numpy_helper  # optional dependency (extra: onnx)

    versions = f"onnx {onnx.__version__}, onnxruntime {ort.__version__}"
    if onnx.defs.onnx_opset_version() < INT4_OPSET:
        return f"onnx knows opsets up to {onnx.defs.onnx_opset_version()} ({versions})"
    try:
        import ml_dtypes  # a dependency of onnx (>= 1.16), for INT4 tensors

        codes = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)  # (K, N), blocks of 2 along K
        scale = np.array([[0.5, 1, 2, 4], [1, 1, 1, 1]], np.float32)
        zp = np.array([[1, 0, -1, 7], [0, -8, 3, 0]], np.int8)
        inits = [
            numpy_helper.from_array(codes.astype(ml_dtypes.int4), "q"),
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(zp.astype(ml_dtypes.int4), "z"),
        ]
        nodes = [
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0, block_size=2),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
        graph = helper.make_graph(nodes, "int4_probe", [x], [y], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", INT4_OPSET)])
        onnx.checker.check_model(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {"x": np.eye(4, dtype=np.float32)})[0]
    except Exception as exc:  # an old onnx/ml_dtypes/onnxruntime fails in many ways; say which
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} ({versions})"
    expected = (codes - np.repeat(zp, 2, axis=0)) * np.repeat(scale, 2, axis=0)
    if not np.array_equal(out, expected):
        return f"onnxruntime dequantizes int4 blocks wrongly ({versions})"
    return ""


def count_kernels(path: str | Path) -> dict[str, Any]:
    """Op counts of the model after onnxruntime's graph optimizations (what actually runs).

    Returns:
        ``integer_kernels`` (QLinear*, QGemm, MatMulInteger, ConvInteger... nodes), ``float_kernels`` (Conv,
        Gemm, MatMul and their fused forms that still run in float) and ``ops`` (every op type's count).
    """
    import onnx  # optional dependency (extra: onnx)

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(Path(path), optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
        ops = Counter(node.op_type for node in graph.node)
    integer = sum(n for op, n in ops.items() if op.startswith("QLinear") or op in INTEGER_OPS)
    floats = sum(n for op, n in ops.items() if op in FLOAT_COMPUTE_OPS)
    return {"integer_kernels": integer, "float_kernels": floats, "ops": dict(sorted(ops.items()))}


def _model_inputs(batch: Any, n_inputs: int) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """The model inputs of a batch; ``(inputs, labels)`` pairs of a single-input model lose their labels."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, tuple | list):
        return tuple(batch[:n_inputs])
    raise UnsupportedModelError(
        f"a verification batch must be a tensor, a tuple or a dict of tensors, not {type(batch).__name__}"
    )


def _main_output_of(out: Any, n_outputs: int) -> tuple[torch.Tensor, int]:
    """The model's main output (`main_output`) and the index of the graph output that computes it.

    The exporter writes the model's tensors in the order of `output_tensors`; the main output is output 0
    for tensors, tuples and Hugging Face outputs, another one for e.g. a dict with ``logits`` after other
    tensors.
    """
    try:
        main = main_output(out)
    except TypeError:
        raise UnsupportedModelError(
            f"the model returns {type(out).__name__} without a tensor to compare"
        ) from None
    tensors = output_tensors(out)
    k = next((i for i, t in enumerate(tensors) if t is main), None)
    if k is not None and (k == 0 or len(tensors) == n_outputs):
        return main, k
    where = f"tensor {k} of {len(tensors)}" if k is not None else "not a tuple item or mapping value"
    raise UnsupportedModelError(
        f"cannot tell which of the {n_outputs} ONNX outputs is the model's main output ({where} in its "
        f"{type(out).__name__}): return the main output first to verify the export"
    )


def ort_feed(batch: Any, names: list[str]) -> dict[str, np.ndarray]:
    """onnxruntime's input feed (float32 numpy arrays by graph input name) for one batch of model inputs
    (a tensor, a tuple, an ``(inputs, labels)`` pair or a dict of keyword tensors)."""
    inputs = _model_inputs(batch, len(names))
    if isinstance(inputs, Mapping):  # the exporter drops keyword inputs the graph does not use
        return {n: upcast_half(inputs[n]).detach().cpu().numpy() for n in names}
    return {n: upcast_half(t).detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}


def verify_onnx(
    qmodel: nn.Module,
    path: str | Path,
    batches: Iterable[Any],
    *,
    min_sqnr_db: float | None = MIN_SQNR_DB,
    min_top1_agreement: float | None = MIN_TOP1_AGREEMENT,
    progress: bool = True,
) -> dict[str, float]:
    """Compare the ONNX model in onnxruntime (CPU) with the PyTorch simulation on `batches`; fail when they
    disagree.

    ONNX and the simulation are the same quantized function up to float summation order, which flips a few
    activation codes: correct W8A8 exports measured 38-140 dB and >= 99 % top-1 agreement (ResNet-20 on
    CIFAR-10: 39 dB, 99.4 %; EfficientNet-Lite0 on random inputs: 38 dB), low-bit activations less. The default
    floors (20 dB, 90 %) are far below that and above graphs that compute something else (saturated integer
    kernels: 9-21 dB, 25 % agreement).

    Args:
        qmodel: the quantized PyTorch model.
        path: its ONNX export.
        batches: model inputs (tensors, tuples, or ``(inputs, labels)`` pairs of an evaluation set).
        min_sqnr_db: the lowest accepted SQNR of the ONNX outputs against PyTorch's, in dB (None: no floor).
        min_top1_agreement: the lowest accepted top-1 agreement in percent, for (N, C) outputs (None: no floor).
        progress: show a bar over the batches.

    Returns:
        ``top1_agreement`` (percent of samples with the same arg-max, NaN unless outputs are (N, C)),
        ``max_abs_diff``, ``sqnr_db`` of the ONNX outputs against PyTorch's, and ``n`` (samples).

    Raises:
        OnnxMismatchError: the SQNR or the top-1 agreement is below its floor (or NaN); the error's
            ``metrics`` holds the returned dict.
    """
    session = ort_session(Path(path))
    names = [i.name for i in session.get_inputs()]
    n_outputs = len(session.get_outputs())
    signal = noise = max_abs = 0.0
    agree = samples = 0
    two_d = True
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in progress_bar(batches, total=total, desc="verify onnx", unit="batch", enabled=progress):
        inputs = _model_inputs(batch, len(names))
        with torch.inference_mode(), eval_mode(qmodel):
            main, k = _main_output_of(call_model(qmodel, inputs), n_outputs)
        ref = main.detach().cpu().double().numpy()
        out = session.run(None, ort_feed(inputs, names))[k].astype(np.float64)
        diff = out - ref
        signal += float(np.square(ref).sum())
        noise += float(np.square(diff).sum())
        max_abs = max(max_abs, float(np.abs(diff).max(initial=0.0)))
        samples += ref.shape[0]
        if ref.ndim == 2:
            agree += int((ref.argmax(axis=1) == out.argmax(axis=1)).sum())
        else:
            two_d = False
    if samples == 0:
        raise ValueError("verify_onnx needs at least one batch")
    metrics = {
        "top1_agreement": 100.0 * agree / samples if two_d else math.nan,
        "max_abs_diff": max_abs,
        "sqnr_db": sqnr_from_sums(signal, noise),
        "n": float(samples),
    }
    _check_agreement(Path(path), metrics, min_sqnr_db, min_top1_agreement)
    return metrics


def _check_agreement(
    path: Path, metrics: dict[str, float], min_sqnr_db: float | None, min_top1: float | None
) -> None:
    """Raise `OnnxMismatchError` when a metric of `verify_onnx` is below its floor (NaN SQNR fails too)."""
    failed = []
    sqnr, top1 = metrics["sqnr_db"], metrics["top1_agreement"]
    if min_sqnr_db is not None and not sqnr >= min_sqnr_db:
        failed.append(f"output SQNR {sqnr:.1f} dB < {min_sqnr_db:g} dB")
    if min_top1 is not None and not math.isnan(top1) and top1 < min_top1:
        failed.append(f"top-1 agreement {top1:.2f} % < {min_top1:g} %")
    if not failed:
        return
    raise OnnxMismatchError(
        f"onnxruntime's outputs of {path} disagree with the PyTorch simulation on {metrics['n']:.0f} samples: "
        f"{' and '.join(failed)} (max |diff| {metrics['max_abs_diff']:.3g}). The graph does not compute the "
        "quantized model: do not deploy it. Check that the file was written by this postquant version and not "
        "edited since, and that onnxruntime runs on the CPU provider; if it still fails, report it with the "
        "model. If the difference is expected (low-bit activations on a deep model, where rounding flips add "
        "up, or inputs far from the calibration data), pass lower min_sqnr_db= / min_top1_agreement= "
        "(None turns a check off).",
        metrics,
    )
