"""The quantized layer: packed integer weight codes on a grid, an optional input quantizer, the float op."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from postquant.grids import Grid, grid_from_state, grid_state
from postquant.grids.pack import pack_codes, unpack_codes
from postquant.nn.act import ActQuantizer, DynamicActQuantizer

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
HALF = (torch.bfloat16, torch.float16)


def upcast_half(t: torch.Tensor) -> torch.Tensor:
    """Half-precision (bfloat16, float16) tensors as float32; every other tensor unchanged."""
    return t.float() if t.dtype in HALF else t


def compact_grid_tensor(t: torch.Tensor) -> torch.Tensor:
    """An integer-valued float grid tensor (zero points) as int8 or int16 when that holds it exactly, else `t`.

    The same rule the checkpoint applies to every grid tensor it writes; the grid computes with it in float
    again (`QuantizedLayer.grid`), so no value changes.
    """
    if not t.is_floating_point() or not t.numel() or not torch.equal(t, t.round()):
        return t
    for dtype in (torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= float(t.min()) and float(t.max()) <= info.max:
            return t.to(dtype)
    return t


Stamp = tuple[tuple[torch.Tensor, int], ...]


def _same_stamp(a: Stamp, b: Stamp) -> bool:
    """Whether two stamps name the same tensor objects at the same versions (no in-place change since)."""
    return len(a) == len(b) and all(x is y and vx == vy for (x, vx), (y, vy) in zip(a, b, strict=True))


class QuantizedLayer(nn.Module):
    """A Conv1d/Conv2d/Linear (or a subclass, e.g. TF-"same"-padded convs) with quantized weights.

    The input quantizer ``act_quant`` is a static per-tensor `ActQuantizer`, a dynamic per-token
    `DynamicActQuantizer` (recipe ``act_ranges: dynamic``) or None (float input).

    It keeps the float module without its weight (`inner`), the weight's integer codes packed densely
    (``packed``: ``b``-bit codes take ``b`` bits, `postquant.grids.pack`) and the grid's tensors (``grid_*``;
    integer-valued zero points as int8/int16). Each forward dequantizes the codes and runs the float module
    on them, so the forward is *exactly* ``inner(act_quant(x))`` with ``weight = grid.dequantize(codes)``:
    whatever the float module does around its weight (static padding, groups, dilation) is preserved, and no
    float copy of the weight is kept. Inside `cached_weights` the dequantized weight is kept between forwards.

    ``weight`` (the dequantized weight) and ``codes`` (int8, the weight's shape) are computed on access.
    ``torch.func.functional_call(model, {"<name>.weight": w})`` runs the layer on another weight `w` (learned
    rounding passes its soft weights this way): ``weight`` is an empty buffer slot that only such a call fills.
    """

    def __init__(
        self,
        layer: nn.Module,
        grid: Grid,
        codes: torch.Tensor,
        act_quant: ActQuantizer | DynamicActQuantizer | None = None,
    ) -> None:
        super().__init__()
        inner = copy.deepcopy(layer, memo={id(layer.weight): None})  # without copying the float weight
        del inner.weight
        self.inner = inner
        self.act_quant = act_quant
        self.grid_config, tensors = grid_state(grid)
        for key, value in tensors.items():  # the step keeps its float dtype: it sets the grid's precision
            value = value.detach() if key == "inv_scale" else compact_grid_tensor(value.detach())
            self.register_buffer(f"grid_{key}", value.clone())
        self.weight_shape = tuple(codes.shape)
        codes = codes.to(torch.int32) if codes.is_floating_point() else codes  # integer-valued float codes
        self.register_buffer("packed", pack_codes(codes, grid.bits))  # (ceil(numel * bits / 8),) uint8
        # The slot `functional_call` fills with a substitute weight (None otherwise; never saved). Set directly:
        # `register_buffer` refuses a name the `weight` property already answers.
        self._buffers["weight"] = None
        self._non_persistent_buffers_set.add("weight")
        # dequantized weights by (dtype, inference mode) while `cached_weights` is on; None: off
        self._cache: dict[tuple[torch.dtype, bool], tuple[Stamp, torch.Tensor]] | None = None

    @property
    def grid_dtype(self) -> torch.dtype:
        """The precision the grid computes in: float32, or float64 for a float64 layer (its step's dtype)."""
        return torch.float64 if self.grid_inv_scale.dtype == torch.float64 else torch.float32

    @property
    def grid(self) -> Grid:
        """The weight grid, its tensors in `grid_dtype` (zero points stored as integers convert exactly)."""
        tensors = {
            k.removeprefix("grid_"): v.to(self.grid_dtype)
            for k, v in self._buffers.items()
            if k.startswith("grid_")
        }
        return grid_from_state(self.grid_config, tensors)

    @property
    def bits(self) -> int:
        return self.grid_config.bits

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes, int8, of the weight's shape (unpacked on each access)."""
        numel = math.prod(self.weight_shape)
        return unpack_codes(self.packed, self.bits, numel).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``grid.dequantize(codes)`` (float32; float64 for a float64 layer), or the
        weight a `functional_call` substitutes."""
        substitute = self._buffers["weight"]
        if substitute is not None:
            return substitute
        return self._dequantized(self.grid_dtype)

    def input_quantizer(self, bits: int, lo: float, hi: float) -> ActQuantizer:
        """An `ActQuantizer` for this layer's input range [lo, hi], on the layer's device, its step in the
        dtype the layer quantizes inputs in (float32; float64 for a float64 layer). Not installed."""
        return ActQuantizer(bits, lo, hi, device=self.packed.device, dtype=self.grid_dtype)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer codes (of the weight's shape), on the layer's device."""
        if tuple(codes.shape) != self.weight_shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight of shape {self.weight_shape}")
        self.packed = pack_codes(codes.to(self.packed.device), self.bits)
        self._cache = {} if self._cache is not None else None

    def _stamp(self) -> Stamp:
        """What the dequantized weight depends on: the packed codes and grid tensors (object and version)."""
        return tuple(
            (t, t._version)
            for k, t in self._buffers.items()
            if t is not None and (k == "packed" or k.startswith("grid_"))
        )

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype`, from the cache when valid."""
        if self._cache is None:
            return self._compute(dtype)
        stamp = self._stamp()
        # an inference-mode tensor cannot take part in autograd later: one entry per mode
        key = (dtype, torch.is_inference_mode_enabled())
        hit = self._cache.get(key)
        if hit is not None and _same_stamp(hit[0], stamp):
            return hit[1]
        weight = self._compute(dtype)
        if not weight.requires_grad:  # a grid tensor that trains (a Parameter) is never cached
            self._cache[key] = (stamp, weight)
        return weight

    def _compute(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.grid.dequantize(self.codes)  # (OC, ...) in grid_dtype; int8 codes convert exactly
        return weight if weight.dtype == dtype else weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Codes are dequantized (and inputs quantized) in float32; a half-precision model (bfloat16 or float16
        # inputs) then computes the layer in its own dtype, as its float version did.
        dtype = x.dtype
        if self.act_quant is not None:
            x = self.act_quant(x.float()).to(dtype) if dtype in HALF else self.act_quant(x)
        substitute = self._buffers["weight"]
        if substitute is not None:
            weight = substitute if substitute.dtype == dtype else substitute.to(dtype)
        else:
            weight = self._dequantized(dtype)
        inner = self.inner
        hooked = inner._forward_hooks or inner._forward_pre_hooks
        if type(inner).forward is nn.Linear.forward and not hooked:  # what nn.Linear.forward computes
            return F.linear(x, weight, inner.bias)
        return functional_call(inner, {"weight": weight}, (x,))

    def extra_repr(self) -> str:
        return f"w_bits={self.bits}, grid={self.grid_config.kind.value}, granularity={self.grid_config.granularity.value}"


@contextlib.contextmanager
def cached_weights(model: nn.Module) -> Iterator[None]:
    """Keep each `QuantizedLayer`'s dequantized weight between forwards while the block runs.

    For evaluation and calibration loops that run the model many times: the weights are dequantized once
    (per dtype) instead of at every forward, at the memory cost of the float weights. The cache follows the
    codes and grids: a layer whose codes or grid tensors change (``set_codes``, a new or modified
    ``grid_inv_scale``) dequantizes again. Nested uses are fine; on exit the cache is dropped.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    previous = [m._cache for m in layers]
    for m in layers:
        if m._cache is None:
            m._cache = {}
    try:
        yield
    finally:
        for m, cache in zip(layers, previous, strict=True):
            m._cache = cache
