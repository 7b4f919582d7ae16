"""Integer residuals: the quantization points of a full-integer ONNX graph, in the PyTorch simulation.

A CNN quantized layer by layer quantizes the inputs of its convolutions only: a residual ``Add`` sums a
conv's float output and the block's float input, and global average pooling runs on a float feature map.
The full-integer ONNX graph (`postquant.io.onnx.integer`) quantizes those tensors too, so that onnxruntime
chains integer kernels. With the recipe's ``a_residual: true`` the simulation quantizes them as well, at the
same points and with ranges from the same calibration pass, so that the exported graph computes the
simulated function (up to the rounding inside onnxruntime's integer kernels):

* an operand of a residual add (an add of two computed tensors, one of which is a quantized convolution's
  output, directly or after one ReLU/ReLU6/clamp) that a quantized layer also takes as its input, directly
  or through ops that only move values (strided slicing, zero padding, flatten, reshape, max pooling...),
  is quantized with that layer's input quantizer (the block input of a residual block);
* any other operand that is a quantized convolution's output gets the layer's *output point*
  (``outputs[<layer>]``, 8 bits);
* the input of a global average pooling (``adaptive_avg_pool1d/2d`` to size 1, which exports as
  ``GlobalAveragePool``) gets a *pool point* (``pools[<k>]``, the k-th global pooling of a forward, 8 bits),
  unless a quantized layer takes that tensor (its quantizer then applies).

The points are `ActQuantizer`s held by one `ResidualQuant` module, registered on the model as
``postquant_residual``; a forward pre-hook and an always-called forward hook on the model run its forward
inside a `torch.overrides.TorchFunctionMode` (`tracking`) that follows tensors by identity from the
quantized layers to the adds and poolings. The model keeps its own class. Inside the mode, adds are seen
as ``torch.add`` / ``Tensor.add`` / ``Tensor.add_`` (``a + b``, ``a += b``): an in-place add writes the
sum of the quantized operands into its first operand.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from postquant.nn.act import ActQuantizer
from postquant.nn.layer import HALF, QuantizedLayer

__all__ = [
    "POINTS_NAME",
    "POINT_BITS",
    "ResidualQuant",
    "install_points",
    "remove_points",
    "residual_points",
    "tracking",
]

log = logging.getLogger(__name__)

POINTS_NAME = "postquant_residual"  # the attribute of the model that holds its `ResidualQuant`
POINT_BITS = 8  # the full-integer graph's activations are 8-bit

# How an add operand or pooling input is quantized: with the input quantizer of a layer that takes it,
# a layer's output point, or a pool point.
INPUT, OUTPUT, POOL = "input", "output", "pool"
PointFn = Callable[[str, str, Tensor], Tensor]  # (kind, key, tensor) -> the tensor to use

_ADD = frozenset({torch.add, Tensor.add, Tensor.__add__})
_IADD = frozenset({Tensor.add_, Tensor.__iadd__})
_ACTIVATION = frozenset(
    {F.relu, torch.relu, Tensor.relu, torch.relu_, Tensor.relu_, F.relu6, F.hardtanh, torch.clamp}
    | {Tensor.clamp, torch.clip, Tensor.clip, F.hardtanh_}
)
_NORM = frozenset({F.batch_norm})  # an unfolded BatchNorm after a conv: the exporter folds it into the Conv
_MOVEMENT = frozenset(
    {F.pad, torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape, Tensor.permute}
    | {torch.permute, Tensor.transpose, torch.transpose, Tensor.squeeze, torch.squeeze, Tensor.unsqueeze}
    | {torch.unsqueeze, Tensor.contiguous, F.max_pool1d, F.max_pool2d, torch.max_pool1d, torch.max_pool2d}
    | {Tensor.__getitem__}
)
_GLOBAL_POOL = frozenset({F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.adaptive_avg_pool1d})


def point_key(layer: str) -> str:
    """The `ResidualQuant.outputs` key of a layer name (a module name cannot hold dots)."""
    return layer.replace(".", "/")


def point_layer(key: str) -> str:
    """The layer name of an `ResidualQuant.outputs` key."""
    return key.replace("/", ".")


class ResidualQuant(nn.Module):
    """The points of integer residuals: per-layer output quantizers and per-pooling input quantizers.

    Args:
        outputs: layer name -> the quantizer of its output where that output is a residual add's operand.
        pools: k -> the quantizer of the input of the model's k-th global average pooling.
    """

    def __init__(self, outputs: dict[str, ActQuantizer], pools: dict[int, ActQuantizer]) -> None:
        super().__init__()
        self.outputs = nn.ModuleDict({point_key(name): q for name, q in outputs.items()})
        self.pools = nn.ModuleDict({str(k): q for k, q in pools.items()})
        self._depth = 0  # nested forwards of the model run in one tracking context
        self._context: contextlib.ExitStack | None = None

    def output_points(self) -> dict[str, ActQuantizer]:
        """Layer name -> output quantizer."""
        return {point_layer(k): q for k, q in self.outputs.items()}  # type: ignore[misc]

    def pool_points(self) -> dict[int, ActQuantizer]:
        """Pooling index -> input quantizer."""
        return {int(k): q for k, q in self.pools.items()}  # type: ignore[misc]

    def apply(self, model: nn.Module) -> PointFn:
        """The point function of the simulation: quantize with the point's quantizer (float without one)."""
        layers = dict(model.named_modules())
        outputs, pools = self.output_points(), {str(k): q for k, q in self.pool_points().items()}

        def quantize(kind: str, key: str, t: Tensor) -> Tensor:
            if kind == INPUT:
                quantizer = layers[key].act_quant
            else:
                quantizer = (outputs if kind == OUTPUT else pools).get(key)
            if quantizer is None:
                return t
            return quantizer(t.float()).to(t.dtype) if t.dtype in HALF else quantizer(t)  # as the layers do

        return quantize

    def _enter(self, model: nn.Module, args: Any) -> None:
        if self._depth == 0:
            stack = contextlib.ExitStack()
            stack.enter_context(tracking(model, _quantizing(model), self.apply(model)))
            self._context = stack
        self._depth += 1

    def _exit(self, model: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and self._context is not None:
            context, self._context = self._context, None
            context.close()

    def extra_repr(self) -> str:
        return f"outputs={len(self.outputs)}, pools={len(self.pools)}, bits={POINT_BITS}"


def _quantizing(model: nn.Module) -> set[str]:
    """The quantized layers that quantize their input."""
    return {n for n, m in model.named_modules() if isinstance(m, QuantizedLayer) and m.act_quant is not None}


def residual_points(model: nn.Module) -> ResidualQuant | None:
    """The model's `ResidualQuant` (``a_residual``), or None."""
    points = getattr(model, POINTS_NAME, None)
    return points if isinstance(points, ResidualQuant) else None


def install_points(model: nn.Module, points: ResidualQuant) -> None:
    """Register `points` on `model` (replacing earlier ones) and the hooks that run its forward tracked."""
    remove_points(model)
    model.add_module(POINTS_NAME, points)
    model.register_forward_pre_hook(points._enter)
    model.register_forward_hook(points._exit, always_call=True)


def remove_points(model: nn.Module) -> ResidualQuant | None:
    """Remove the model's `ResidualQuant` and its hooks; return it (None when there was none)."""
    points = residual_points(model)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), ResidualQuant)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    if points is not None:
        delattr(model, POINTS_NAME)
    return points


