"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ), verified in onnxruntime.

The quantized model is exported in two steps:

1. its *float twin* (each `QuantizedLayer` replaced by its float module holding the dequantized weight) is
   exported with the TorchScript exporter (``dynamo=False``), which keeps a layer's weight as the initializer
   ``<name>.weight`` feeding one Conv or Gemm node;
2. the graph is rewritten per quantized layer (`postquant.io.onnx.rewrite`) with the layer's ONNX parameters
   (`postquant.io.onnx.params`), checked, written, and its kernels counted and outputs compared with the
   PyTorch simulation in onnxruntime (`postquant.io.onnx.verify`).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from postquant.errors import ExportError, OnnxMismatchError, OutputError, UnsupportedModelError
from postquant.eval.run import move_batch
from postquant.io.onnx.integer import Ranges, integerize, tensor_ranges
from postquant.io.onnx.params import LayerQDQ, plan_layers
from postquant.io.onnx.points import ModelPoints
from postquant.io.onnx.rewrite import drop_zero_gemm_biases, rewrite
from postquant.io.onnx.verify import MIN_SQNR_DB, MIN_TOP1_AGREEMENT, count_kernels, ort_feed, verify_onnx
from postquant.model import quantized_layers, set_module
from postquant.model.hf import no_kv_cache
from postquant.nn.layer import HALF, upcast_half
from postquant.nn.residual import ResidualQuant, remove_points, residual_points
from postquant.progress import progress_bar

__all__ = ["export_onnx", "float_twin"]

log = logging.getLogger(__name__)


