"""Graph surgery: the QDQ nodes of every quantized layer inserted into the exported float graph.

Per quantized layer the weight initializer ``<name>.weight`` (feeding one Conv or Gemm node per call) becomes
int8/uint8 codes (or int4 ones, opset 21, with ``block_size`` for groups) plus a ``DequantizeLinear``
(`postquant.io.onnx.params`), and an input quantizer becomes a
``QuantizeLinear``/``DequantizeLinear`` pair on the layer's input (after a ``Clip`` below 8 bits).

The activation pair goes before a zero ``Pad`` that feeds only the conv (TF-"same" convs pad in their
forward): that is where the PyTorch layer quantizes, and padding with zero commutes with quantization since
zero is on the grid.

onnxruntime's graph optimizer fuses ``DQ -> Conv -> (Relu/Clip) -> Q`` into ``QLinearConv`` and
``DQ -> Gemm`` with an int32 bias into ``QGemm``: the integer kernels counted in the export result. A conv
whose output is not quantized next (it feeds a residual ``Add``, the model output...) keeps a float Conv on
its dequantized weight, as in the PyTorch simulation, unless `postquant.io.onnx.integer` quantizes that
output too (``export_onnx(full_integer=True)``).

A quantized embedding table's initializer ``<name>.weight`` (input 0 of the graph's ``Gather`` nodes) becomes
codes plus a ``DequantizeLinear`` in the same way: the lookup gathers rows of the dequantized table.

onnx is imported inside the functions: it is an optional dependency (``postquant[onnx]``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from postquant.errors import UnsupportedModelError
from postquant.io.onnx.params import ActQDQ, LayerQDQ, WeightQDQ

__all__ = ["drop_zero_gemm_biases", "rewrite"]

log = logging.getLogger(__name__)


def _initializer(name: str, array: np.ndarray, *, int4: bool = False) -> Any:
    """An ONNX tensor of `array`; with `int4`, integer values in [-8, 7] stored as INT4 (two to a byte)."""
    import ml_dtypes  # a dependency of onnx
    from onnx import numpy_helper  # optional dependency (extra: onnx)

    array = np.require(array, requirements="C")
    if int4:
        array = array.astype(ml_dtypes.int4)
    return numpy_helper.from_array(array, name)  # keeps 0-d scalars 0-d


def _quantize_weight(graph: Any, name: str, wname: str, w: WeightQDQ) -> list[Any]:
    """Replace initializer `wname` by codes + DequantizeLinear (+ Add, Reshape) writing the same name."""
    from onnx import helper  # optional dependency (extra: onnx)

    old = next(i for i in graph.initializer if i.name == wname)
    graph.initializer.remove(old)
    codes, scale, zp = f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"
    graph.initializer.extend([_initializer(codes, w.codes, int4=w.int4), _initializer(scale, w.scale)])
    inputs = [codes, scale]
    if w.zero_point is not None:
        graph.initializer.append(_initializer(zp, w.zero_point, int4=w.int4))
        inputs.append(zp)
    axis: dict[str, int] = {} if w.axis is None else {"axis": w.axis}
    if w.block_size:
        axis["block_size"] = w.block_size
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
    from onnx import numpy_helper  # optional dependency (extra: onnx)

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


def _quantize_input(graph: Any, name: str, node: Any, act: ActQDQ) -> list[Any]:
    """Q/DQ (after a Clip for < 8 bits) on input 0 of `node`; returns the new nodes, to go before it."""
    from onnx import helper  # optional dependency (extra: onnx)

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


def _quantize_gemm_bias(graph: Any, name: str, node: Any, w: WeightQDQ, act: ActQDQ) -> list[Any]:
    """An int32 bias on the scale ``input_scale * weight_scale`` (what ORT needs to fuse Gemm into QGemm).

    onnxruntime quantizes a Conv's float bias itself when it fuses the Conv; for Gemm it does not.
    """
    from onnx import helper, numpy_helper  # optional dependency (extra: onnx)

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


def _table_consumers(graph: Any, wname: str) -> tuple[list[Any], str]:
    """The Gather nodes (axis 0) that look up rows of initializer `wname`, or none with the reason."""
    users = [n for n in graph.node if wname in n.input]
    if not any(i.name == wname for i in graph.initializer):
        return [], "the exporter did not keep its table as an initializer"
    for node in users:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or list(node.input).index(wname) != 0 or axis != 0:
            return [], f"its table feeds {node.op_type} {node.name!r}, not the rows of a Gather (axis 0)"
    if not users:
        return [], "no node reads its table"
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


def drop_zero_gemm_biases(graph: Any) -> None:
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


def rewrite(model: Any, plans: dict[str, LayerQDQ], tables: dict[str, WeightQDQ] | None = None) -> None:
    """Insert the QDQ nodes of every planned layer and quantized embedding table into `model` (in place).

    The weight is dequantized once; a layer called several times gets its input quantizer before every call
    (the same scale: the PyTorch layer has one quantizer for all its calls). `tables`: the embedding tables'
    parameters (`postquant.io.onnx.params.plan_embeddings`), each dequantized once for all its lookups.
    """
    graph = model.graph
    tables = tables or {}
    _separate_equal_weights(graph, {f"{name}.weight" for name in [*plans, *tables]})
    before: dict[str, list[Any]] = {}  # first output of a node -> nodes to insert before it
    weight_nodes: list[Any] = []
    for name, table in tables.items():
        found, why = _table_consumers(graph, f"{name}.weight")
        if not found:
            raise UnsupportedModelError(f"embedding {name!r} cannot be located in the exported graph: {why}")
        weight_nodes += _quantize_weight(graph, name, f"{name}.weight", table)
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
            direct = plan.weight.shape is None and not plan.weight.block_size  # one scale per channel
            if plan.act is not None and node.op_type == "Gemm" and direct:
                weight_nodes += _quantize_gemm_bias(graph, call, node, plan.weight, plan.act)
    nodes = list(weight_nodes)
    for node in graph.node:
        nodes += [*before.get(node.output[0], []), node]
    del graph.node[:]
    graph.node.extend(nodes)
