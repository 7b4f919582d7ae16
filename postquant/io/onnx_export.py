"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ), verified in onnxruntime.

The quantized model is exported in two steps:

1. its *float twin* (each `QuantizedLayer` replaced by its float module holding the dequantized weight) is
   exported with the TorchScript exporter (``dynamo=False``), which keeps a layer's weight as the initializer
   ``<name>.weight`` feeding one Conv or Gemm node;
2. the graph is rewritten per quantized layer: the weight initializer becomes 8-bit codes plus a
   ``DequantizeLinear`` (scale ``1/S`` per output channel on axis 0, zero point ``-Z``: the grid's
   ``w_hat = (q + Z)/S`` is ONNX's ``(q - zp) * scale``), and an input quantizer becomes a
   ``QuantizeLinear``/``DequantizeLinear`` pair on the layer's input (uint8 when ``qmin == 0``, else int8).

Weight storage, one fixed rule whatever CPU exports or runs the model: a layer whose codes all lie in
``[-64, 63]`` (every layer of 7 bits or fewer, and 8-bit layers that do not use the full range) stores int8
codes; any other layer stores uint8 codes ``q + 128`` with zero point ``-Z + 128``, which dequantize to the
same float weights exactly. The reason: onnxruntime runs u8 activations x s8 weights (QLinearConv, QGemm,
MatMulInteger after its QDQ fusion) on x86 CPUs without AVX-512 VNNI with ``vpmaddubsw``, which adds pairs
of u8*s8 products into a *saturating* int16: ``2 * 255 * 127 = 64770 > 32767``. With 7-bit codes a pair is at
most ``2 * 255 * 64 = 32640`` and cannot saturate; u8 x u8 runs on a kernel that widens to int16 before
multiplying and cannot saturate either. Full-range int8 weights gave 25 % top-1 agreement (SQNR 8.9 dB)
with the simulation on an AVX2 CPU for a small W8A8 CNN, uint8 ones 100 % (98 dB), with the same integer
kernels. The alternatives were rejected: 7-bit weights for every layer (onnxruntime's ``reduce_range``)
change the quantized model; uint8 for every layer would move 4- to 7-bit layers off the faster u8 x s8
kernels (VNNI's ``vpdpbusd``) for no gain; choosing by the exporting CPU gives graphs that break on another.
The result's ``weight_dtypes`` says which storage each layer got.

The activation pair goes before a zero ``Pad`` that feeds only the conv (TF-"same" convs pad in their
forward): that is where the PyTorch layer quantizes, and padding with zero commutes with quantization since
zero is on the grid. Codes of fewer than 8 bits are stored on their own grid and activations of fewer
than 8 bits get a ``Clip`` to their range before the 8-bit quantizer: the low bit width is simulated, the
arithmetic is 8-bit.

onnxruntime's graph optimizer fuses ``DQ -> Conv -> (Relu/Clip) -> Q`` into ``QLinearConv`` and
``DQ -> Gemm`` with an int32 bias into ``QGemm``: the integer kernels counted in the result. A conv whose
output is not quantized next (it feeds a residual ``Add``, the model output...) keeps a float Conv on its
dequantized weight, as in the PyTorch simulation. Grids DequantizeLinear (opset < 21) cannot express
directly, per-group grids and zero points outside int8, are dequantized as rows (one scale per row, an
``Add`` of ``Z/S`` when needed) and reshaped: exact, but the layer runs in float.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from postquant.choices import Granularity, GridKind
from postquant.errors import OnnxMismatchError, OutputError, UnsupportedModelError
from postquant.eval.run import move_batch
from postquant.model import quantized_layers, set_module
from postquant.model.hf import no_kv_cache
from postquant.nn import QuantizedLayer
from postquant.nn.layer import HALF, upcast_half
from postquant.progress import progress_bar
from postquant.store.files import atomic_path

__all__ = ["count_kernels", "export_onnx", "float_twin", "verify_onnx"]

log = logging.getLogger(__name__)

INTEGER_OPS = frozenset(
    {"QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
)
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})
MIN_SQNR_DB = 20.0  # verify_onnx's default floors: below them the graph computes another function
MIN_TOP1_AGREEMENT = 90.0
INT8_SAFE_CODES = (-64, 63)  # int8 weight codes u8 x s8 kernels cannot saturate on (see the module docstring)
UINT8_SHIFT = 128  # uint8 storage: codes q + 128, zero point -Z + 128


@dataclass
class _WeightQDQ:
    """8-bit codes on the layer's own grid and the ``DequantizeLinear`` that gives back ``(q + Z) / S``.

    The codes are int8 when they lie in `INT8_SAFE_CODES`, else uint8 ``q + 128`` (zero point ``-Z + 128``).
    The direct form (``shape`` None) dequantizes the weight tensor itself, per output channel (axis 0) or per
    tensor: onnxruntime fuses it into integer kernels. Grids it cannot express go through rows: the codes as
    (G, n), one scale per row, an ``Add`` of ``Z/S`` when ``-Z`` does not fit int8, then a ``Reshape``.
    """

    codes: np.ndarray  # int8 or uint8: the weight's shape, or (G, n) rows
    scale: np.ndarray  # float32: (OC,) per channel, () per tensor, (G,) rows
    zero_point: np.ndarray | None  # the codes' dtype, like `scale`; None: 0, and `offset` instead
    offset: np.ndarray | None  # float32 (G, 1): Z/S, added after dequantizing rows
    shape: tuple[int, ...] | None  # the weight's shape when dequantized as rows
    why_float: str = ""  # why onnxruntime cannot run the layer with integer kernels

    @property
    def dtype(self) -> str:
        """``"int8"`` or ``"uint8"``: how the codes are stored."""
        return str(self.codes.dtype)


def _as_uint8(w: _WeightQDQ) -> _WeightQDQ:
    """The same weight with uint8 codes ``q + 128`` and zero point ``zp + 128`` (``(q - zp) * scale`` unchanged)."""
    zp = np.zeros(w.scale.shape, np.int16) if w.zero_point is None else w.zero_point.astype(np.int16)
    return _WeightQDQ(
        codes=(w.codes.astype(np.int16) + UINT8_SHIFT).astype(np.uint8),
        scale=w.scale,
        zero_point=(zp + UINT8_SHIFT).astype(np.uint8),
        offset=w.offset,
        shape=w.shape,
        why_float=w.why_float,
    )


def _fits_int8_safely(codes: torch.Tensor) -> bool:
    lo, hi = INT8_SAFE_CODES
    return codes.numel() == 0 or (int(codes.min()) >= lo and int(codes.max()) <= hi)


@dataclass
class _ActQDQ:
    scale: np.ndarray  # float32 ()
    zero_point: np.ndarray  # uint8 or int8 ()
    clip: tuple[float, float] | None  # the float range of a < 8-bit quantizer


@dataclass
class _LayerQDQ:
    name: str
    weight: _WeightQDQ
    act: _ActQDQ | None


# ----------------------------------------------------------------------------------- per-layer parameters


def _weight_qdq(name: str, layer: QuantizedLayer) -> _WeightQDQ:
    """ONNX parameters for a layer's codes: ``w_hat = (q + Z)/S = (q - zp) * scale``, ``scale = 1/S``, ``zp = -Z``.

    Stored as int8 when every code lies in `INT8_SAFE_CODES`, else as uint8 (`_as_uint8`).
    """
    w = _int8_weight_qdq(name, layer)
    return w if _fits_int8_safely(layer.codes) else _as_uint8(w)


def _int8_weight_qdq(name: str, layer: QuantizedLayer) -> _WeightQDQ:
    """`_weight_qdq` with int8 codes, whatever their range."""
    config = layer.grid_config
    if config.kind is not GridKind.UNIFORM:
        raise UnsupportedModelError(
            f"layer {name!r}: grid kind {config.kind.value!r} has no ONNX QDQ form (DequantizeLinear is affine: "
            "(q - zero_point) * scale, a power grid is not); quantize with the recipe field grid: uniform "
            "(CLI --grid uniform) for ONNX, exclude the layer with ignore=[...], or save it with "
            "postquant.io.save instead"
        )
    inv_scale = layer.grid_inv_scale.detach().reshape(-1).double()  # (G,) S
    z = layer.grid_zero_point.detach().reshape(-1).double()  # (G,) Z
    codes = layer.codes.detach().to(torch.int8)  # weight shape
    scale = (1.0 / inv_scale).float()  # (G,)
    fits = bool(torch.equal(z, z.round()) and (-z).min() >= -128 and (-z).max() <= 127)
    why = []
    if config.granularity is Granularity.GROUP:
        why.append(f"per-group grid (group_size {config.group_size}): dequantized per group, then reshaped")
    if not fits:
        why.append(
            f"zero point -Z in [{-z.max():.0f}, {-z.min():.0f}] does not fit int8 (channels whose weights all "
            "have one sign): dequantized with zero point 0, then Z/S added; symmetric=True avoids it"
        )
    if not why:
        per_tensor = config.granularity is Granularity.TENSOR
        zp = (-z).to(torch.int8)
        return _WeightQDQ(
            codes.numpy(),
            scale.numpy().reshape(() if per_tensor else -1),
            zp.numpy().reshape(() if per_tensor else -1),
            None,
            None,
        )
    rows = codes.reshape(z.numel(), -1)  # (G, n)
    return _WeightQDQ(
        codes=rows.numpy(),
        scale=scale.numpy(),
        zero_point=(-z).to(torch.int8).numpy() if fits else None,
        offset=None if fits else (z / inv_scale).float().reshape(-1, 1).numpy(),
        shape=tuple(codes.shape),
        why_float="; ".join(why),
    )


def _act_qdq(layer: QuantizedLayer) -> _ActQDQ | None:
    act = layer.act_quant
    if act is None:
        return None
    scale = float(act.scale)
    zp = int(act.zero_point)
    dtype = np.uint8 if act.qmin == 0 else np.int8
    clip = None
    # an 8-bit QuantizeLinear saturates at 0/255 or -128/127: clip to the narrower range first
    if act.bits < 8:
        clip = ((act.qmin - zp) * scale, (act.qmax - zp) * scale)
    return _ActQDQ(np.array(scale, dtype=np.float32), np.array(zp, dtype=dtype), clip)


def _plan(qmodel: nn.Module) -> dict[str, _LayerQDQ]:
    plans = {}
    for name, layer in quantized_layers(qmodel).items():
        weight = _weight_qdq(name, layer)
        plans[name] = _LayerQDQ(name, weight, _act_qdq(layer))
        if weight.why_float:
            log.warning("layer %s runs in float in onnxruntime: %s", name, weight.why_float)
        if layer.bits < 8:
            log.info(
                "layer %s: W%d codes stored as %s on their own grid (simulated low-bit)",
                name,
                layer.bits,
                weight.dtype,
            )
        act = layer.act_quant
        if act is not None and act.bits < 8:
            log.info("layer %s: A%d input as an 8-bit QDQ after a Clip (simulated low-bit)", name, act.bits)
    wide = [n for n, p in plans.items() if p.weight.dtype == "uint8"]
    if wide:
        log.info(
            "%d of %d layers store uint8 weights (codes q + 128): they use codes outside [%d, %d], on which "
            "onnxruntime's u8 x s8 kernels can saturate on x86 CPUs without VNNI",
            len(wide),
            len(plans),
            *INT8_SAFE_CODES,
        )
        log.debug("layers with uint8 weights: %s", ", ".join(wide))
    asymmetric = [
        n for n, p in plans.items() if p.weight.zero_point is not None and p.weight.zero_point.any()
    ]
    if asymmetric:
        log.info(
            "%d layers have weight zero points other than 0: onnxruntime's integer convolutions are several times "
            "slower with them than with symmetric weights (quantize with symmetric=True for deployment)",
            len(asymmetric),
        )
    return plans


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

    Input quantizers are dropped; `export_onnx` puts them back as QDQ nodes. Linears (whose forward is
    ``nn.Linear``'s) take their input as a matrix (`_MatrixLinear`).
    """
    twin = copy.deepcopy(qmodel).eval()
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


def _first_tensor(out: Any) -> torch.Tensor:
    """The first output: the tensor itself, or the first tensor of a tuple, dict or ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, tuple | list) else []
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None:
        raise UnsupportedModelError(f"the model returns {type(out).__name__} without a tensor to compare")
    return first


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


def _initializer(name: str, array: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.require(array, requirements="C"), name)  # keeps 0-d scalars 0-d


def _quantize_weight(graph: Any, name: str, wname: str, w: _WeightQDQ) -> list[Any]:
    """Replace initializer `wname` by 8-bit codes + DequantizeLinear (+ Add, Reshape) writing the same name."""
    from onnx import helper

    old = next(i for i in graph.initializer if i.name == wname)
    graph.initializer.remove(old)
    codes, scale, zp = f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"
    graph.initializer.extend([_initializer(codes, w.codes), _initializer(scale, w.scale)])
    inputs = [codes, scale]
    if w.zero_point is not None:
        graph.initializer.append(_initializer(zp, w.zero_point))
        inputs.append(zp)
    axis = {} if w.scale.ndim == 0 else {"axis": 0}
    if w.shape is None:
        return [helper.make_node("DequantizeLinear", inputs, [wname], name=f"{name}/weight_dq", **axis)]
    nodes = [
        helper.make_node(
            "DequantizeLinear", inputs, [f"{name}/weight_rows"], name=f"{name}/weight_dq", **axis
        )
    ]
    rows = f"{name}/weight_rows"
    if w.offset is not None:
        graph.initializer.append(_initializer(f"{name}.weight_offset", w.offset))
        nodes.append(
            helper.make_node(
                "Add",
                [rows, f"{name}.weight_offset"],
                [f"{name}/weight_shifted"],
                name=f"{name}/weight_offset",
            )
        )
        rows = f"{name}/weight_shifted"
    graph.initializer.append(_initializer(f"{name}.weight_shape", np.array(w.shape, dtype=np.int64)))
    nodes.append(
        helper.make_node("Reshape", [rows, f"{name}.weight_shape"], [wname], name=f"{name}/weight_reshape")
    )
    return nodes


def _constant(graph: Any, tensor: str) -> np.ndarray | None:
    """The value of `tensor` when it is an initializer or a Constant node's output, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == tensor:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == tensor:
            value = [a for a in node.attribute if a.name == "value"]
            return numpy_helper.to_array(value[0].t) if value else None
    return None


def _commutes_with_qdq(graph: Any, node: Any) -> bool:
    """Whether `node` is a Pad that copies input values or pads with 0 (0 is on every activation grid)."""
    if node.op_type != "Pad":
        return False
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    if mode != "constant":
        return True
    if len(node.input) < 3 or not node.input[2]:
        return True
    value = _constant(graph, node.input[2])
    return value is not None and value.size == 1 and float(value.reshape(())) == 0.0


def _input_site(graph: Any, node: Any) -> Any:
    """The node whose input 0 is the layer's input: `node`, or a zero Pad feeding only it (TF-"same" convs).

    Quantizing before the padding is what the PyTorch layer does, and it lets onnxruntime fuse the producer
    with the QuantizeLinear (``Conv -> Clip -> Q``) and the padding into the quantized conv.
    """
    while True:
        producers = [n for n in graph.node if node.input[0] in n.output]
        users = [n for n in graph.node if node.input[0] in n.input]
        if len(producers) != 1 or len(users) != 1 or not _commutes_with_qdq(graph, producers[0]):
            return node
        node = producers[0]


def _quantize_input(graph: Any, name: str, node: Any, act: _ActQDQ) -> list[Any]:
    """Q/DQ (after a Clip for < 8 bits) on input 0 of `node`; returns the new nodes, to go before it."""
    from onnx import helper

    x = node.input[0]
    nodes = []
    graph.initializer.extend(
        [
            _initializer(f"{name}.input_scale", act.scale),
            _initializer(f"{name}.input_zero_point", act.zero_point),
        ]
    )
    if act.clip is not None:
        graph.initializer.extend(
            [
                _initializer(f"{name}.input_min", np.array(act.clip[0], np.float32)),
                _initializer(f"{name}.input_max", np.array(act.clip[1], np.float32)),
            ]
        )
        nodes.append(
            helper.make_node(
                "Clip",
                [x, f"{name}.input_min", f"{name}.input_max"],
                [f"{name}/input_clipped"],
                name=f"{name}/input_clip",
            )
        )
        x = f"{name}/input_clipped"
    qdq = [f"{name}.input_scale", f"{name}.input_zero_point"]
    nodes += [
        helper.make_node("QuantizeLinear", [x, *qdq], [f"{name}/input_q"], name=f"{name}/input_q"),
        helper.make_node(
            "DequantizeLinear", [f"{name}/input_q", *qdq], [f"{name}/input_dq"], name=f"{name}/input_dq"
        ),
    ]
    node.input[0] = f"{name}/input_dq"
    return nodes


def _quantize_gemm_bias(graph: Any, name: str, node: Any, w: _WeightQDQ, act: _ActQDQ) -> list[Any]:
    """An int32 bias on the scale ``input_scale * weight_scale`` (what ORT needs to fuse Gemm into QGemm).

    onnxruntime quantizes a Conv's float bias itself when it fuses the Conv; for Gemm it does not.
    """
    from onnx import helper, numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return []
    found = [i for i in graph.initializer if i.name == node.input[2]]
    if not found:
        return []
    bias = numpy_helper.to_array(found[0]).astype(np.float64)
    scale = (np.float64(act.scale) * w.scale.astype(np.float64)) * np.ones_like(bias)  # (OC,)
    q = np.round(bias / scale)
    if not np.all(np.isfinite(q)) or np.abs(q).max(initial=0) >= 2**31 - 1:
        log.debug("layer %s: bias does not fit int32 on the input*weight scale; kept float", name)
        return []
    graph.initializer.extend(
        [
            _initializer(f"{name}.bias_quantized", q.astype(np.int32)),
            _initializer(f"{name}.bias_scale", scale.astype(np.float32)),
        ]
    )
    node.input[2] = f"{name}/bias_dq"
    if not any(found[0].name in other.input for other in graph.node):
        graph.initializer.remove(found[0])  # the float bias is not needed any more
    return [
        helper.make_node(
            "DequantizeLinear",
            [f"{name}.bias_quantized", f"{name}.bias_scale"],
            [f"{name}/bias_dq"],
            name=f"{name}/bias_dq",
            axis=0,
        )
    ]


def _weight_consumers(graph: Any, wname: str) -> tuple[list[Any], str]:
    """The Conv/Gemm nodes that take initializer `wname` as their weight: one per call of the layer (a module
    called twice, e.g. a layer shared across depth, is two nodes on one weight). Empty, with the reason, when
    the weight is not an initializer or feeds anything else."""
    users = [n for n in graph.node if wname in n.input]
    if not any(i.name == wname for i in graph.initializer):
        return [], "the exporter did not keep its weight as an initializer"
    if not users or any(n.op_type not in ("Conv", "Gemm") or list(n.input).index(wname) != 1 for n in users):
        return [], f"its weight feeds {[n.op_type for n in users]}, not Conv or Gemm nodes only"
    for node in users:
        attrs = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
        if node.op_type == "Gemm" and (attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0):
            return [], "its Gemm does not take the weight as (out, in) with transB=1"
    return users, ""


def _separate_equal_weights(graph: Any, weights: set[str]) -> None:
    """Give back their own initializer to layer weights that the exporter merged into another one.

    The exporter stores equal initializers once and turns the others into ``Identity`` nodes (tied weights, or
    two layers whose dequantized weights are equal); each layer needs its own initializer for its own codes.
    """
    inits = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] in weights and node.input[0] in inits:
            copy_ = type(inits[node.input[0]])()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            graph.initializer.append(copy_)
            graph.node.remove(node)


def _drop_zero_gemm_biases(graph: Any) -> None:
    """Remove all-zero bias inputs of Gemm nodes (`_MatrixLinear` gives bias-free Linears one to export as Gemm)."""
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2]:
            value = _constant(graph, node.input[2])
            if value is not None and not np.any(value):
                bias = node.input[2]
                del node.input[2]
                unused = not any(bias in other.input for other in graph.node)
                for init in [i for i in graph.initializer if i.name == bias and unused]:
                    graph.initializer.remove(init)


def _rewrite(model: Any, plans: dict[str, _LayerQDQ]) -> None:
    """Insert the QDQ nodes of every planned layer into `model` (in place).

    The weight is dequantized once; a layer called several times gets its input quantizer before every call
    (the same scale: the PyTorch layer has one quantizer for all its calls).
    """
    graph = model.graph
    _separate_equal_weights(graph, {f"{name}.weight" for name in plans})
    before: dict[str, list[Any]] = {}  # first output of a node -> nodes to insert before it
    weight_nodes: list[Any] = []
    for name, plan in plans.items():
        nodes, why = _weight_consumers(graph, f"{name}.weight")
        if not nodes:
            raise UnsupportedModelError(f"layer {name!r} cannot be located in the exported graph: {why}")
        weight_nodes += _quantize_weight(graph, name, f"{name}.weight", plan.weight)
        for k, node in enumerate(nodes):
            call = name if k == 0 else f"{name}.call{k}"  # unique tensor and node names per call
            if plan.act is not None:
                site = _input_site(graph, node)
                before.setdefault(site.output[0], []).extend(_quantize_input(graph, call, site, plan.act))
            if plan.act is not None and node.op_type == "Gemm" and plan.weight.shape is None:
                weight_nodes += _quantize_gemm_bias(graph, call, node, plan.weight, plan.act)
    nodes = list(weight_nodes)
    for node in graph.node:
        nodes += [*before.get(node.output[0], []), node]
    del graph.node[:]
    graph.node.extend(nodes)


# ---------------------------------------------------------------------------------- onnxruntime checks


def _session(path: Path, optimized_path: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:  # the extended level keeps the model portable (no NCHWc layouts)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def count_kernels(path: str | Path) -> dict[str, Any]:
    """Op counts of the model after onnxruntime's graph optimizations (what actually runs).

    Returns:
        ``integer_kernels`` (QLinear*, QGemm, MatMulInteger, ConvInteger... nodes), ``float_kernels`` (Conv,
        Gemm, MatMul and their fused forms that still run in float) and ``ops`` (every op type's count).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        _session(Path(path), optimized)
        ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
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
    from postquant.eval.metrics import sqnr_from_sums
    from postquant.eval.run import eval_mode

    session = _session(Path(path))
    names = [i.name for i in session.get_inputs()]
    signal = noise = max_abs = 0.0
    agree = samples = 0
    two_d = True
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in progress_bar(batches, total=total, desc="verify onnx", unit="batch", enabled=progress):
        inputs = _model_inputs(batch, len(names))
        with torch.inference_mode(), eval_mode(qmodel):
            ref = qmodel(**inputs) if isinstance(inputs, Mapping) else qmodel(*inputs)
        ref = _first_tensor(ref).double().numpy()
        if isinstance(inputs, Mapping):  # the exporter drops keyword inputs the graph does not use
            feed = {n: upcast_half(inputs[n]).numpy() for n in names}
        else:
            feed = {n: upcast_half(t).numpy() for n, t in zip(names, inputs, strict=True)}
        out = session.run(None, feed)[0].astype(np.float64)
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


def _exported(tmp: Path, path: Path, opset: int, plans: dict[str, _LayerQDQ]) -> dict[str, Any]:
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

    Returns:
        ``path``, ``bytes``, ``opset``, ``int8_weight_layers`` (layers with 8-bit integer codes, int8 or
        uint8), ``uint8_weight_layers`` (how many of them store uint8 codes: codes outside [-64, 63], see the
        module docstring), ``weight_dtypes`` ({layer: "int8" or "uint8"}), ``float_compute_layers`` ({layer:
        why onnxruntime cannot give it integer kernels}), the `count_kernels` entries ``integer_kernels``,
        ``float_kernels``, ``ops``, and ``top1_agreement``, ``max_abs_diff``, ``sqnr_db``, ``n`` (None without
        `verify_batches`).

    Raises:
        UnsupportedModelError: a layer QDQ cannot express (the message names it), or the exporter failed.
        OutputError: `path` cannot be written.
        OnnxMismatchError: onnxruntime disagrees with the simulation on `verify_batches` (nothing is written
            at `path`; the graph is kept beside it as ``<stem>.rejected.onnx``,
            for inspection).
    """
    import onnx

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
    plans = _plan(qmodel)
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
    _drop_zero_gemm_biases(model.graph)
    _rewrite(model, plans)
    onnx.checker.check_model(model)
    steps.update()
    steps.set_postfix_str("save")
    with ExitStack() as written:  # beside `path`, renamed into place once verified: never a half-written or
        try:  # unverified file at `path`
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = written.enter_context(atomic_path(path))
        except OSError as exc:
            raise OutputError(f"cannot write the ONNX model to {path}: {exc.strerror or exc}") from exc
        try:
            onnx.save(model, str(tmp))
        except OSError as exc:
            raise OutputError(f"cannot write the ONNX model to {path}: {exc.strerror or exc}") from exc
        steps.update()
        steps.set_postfix_str("count kernels")  # an onnxruntime session: its graph optimisation takes a while
        result = _exported(tmp, path, opset, plans)
        steps.update()
        steps.close()
        if verify_batches is not None:
            try:
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
            except OnnxMismatchError as exc:
                rejected = path.with_name(f"{path.stem}.rejected{path.suffix}")
                os.replace(tmp, rejected)
                raise OnnxMismatchError(
                    f"{exc} Nothing was written to {path}; the rejected graph is kept at {rejected} for inspection.",
                    exc.metrics,
                ) from None
            log.info(
                "onnxruntime vs PyTorch on %d samples: top-1 agreement %.2f %%, max |diff| %.3g, SQNR %.1f dB",
                result["n"],
                result["top1_agreement"],
                result["max_abs_diff"],
                result["sqnr_db"],
            )
    return result
