"""The quantizers of a full-integer graph's new points taken from the model (``a_residual``).

A model quantized with integer residuals (`postquant.nn.residual`) already quantizes the tensors that
`postquant.io.onnx.integer` gives new Q/DQ pairs: a conv's output before a residual ``Add`` (the layer's
output point) and the input of ``GlobalAveragePool`` (a pool point, by the pooling's order in the graph,
which is the order of the forward). `ModelPoints` maps each of those graph tensors to the model's point,
so the graph is given the simulation's scales and zero points instead of ranges measured in onnxruntime.

The mapping is checked both ways: a graph tensor that needs a new quantizer and has no point in the model,
and a model point that the graph never uses, raise `ExportError`: the graph would compute another
function than the simulation.
"""

from __future__ import annotations

from typing import Any

from postquant.errors import ExportError
from postquant.nn.act import ActQuantizer
from postquant.nn.residual import POINT_BITS, ResidualQuant

__all__ = ["ModelPoints"]

_ACTIVATIONS = frozenset({"Relu", "Clip"})


def _uint8(q: ActQuantizer) -> tuple[float, int]:
    """(scale, uint8 zero point) of an 8-bit quantizer: an int8 grid is the uint8 grid shifted by 128."""
    if q.bits != POINT_BITS:
        raise ExportError(f"a {q.bits}-bit residual point cannot be an 8-bit Q/DQ pair")
    return float(q.scale.item()), int(q.zero_point.item()) - q.qmin


class ModelPoints:
    """The new points of `integerize` (graph tensor -> the model's quantizer), used like `Ranges`.

    Args:
        model: the QDQ ``onnx.ModelProto`` (after `postquant.io.onnx.rewrite.rewrite`).
        points: the quantized model's `ResidualQuant`.
        targets: the tensors that may need a new quantizer (`calibration_targets`).
    """

    def __init__(self, model: Any, points: ResidualQuant, targets: list[str]) -> None:
        graph = model.graph
        made = {out: n for n in graph.node for out in n.output}
        pools = [n for n in graph.node if n.op_type == "GlobalAveragePool"]
        outputs, pool_points = points.output_points(), points.pool_points()
        self.targets = set(targets)
        self._params: dict[str, tuple[float, int]] = {}
        self.point_of: dict[str, str] = {}  # graph tensor -> the point's description
        self.why: dict[str, str] = {}  # graph tensor -> why no point of the model fits it
        for tensor in targets:
            users = [n for n in graph.node if tensor in n.input]
            pool = next((k for k, n in enumerate(pools) if n in users), None)
            conv = made.get(tensor)
            if conv is not None and conv.op_type in _ACTIVATIONS:
                conv = made.get(conv.input[0])
            layer = _layer_of(conv)
            if any(n.op_type == "Add" for n in users) and layer is not None and layer in outputs:
                self._take(tensor, f"the output point of layer {layer!r}", outputs[layer])
            elif pool is not None and pool in pool_points:
                self._take(tensor, f"the input point of global pooling {pool}", pool_points[pool])
            elif pool is not None:
                self.why[tensor] = (
                    f"the input of global pooling {pool}, which the simulation does not quantize"
                )
            elif layer is not None:
                self.why[tensor] = f"the output of layer {layer!r}, which the simulation does not quantize"
            else:
                self.why[tensor] = "a tensor the simulation does not quantize"
        self.expected = {f"the output point of layer {name!r}" for name in outputs}
        self.expected |= {f"the input point of global pooling {k}" for k in pool_points}
        self.used: set[str] = set()

    def _take(self, tensor: str, point: str, q: ActQuantizer) -> None:
        self._params[tensor] = _uint8(q)
        self.point_of[tensor] = point

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.targets  # a target without a point raises in `params`: never a float join

    def params(self, tensor: str) -> tuple[float, int]:
        """(scale, uint8 zero point) of the model's point on `tensor`."""
        if tensor not in self._params:
            raise ExportError(
                f"the full-integer graph quantizes {tensor!r} ({self.why.get(tensor, 'unknown')}); the "
                "simulation (a_residual) has no point there, so the graph would compute another function. "
                "Export without full_integer=True, or report the model."
            )
        self.used.add(self.point_of[tensor])
        return self._params[tensor]

    def check_all_used(self) -> None:
        """Raise `ExportError` when a point of the model has no place in the graph."""
        unused = sorted(self.expected - self.used)
        if unused:
            raise ExportError(
                f"the simulation quantizes {len(unused)} tensors the full-integer graph does not "
                f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}); the graph would compute "
                "another function. Export without full_integer=True, or report the model."
            )


def _layer_of(conv: Any) -> str | None:
    """The quantized layer of a Conv node (its weight is ``<layer>.weight``), or None."""
    if conv is None or conv.op_type != "Conv" or len(conv.input) < 2:
        return None
    weight = conv.input[1]
    return weight.removesuffix(".weight") if weight.endswith(".weight") else None
