"""The switch to PyTorch's int4 weight-only CPU kernel for a quantized model's eligible Linear layers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from postquant.errors import UnsupportedModelError
from postquant.model.walk import quantized_layers, replace_module
from postquant.nn.int4 import Int4Linear, int4_kernel_group

__all__ = ["KernelSwap", "use_int4_kernels"]

log = logging.getLogger(__name__)


@dataclass
class KernelSwap:
    """What `use_int4_kernels` did: the layers now on the kernel, and why the others are not."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def use_int4_kernels(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> KernelSwap:
    """Replace (in place) each `QuantizedLayer` the int4 CPU kernel can run by an `Int4Linear`.

    A deployment step, for inference on the CPU: the kernel's weights are the layer's codes with its scales
    rounded to `dtype`, not bit-identical to the dequantized weights (`postquant.nn.int4`). Converted layers
    are no longer `QuantizedLayer`s, so save or export the model before (the plain layers are the reference);
    the other layers keep dequantizing per forward.

    Args:
        model: a quantized model (from `postquant.quantize` or `postquant.load`), on the CPU.
        dtype: the kernel's compute dtype (bfloat16, float16 or float32); inputs are cast to it and outputs
            back to the input's dtype.

    Returns:
        The converted layer names and, for each other quantized layer, why it stays on the plain path.
    """
    swap = KernelSwap()
    for name, layer in quantized_layers(model).items():
        try:
            int4_kernel_group(layer)
        except UnsupportedModelError as exc:
            swap.skipped[name] = str(exc).removeprefix("the int4 kernel cannot run this layer: ")
            continue
        replace_module(model, name, Int4Linear(layer, dtype))
        swap.converted.append(name)
    log.info(
        "int4 kernel: %d layers converted, %d stay dequantized per forward",
        len(swap.converted),
        len(swap.skipped),
    )
    return swap
