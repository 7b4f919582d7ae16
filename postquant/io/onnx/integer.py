"""Full-integer graphs: quantized tensors between quantized ops, so that onnxruntime chains integer kernels.

The QDQ graph of `postquant.io.onnx.rewrite` quantizes what the PyTorch simulation quantizes: the inputs of
quantized layers. A conv whose output feeds a residual ``Add`` then runs in float, and every ``Add``,
``GlobalAveragePool`` and layout change between integer kernels runs in float, with NHWC <-> NCHW transposes
around each integer kernel. `integerize` adds the QuantizeLinear/DequantizeLinear pairs that let onnxruntime's
graph optimizer fuse ``DQ -> Add -> Q`` into ``QLinearAdd``, ``DQ -> GlobalAveragePool -> Q`` into
``QLinearGlobalAveragePool``, and keep whole chains of QLinearConv/QLinearAdd in integers (and in NHWC).
The adds joined are a CNN's residual adds (one input computed by a convolution); other adds stay float:

* an input of an ``Add`` or ``GlobalAveragePool`` that the simulation quantizes already (a tensor that also
  feeds a layer's input quantizer, e.g. a residual block's input) is taken from that quantizer's
  ``DequantizeLinear``: the simulation's range, but the residual branch now carries the quantized value
  where the simulation adds the float one;
* a tensor reached from a quantized one through ops that only move or select values (``Slice``, zero
  ``Pad``, ``Flatten``, ``Reshape``, ``Transpose``, ``MaxPool``...) gets a pair with the same scale and zero
  point: exact;
* any other input or output (a conv's output before the residual ``Add``, the feature map before global
  pooling) gets a new pair whose range is the min/max of the tensor over calibration batches, computed by
  running the QDQ graph (the simulation's function) in onnxruntime; ``act_qparams`` turns it into a scale
  and zero point as for the simulation's own quantizers. A model quantized with integer residuals (recipe
  ``a_residual``) has these points itself: `postquant.io.onnx.points.ModelPoints` gives their scales and
  zero points instead, and the graph computes the simulated function;
* the output of an ``Add`` (after a following ``Relu``/``Clip``) takes the quantizer of the layer it feeds
  when there is one (exact), else a calibrated one.

All activations are stored as uint8 (an int8 grid ``q`` with zero point ``z`` is the uint8 grid ``q + 128``
with zero point ``z + 128``: the same values): onnxruntime's ``QLinearAdd`` needs both inputs and its output
in one type. The added pairs are quantization points the simulation does not have: each rounds a tensor to
8 bits, so the graph is the simulated model plus that rounding, and its agreement with the simulation is
measured, not assumed (`postquant.io.onnx.verify`).

onnx and onnxruntime are imported inside the functions: optional dependencies (``postquant[onnx]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from postquant.nn.act import act_qparams

__all__ = [
    "MOVEMENT_OPS",
    "Ranges",
    "calibration_targets",
    "integerize",
    "tensor_ranges",
    "unsigned_activations",
]

log = logging.getLogger(__name__)

MOVEMENT_OPS = frozenset(
    {"Slice", "Pad", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity"}
)
_ACTIVATIONS = frozenset({"Relu", "Clip"})


def _initializer(name: str, array: np.ndarray) -> Any:
    from onnx import numpy_helper  # optional dependency (extra: onnx)

    return numpy_helper.from_array(np.require(array, requirements="C"), name)


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper  # optional dependency (extra: onnx)

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = [a for a in node.attribute if a.name == "value"]
            if value:
                values[node.output[0]] = numpy_helper.to_array(value[0].t)
    return values


def unsigned_activations(graph: Any) -> int:
    """Store every int8 activation QuantizeLinear/DequantizeLinear pair as uint8 (codes + 128, the same
    values); weights (constant inputs) keep their storage. Returns how many zero points changed."""
    from onnx import numpy_helper  # optional dependency (extra: onnx)

    values = {i.name: i for i in graph.initializer}
    changed = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in values:
            continue  # a weight or a bias
        zp = values.get(node.input[2])
        if zp is None or zp.name in changed or zp.data_type != 3:  # 3: INT8
            continue
        z = numpy_helper.to_array(zp).astype(np.int16) + 128
        zp.CopyFrom(_initializer(zp.name, z.astype(np.uint8)))
        changed.add(zp.name)
    return len(changed)


class _Graph:
    """Producer/consumer look-ups of a graph that changes as pairs are inserted."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.constants = _constants(graph)
        self.outputs = {o.name for o in graph.output}
        self.new_nodes: dict[str, list[Any]] = {}  # tensor -> nodes to insert right after its producer
        self.count = 0  # names made unique
        self.pairs = 0  # Q/DQ pairs added
        self.calibrated = 0  # new quantizers with a calibrated range

    def producer(self, tensor: str) -> Any | None:
        return next((n for n in self._nodes() if tensor in n.output), None)

    def consumers(self, tensor: str) -> list[Any]:
        return [n for n in self._nodes() if tensor in n.input]

    def _nodes(self) -> list[Any]:
        return [*self.graph.node, *(n for nodes in self.new_nodes.values() for n in nodes)]

    def dq_of(self, tensor: str) -> tuple[str, str, str] | None:
        """(DQ output, scale, zero point) of a QuantizeLinear on `tensor` followed by a DequantizeLinear."""
        for q in self.consumers(tensor):
            if q.op_type != "QuantizeLinear" or q.input[0] != tensor or len(q.input) < 3:
                continue
            for dq in self.consumers(q.output[0]):
                if dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == list(q.input[1:]):
                    return dq.output[0], q.input[1], q.input[2]
        return None

    def add_pair(self, tensor: str, scale: str, zero_point: str) -> str:
        """A new Q/DQ pair on `tensor` (inserted after its producer); returns the DQ output."""
        from onnx import helper  # optional dependency (extra: onnx)

        self.count += 1
        self.pairs += 1
        base = f"{tensor}/int{self.count}"
        nodes = [
            helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [f"{base}_q"], name=f"{base}_q"),
            helper.make_node(
                "DequantizeLinear", [f"{base}_q", scale, zero_point], [f"{base}_dq"], name=f"{base}_dq"
            ),
        ]
        self.new_nodes.setdefault(tensor, []).extend(nodes)
        return f"{base}_dq"

    def new_params(self, tensor: str, scale: float, zero_point: int) -> tuple[str, str]:
        """Initializers of a new 8-bit uint8 quantizer (`scale`, uint8 `zero_point`) for `tensor`."""
        self.count += 1
        self.calibrated += 1
        names = f"{tensor}/int{self.count}_scale", f"{tensor}/int{self.count}_zero_point"
        self.graph.initializer.extend(
            [
                _initializer(names[0], np.array(scale, np.float32)),
                _initializer(names[1], np.array(zero_point, np.uint8)),
            ]
        )
        return names

    def is_zero_pad(self, node: Any) -> bool:
        if node.op_type != "Pad":
            return True
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        if mode != "constant" or len(node.input) < 3 or not node.input[2]:
            return True
        value = self.constants.get(node.input[2])
        return value is not None and value.size == 1 and float(value.reshape(())) == 0.0

    def finish(self) -> None:
        """Insert the new nodes (after their producers) and sort the graph topologically, keeping the
        order of nodes that do not depend on each other (a rewired input may come from a later pair)."""
        nodes = list(self.graph.node)
        for node in self.graph.node:
            for out in node.output:
                nodes += self.new_nodes.get(out, [])
        produced = {t for m in self.graph.node for t in m.output}
        nodes += [n for t, ns in self.new_nodes.items() if t not in produced for n in ns]
        made = {t for n in nodes for t in n.output}
        ready = {i.name for i in self.graph.input} | {i.name for i in self.graph.initializer} | {""}
        ordered: list[Any] = []
        while nodes:
            left = []
            for node in nodes:
                if all(x in ready or x not in made for x in node.input):
                    ordered.append(node)
                    ready.update(node.output)
                else:
                    left.append(node)
            if len(left) == len(nodes):
                raise AssertionError(
                    f"full-integer rewrite made a cycle through {[n.name for n in left[:3]]}"
                )
            nodes = left
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self.new_nodes = {}


