"""The size model of a quantized model, the same bytes the checkpoint stores (`postquant.io.checkpoint`).

A checkpoint's ``model.safetensors`` holds, per quantized layer, its codes packed densely
(``ceil(n * b / 8)`` bytes, `postquant.io.pack`), its grid's float32 inverse scales and its zero points
compacted to the smallest integer type that holds them exactly (int8 or int16, else float32), and every
other tensor (biases, norms, embeddings, layers kept float, input quantizers) as stored in the model. The
size here is the sum of those tensors' bytes; the safetensors header and the JSON manifest (a few KB, not
depending on the allocation) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from postquant.grids import Grid, grid_state
from postquant.model import quantized_layers
from postquant.nn.layer import compact_grid_tensor

__all__ = ["codes_bytes", "float_tensor_bytes", "grid_bytes", "model_bytes", "stored_bytes"]


def codes_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` densely packed codes of `bits` bits."""
    return math.ceil(numel * bits / 8)


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a grid tensor takes in a checkpoint (and in a `QuantizedLayer`): integer-valued float tensors
    (zero points) are stored as int8 or int16 when they fit (`postquant.nn.layer.compact_grid_tensor`)."""
    return t.numel() * compact_grid_tensor(t).element_size()


def grid_bytes(grid: Grid) -> int:
    """Bytes of a grid's tensors in a checkpoint (float32 scales, compacted zero points; a power grid's
    row maxima and exponent too)."""
    return sum(stored_bytes(t) for t in grid_state(grid)[1].values())


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (same storage, offset and shape) kept once, as a checkpoint stores it."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out


def float_tensor_bytes(model: nn.Module, without_weights: Iterable[str] = ()) -> int:
    """Bytes of a float model's saved tensors, leaving out the ``weight`` of the layers `without_weights`
    (the layers that will be quantized: their codes and grids are counted separately)."""
    skip = {f"{name}.weight" for name in without_weights}
    return sum(t.numel() * t.element_size() for key, t in _unique_state(model).items() if key not in skip)


def model_bytes(qmodel: nn.Module) -> int:
    """Bytes of a quantized model's tensors in a checkpoint (``model.safetensors`` without its header)."""
    qlayers = quantized_layers(qmodel)
    total = sum(q.packed.numel() + grid_bytes(q.grid) for q in qlayers.values())
    own = {
        f"{name}.{key}"
        for name, q in qlayers.items()
        for key in q.state_dict(keep_vars=True)
        if key == "packed" or key.startswith("grid_")
    }
    return total + sum(t.numel() * t.element_size() for k, t in _unique_state(qmodel).items() if k not in own)