class _MatrixLinear(nn.Module):
    """A Linear that flattens inputs of more than two dimensions to a matrix, so that it exports as one Gemm
    on its weight initializer (the exporter turns a Linear on (N, L, D), or one without a bias, into a MatMul
    on a folded, transposed copy of the weight, which the QDQ rewrite cannot find). The same function: rows
    are independent, and a missing bias becomes an exact zero one."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        bias = linear.bias
        if bias is None:  # without a bias the exporter writes MatMul on a transposed copy of the weight
            bias = nn.Parameter(
                torch.zeros(linear.out_features, dtype=linear.weight.dtype), requires_grad=False
            )
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def float_twin(qmodel: nn.Module) -> nn.Module:
    """A copy of `qmodel` where each `QuantizedLayer` is its float module holding the dequantized weight.

    Input quantizers (and the points of integer residuals) are dropped; `export_onnx` puts them back as QDQ
    nodes. Linears (whose forward is
    ``nn.Linear``'s) take their input as a matrix (`_MatrixLinear`).
    """
    twin = copy.deepcopy(qmodel).eval()
    remove_points(twin)  # integer residuals: `postquant.io.onnx.points` puts them back as QDQ nodes
    for name, layer in quantized_layers(twin).items():
        inner = layer.inner
        inner.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        if isinstance(inner, nn.Linear) and type(inner).forward is nn.Linear.forward:
            inner = _MatrixLinear(inner)
        set_module(twin, name, inner)
    return twin


# --------------------------------------------------------------------------------------------- export


@dataclass
class _Inputs:
    """The example inputs: positional tensors, or keyword tensors (a tokenizer's dict)."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        if self.kwargs:
            return list(self.kwargs)
        return ["input"] if len(self.args) == 1 else [f"input_{i}" for i in range(len(self.args))]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Dimension 0 of every input is the batch; dimension 1 of keyword inputs is the sequence."""
        tensors = list(self.kwargs.values()) if self.kwargs else list(self.args)
        return {
            name: {0: "batch", 1: "sequence"} if self.kwargs and t.dim() >= 2 else {0: "batch"}
            for name, t in zip(self.names, tensors, strict=True)
        }


def _as_inputs(example_inputs: Any) -> _Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return _Inputs((example_inputs,), {})
    if isinstance(example_inputs, tuple | list) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return _Inputs(tuple(example_inputs), {})
    if isinstance(example_inputs, Mapping) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in example_inputs.items()
    ):
        return _Inputs((), dict(example_inputs))
    raise UnsupportedModelError(
        "export_onnx takes example inputs as a tensor, a tuple of positional tensors or a dict of keyword "
        f"tensors (a tokenizer's output), not {type(example_inputs).__name__}"
    )


class _Keywords(nn.Module):
    """Calls `model` with keyword tensors given positionally, in the order of `names` (what the exporter
    traces: its own keyword handling trips over models with more keyword parameters, such as BERT's)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))

    @staticmethod
    def unwrap(graph: Any) -> None:
        """Drop the wrapper's ``model.`` from the initializer names, so that layers are found by their names."""
        renamed = {i.name: i.name[len("model.") :] for i in graph.initializer if i.name.startswith("model.")}
        for init in graph.initializer:
            init.name = renamed.get(init.name, init.name)
        for node in graph.node:
            node.input[:] = [renamed.get(x, x) for x in node.input]


def _torch_export(model: nn.Module, inputs: _Inputs, path: Path, opset: int) -> None:
    axes = {**inputs.dynamic_axes, "output": {0: "batch"}}
    args = inputs.args
    if inputs.kwargs:
        model, args = _Keywords(model, inputs.names), tuple(inputs.kwargs.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        try:
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=inputs.names,
                output_names=["output"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types; say which model part failed
            raise UnsupportedModelError(f"torch.onnx.export failed on {type(model).__name__}: {exc}") from exc


def _exported(tmp: Path, path: Path, opset: int, plans: dict[str, LayerQDQ]) -> dict[str, Any]:
    """The result of `export_onnx` for the graph written at `tmp` (to be renamed to `path`), before verifying."""
    result: dict[str, Any] = {
        "path": str(path),
        "bytes": tmp.stat().st_size,
        "opset": opset,
        "int8_weight_layers": len(plans),
        "uint8_weight_layers": sum(p.weight.dtype == "uint8" for p in plans.values()),
        "weight_dtypes": {name: p.weight.dtype for name, p in plans.items()},
        "float_compute_layers": {name: p.weight.why_float for name, p in plans.items() if p.weight.why_float},
        **count_kernels(tmp),
        "top1_agreement": None,
        "max_abs_diff": None,
        "sqnr_db": None,
        "n": None,
    }
    log.info(
        "exported %s (%d bytes): %d layers with 8-bit weights (%d stored as uint8), %d integer kernels after "
        "onnxruntime fusion",
        path,
        result["bytes"],
        result["int8_weight_layers"],
        result["uint8_weight_layers"],
        result["integer_kernels"],
    )
    return result


def _integerize(
    model: Any,
    inputs: _Inputs,
    example_inputs: Any,
    calib_batches: Iterable[Any] | None,
    points: ResidualQuant | None,
) -> dict:
    """`integerize` `model` with the quantizers of the model's integer residuals (`points`), else with ranges
    from `calib_batches` (or the example inputs) run in onnxruntime."""
    if points is not None:
        if calib_batches is not None:
            log.info(
                "full_integer export: the model's own residual points give the ranges; calib_batches unused"
            )
        found: list[ModelPoints] = []

        def from_model(tensors: list[str]) -> ModelPoints:
            found.append(ModelPoints(model, points, tensors))
            return found[-1]

        integer = integerize(model, from_model)
        found[0].check_all_used()
        return integer
    if calib_batches is None:
        log.warning(
            "full_integer export without calib_batches: the ranges of the new quantization points come from "
            "the example inputs alone; pass calib_batches= (e.g. the calibration batches) for real ranges"
        )
        calib_batches = [example_inputs]
    batches = list(calib_batches)
    if not batches:
        raise ValueError("export_onnx(full_integer=True) needs at least one calibration batch")
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    feeds = [ort_feed(batch, names) for batch in batches]
    return integerize(model, lambda tensors: Ranges(tensor_ranges(model, tensors, feeds) if tensors else {}))


def export_onnx(
    qmodel: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    verify_batches: Iterable[Any] | None = None,
    opset: int = 17,
    min_sqnr_db: float | None = MIN_SQNR_DB,
    min_top1_agreement: float | None = MIN_TOP1_AGREEMENT,
    progress: bool = True,
    full_integer: bool = False,
    calib_batches: Iterable[Any] | None = None,
) -> dict[str, Any]:
    """Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear, and check it in onnxruntime.

    Args:
        qmodel: a quantized model (a float model exports as plain float ONNX, e.g. as a speed baseline).
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors (a tokenizer's output) that
            the model accepts; dimension 0 is exported as dynamic (and dimension 1 of keyword inputs: the
            sequence). A model that returns several outputs is checked on the first.
        path: the ``.onnx`` file to write (its folder is created).
        verify_batches: batches to compare onnxruntime with the PyTorch simulation on (see `verify_onnx`).
        opset: ONNX opset, 13 or more (per-channel DequantizeLinear).
        min_sqnr_db, min_top1_agreement: the floors of the verification (see `verify_onnx`).
        progress: show a bar over the export's steps, then one over the verification batches.
        full_integer: also quantize the tensors between quantized ops (conv outputs before residual adds,
            the adds' outputs, the feature map before global pooling), so that onnxruntime runs chains of
            QLinearConv / QLinearAdd / QLinearGlobalAveragePool in integers (`postquant.io.onnx.integer`):
            faster, and 8-bit rounding the simulation does not have at those points (the verification
            measures it).
        calib_batches: batches (like `verify_batches`) whose min/max give the ranges of the new quantization
            points of `full_integer` (default: the example inputs alone, with a warning). A model quantized
            with integer residuals (recipe ``a_residual: true``) has those points already: the graph takes
            their scales and zero points, computes the simulation's function, and `calib_batches` is unused.

    Returns:
        ``path``, ``bytes``, ``opset``, ``int8_weight_layers`` (layers with 8-bit integer codes, int8 or
        uint8), ``uint8_weight_layers`` (how many of them store uint8 codes: codes outside [-64, 63], see the
        module docstring), ``weight_dtypes`` ({layer: "int8" or "uint8"}), ``float_compute_layers`` ({layer:
        why onnxruntime cannot give it integer kernels}), the `count_kernels` entries ``integer_kernels``,
        ``float_kernels``, ``ops``, and ``top1_agreement``, ``max_abs_diff``, ``sqnr_db``, ``n`` (None without
        `verify_batches`); with `full_integer`, ``full_integer`` (what `integerize` returns).

    Raises:
        UnsupportedModelError: a layer QDQ cannot express (the message names it), or the exporter failed;
            `ExportError` (a subclass) for a model with integer residuals exported without `full_integer`,
            or whose points do not match the full-integer graph's (the message names the point).
        OutputError: `path` cannot be written.
        OnnxMismatchError: onnxruntime disagrees with the simulation on `verify_batches` (nothing is written
            at `path`; the graph is kept beside it as ``<stem>.rejected.onnx``,
            for inspection).
    """
    import onnx  # optional dependency (extra: onnx)

    if opset < 13:
        raise UnsupportedModelError(f"opset {opset} has no per-channel DequantizeLinear; use opset >= 13")
    if any(t.device.type != "cpu" for t in [*qmodel.parameters(), *qmodel.buffers()]):
        qmodel = copy.deepcopy(qmodel).cpu()  # exported and verified on the CPU, where onnxruntime runs
    example_inputs = move_batch(example_inputs, "cpu")
    inputs = _as_inputs(example_inputs)  # first: export_onnx(qmodel, path, inputs) gets a clear error
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"export_onnx(qmodel, example_inputs, path): path is a str or Path, not {type(path).__name__}"
        )
    path = Path(path).expanduser()
    plans = plan_layers(qmodel)
    points = residual_points(qmodel)
    if points is not None and not (full_integer and plans):
        raise ExportError(
            "the model quantizes its residual adds and global pooling (recipe a_residual: true); a QDQ graph "
            "without those points computes another function: export it with full_integer=True"
        )
    if not plans:
        log.info("%s has no quantized layer: exporting it in float", type(qmodel).__name__)
    steps = progress_bar(total=4, desc="export onnx", unit="step", enabled=progress)
    steps.set_postfix_str("trace")
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        twin = float_twin(qmodel)
        if any(t.dtype in HALF for t in twin.state_dict().values()):
            twin = twin.float()  # a half-precision model exports in float32 (with its int8 weights)
            inputs = _Inputs(
                tuple(map(upcast_half, inputs.args)), {k: upcast_half(t) for k, t in inputs.kwargs.items()}
            )
        with no_kv_cache(twin):  # a causal LM's key/value cache object is no ONNX output
            _torch_export(twin, inputs, float_path, opset)
        model = onnx.load(str(float_path))
    steps.update()
    steps.set_postfix_str("quantize graph")
    if inputs.kwargs:
        _Keywords.unwrap(model.graph)
    drop_zero_gemm_biases(model.graph)
    rewrite(model, plans)
    integer = None
    if full_integer and plans:
        integer = _integerize(model, inputs, example_inputs, calib_batches, points)
    onnx.checker.check_model(model)
    steps.update()
    steps.set_postfix_str("save")
    try:  # written beside `path` and renamed into place once verified: never a half-written or
        path.parent.mkdir(parents=True, exist_ok=True)  # unverified file at `path`
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
    except OSError as exc:
        raise OutputError(f"cannot write the ONNX model to {path}: {exc.strerror or exc}") from exc
    try:
        try:
            onnx.save(model, str(tmp))
        except OSError as exc:
            raise OutputError(f"cannot write the ONNX model to {path}: {exc.strerror or exc}") from exc
        steps.update()
        steps.set_postfix_str("count kernels")  # an onnxruntime session: its graph optimisation takes a while
        result = _exported(tmp, path, opset, plans)
        if integer is not None:
            result["full_integer"] = integer
        steps.update()
        steps.close()
        if verify_batches is not None:
            result.update(
                verify_onnx(
                    qmodel,
                    tmp,
                    verify_batches,
                    min_sqnr_db=min_sqnr_db,
                    min_top1_agreement=min_top1_agreement,
                    progress=progress,
                )
            )
            log.info(
                "onnxruntime vs PyTorch on %d samples: top-1 agreement %.2f %%, max |diff| %.3g, SQNR %.1f dB",
                result["n"],
                result["top1_agreement"],
                result["max_abs_diff"],
                result["sqnr_db"],
            )
    except OnnxMismatchError as exc:
        rejected = path.with_name(f"{path.stem}.rejected{path.suffix}")
        os.replace(tmp, rejected)
        raise OnnxMismatchError(
            f"{exc} Nothing was written to {path}; the rejected graph is kept at {rejected} for inspection.",
            exc.metrics,
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return result