class Ranges:
    """The quantizers of new points from calibrated float ranges: `act_qparams`'s 8-bit rule."""

    def __init__(self, ranges: dict[str, tuple[float, float]]) -> None:
        self.ranges = ranges

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.ranges

    def params(self, tensor: str) -> tuple[float, int]:
        """(scale, uint8 zero point) of the new quantizer of `tensor`."""
        scale, zp, qmin, _ = act_qparams(*self.ranges[tensor], 8)
        return scale, zp - qmin  # an int8 grid as uint8: + 128


def _after_activation(g: _Graph, tensor: str) -> str:
    """`tensor`, or the output of the Relu/Clip that is its only consumer (the tensor to quantize)."""
    users = g.consumers(tensor)
    if len(users) == 1 and users[0].op_type in _ACTIVATIONS and tensor not in g.outputs:
        return users[0].output[0]
    return tensor


def _quantized(g: _Graph, tensor: str, ranges: Ranges) -> str | None:
    """A DQ output that carries `tensor` quantized (an existing pair, an exact copy, or a calibrated new one)."""
    producer = g.producer(tensor)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return tensor
    found = g.dq_of(tensor)
    if found is not None:
        return found[0]
    if producer is not None and producer.op_type in MOVEMENT_OPS and g.is_zero_pad(producer):
        source = _quantized(g, producer.input[0], ranges)  # the data input
        if source is not None:
            dq = g.producer(source)
            producer.input[0] = source
            return g.add_pair(tensor, dq.input[1], dq.input[2])
    if tensor not in ranges:
        return None
    return g.add_pair(tensor, *g.new_params(tensor, *ranges.params(tensor)))