class _Refs:
    """Values by tensor identity; a freed tensor's entry is never returned for a new tensor at its address."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}

    def put(self, t: Tensor, value: Any) -> None:
        self._items[id(t)] = (weakref.ref(t), value)

    def get(self, t: Any) -> Any:
        item = self._items.get(id(t)) if isinstance(t, Tensor) else None
        return item[1] if item is not None and item[0]() is t else None


def _plain_slices(key: Any) -> bool:
    """Whether an index only selects with slices (an ONNX ``Slice``), not with integers or tensors."""
    key = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, slice) for k in key)


def _global_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    sizes = size if isinstance(size, tuple | list) else (size,)
    return all(s == 1 for s in sizes)


class _Tracker(TorchFunctionMode):
    """Follows the tensors of one forward: inputs of quantizing layers, outputs of quantized convolutions,
    movement-op views; quantizes add operands and global pooling inputs through `point`."""

    def __init__(self, quantizing: set[str], point: PointFn) -> None:
        super().__init__()
        self.quantizing, self.point = quantizing, point
        self.fed = _Refs()  # tensor -> name of the first quantizing layer that took it
        self.conv = _Refs()  # tensor -> (conv layer name, after an activation)
        self.view = _Refs()  # tensor -> the tensor it was moved from
        self.pools = 0

    def new_forward(self) -> None:
        """Forget the last forward's tensors and count poolings from 0: a calibration pass runs many forwards
        in one context."""
        self.fed, self.conv, self.view = _Refs(), _Refs(), _Refs()
        self.pools = 0

    def layer_input(self, name: str, x: Tensor) -> None:
        if name in self.quantizing and self.fed.get(x) is None:
            self.fed.put(x, name)

    def conv_output(self, name: str, y: Tensor) -> None:
        self.conv.put(y, (name, False))

    def _fed_layer(self, t: Tensor) -> str | None:
        """The quantizing layer that takes `t` or a tensor `t` was moved from."""
        seen = 0
        while t is not None and seen < 64:
            name = self.fed.get(t)
            if name is not None:
                return name
            t, seen = self.view.get(t), seen + 1
        return None

    def _operand(self, t: Tensor) -> Tensor:
        layer = self._fed_layer(t)
        if layer is not None:
            return self.point(INPUT, layer, t)
        conv = self.conv.get(t)
        if conv is not None:
            return self.point(OUTPUT, conv[0], t)
        log.debug("an operand of a residual add is no quantized tensor and no conv output: it stays float")
        return t

    def _is_join(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if len(args) != 2 or kwargs or not all(isinstance(a, Tensor) for a in args):
            return False
        if any(isinstance(a, nn.Parameter) for a in args):
            return False
        return any(self.conv.get(a) is not None for a in args)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ADD and self._is_join(args, kwargs):
            return torch.add(self._operand(args[0]), self._operand(args[1]))
        if func in _IADD and self._is_join(args, kwargs):
            total = torch.add(self._operand(args[0]), self._operand(args[1]))
            return args[0].copy_(total)
        if func in _GLOBAL_POOL and args and isinstance(args[0], Tensor) and _global_size(args, kwargs):
            x, k = args[0], self.pools
            self.pools += 1
            layer = self._fed_layer(x)
            x = self.point(INPUT, layer, x) if layer is not None else self.point(POOL, str(k), x)
            return func(x, *args[1:], **kwargs)
        out = func(*args, **kwargs)
        source = args[0] if args and isinstance(args[0], Tensor) else None
        if source is None or not isinstance(out, Tensor):
            return out
        if func in _MOVEMENT and out is not source and self._moves(func, args, kwargs):
            self.view.put(out, source)
        elif func in _ACTIVATION or func in _NORM:
            conv = self.conv.get(source)
            if conv is not None and not conv[1]:
                self.conv.put(out, (conv[0], func in _ACTIVATION))
        return out

    @staticmethod
    def _moves(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if func is Tensor.__getitem__:
            return len(args) > 1 and _plain_slices(args[1])
        if func is F.pad:
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None)
            return mode == "constant" and not value
        return True


@contextlib.contextmanager
def tracking(model: nn.Module, quantizing: set[str], point: PointFn) -> Iterator[_Tracker]:
    """Run `model`'s forwards inside this context with residual add operands and global pooling inputs
    passed through ``point(kind, key, tensor)`` (kind `INPUT`: key is the quantizing layer that takes the
    tensor; `OUTPUT`: the conv layer whose output it is; `POOL`: the pooling's index in the forward).

    Args:
        model: a model holding `QuantizedLayer`s.
        quantizing: the layers whose inputs count as quantized (those with an input quantizer, or about to
            get one during calibration).
        point: what to do at a point: quantize (the simulation) or observe (calibration).
    """
    tracker = _Tracker(quantizing, point)
    handles = [model.register_forward_pre_hook(lambda _m, _a: tracker.new_forward())]
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLayer):
            continue
        handles.append(m.register_forward_pre_hook(lambda _m, a, _n=name: tracker.layer_input(_n, a[0])))
        if isinstance(m.inner, nn.Conv1d | nn.Conv2d):
            handles.append(m.register_forward_hook(lambda _m, _a, y, _n=name: tracker.conv_output(_n, y)))
    try:
        with tracker:
            yield tracker
    finally:
        for h in handles:
            h.remove()