def _quantize_output(g: _Graph, tensor: str, ranges: Ranges) -> None:
    """Make the float output of a join feed a Q/DQ pair: the quantizer of the layer it feeds when there is
    one (directly or through movement ops with single users: exact), else a calibrated one."""
    tensor = _after_activation(g, tensor)
    if tensor in g.outputs:
        return
    users = g.consumers(tensor)
    found = g.dq_of(tensor)
    if found is not None:
        dq = found[0]
    else:
        params = None
        node = users
        while len(node) == 1 and node[0].op_type in MOVEMENT_OPS and g.is_zero_pad(node[0]):
            found = g.dq_of(node[0].output[0])
            if found is not None:
                params = found[1:]
                break
            node = g.consumers(node[0].output[0])
        if params is None and tensor in ranges:
            params = g.new_params(tensor, *ranges.params(tensor))
        if params is None:
            return
        dq = g.add_pair(tensor, *params)
    for user in users:  # every other user reads the quantized tensor: the join's output feeds only its Q
        if user.op_type != "QuantizeLinear":
            user.input[:] = [dq if x == tensor else x for x in user.input]


def _joins(graph: Any, constants: dict[str, np.ndarray]) -> list[Any]:
    """The GlobalAveragePool nodes, and the Add nodes of two computed tensors one of which is a convolution's
    output (directly or through a Relu/Clip): residual adds of CNNs. Other adds (a transformer's residual
    stream, attention masks) stay float."""
    made = {out: n for n in graph.node for out in n.output}

    def from_conv(tensor: str) -> bool:
        node = made.get(tensor)
        if node is not None and node.op_type in _ACTIVATIONS:
            node = made.get(node.input[0])
        return node is not None and node.op_type == "Conv"

    return [
        n
        for n in graph.node
        if n.op_type == "GlobalAveragePool"
        or (
            n.op_type == "Add"
            and len(n.input) == 2
            and all(x and x not in constants for x in n.input)
            and any(from_conv(x) for x in n.input)
        )
    ]


def calibration_targets(model: Any) -> list[str]:
    """The float tensors `integerize` may need a new range for: the inputs of joins, and their outputs after
    a Relu/Clip."""
    g = _Graph(model.graph)
    targets = []
    for node in _joins(model.graph, g.constants):
        targets += [*node.input, _after_activation(g, node.output[0])]
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return list(dict.fromkeys(t for t in targets if t not in dequantized))


def tensor_ranges(
    model: Any, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """Min and max of each of `tensors` in onnxruntime (CPU) over the input `feeds`."""
    import onnx  # optional dependency (extra: onnx)
    import onnxruntime as ort  # optional dependency (extra: onnx)

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors if t not in known
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    lo = dict.fromkeys(tensors, np.inf)
    hi = dict.fromkeys(tensors, -np.inf)
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            lo[name] = min(lo[name], float(np.min(value)))
            hi[name] = max(hi[name], float(np.max(value)))
    return {t: (lo[t], hi[t]) for t in tensors if np.isfinite(lo[t]) and np.isfinite(hi[t])}


def integerize(model: Any, ranges_of: Callable[[list[str]], Ranges]) -> dict[str, int]:
    """Add the Q/DQ pairs of a full-integer graph to `model` (in place; see the module docstring).

    Args:
        model: a QDQ ``onnx.ModelProto`` written by `postquant.io.onnx.rewrite.rewrite`.
        ranges_of: the quantizers of the new points among the given tensors of `model`: `Ranges` of their
            float (min, max) on calibration data (`tensor_ranges` with the calibration feeds), or the
            model's own points (`postquant.io.onnx.points.ModelPoints`).

    Returns:
        ``uint8_activations`` (int8 activation pairs stored as uint8), ``joins`` (Add/GlobalAveragePool nodes
        given quantized inputs and outputs), ``new_pairs`` (pairs added), ``calibrated`` (of them with a
        calibrated range).
    """
    unsigned = unsigned_activations(model.graph)
    targets = calibration_targets(model)
    ranges = ranges_of(targets)
    g = _Graph(model.graph)
    joins = 0
    for node in _joins(model.graph, g.constants):
        inputs = [_quantized(g, x, ranges) for x in node.input]
        if any(x is None for x in inputs):
            log.info("%s %s stays in float: an input has no range", node.op_type, node.name)
            continue
        node.input[:] = inputs
        _quantize_output(g, node.output[0], ranges)
        joins += 1
    pairs, calibrated = g.pairs, g.calibrated
    g.finish()
    log.info(
        "full-integer graph: %d Add/GlobalAveragePool nodes on quantized tensors, %d Q/DQ pairs added "
        "(%d with calibrated ranges), %d activation pairs stored as uint8",
        joins,
        pairs,
        calibrated,
        unsigned,
    )
    return {"uint8_activations": unsigned, "joins": joins, "new_pairs": pairs, "calibrated": calibrated}
