"""Choosing activation ranges: from calibration data, or data-free (SQuant's reference noise rule)."""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from postquant.calib.data import Batch, ForwardLoop, forward_all
from postquant.calib.observers import Observer, RangeObserver
from postquant.nn import ActQuantizer, QuantizedLayer

log = logging.getLogger(__name__)


class ActRanges(enum.StrEnum):
    """Where activation ranges come from."""

    AUTO = "auto"  # calibration data when given, else the data-free default
    CALIB = "calib"  # observers over calibration data
    SQUANT_NOISE = "squant-noise"  # SQuant reference: one pass of uniform noise, range = s * std


# The reference's multiplier s by activation bits (12/14/25 at 4/6/8 bits; other widths interpolated).
NOISE_STD_MULTIPLIER = {2: 12.0, 3: 12.0, 4: 12.0, 5: 13.0, 6: 14.0, 7: 19.5, 8: 25.0}


@contextlib.contextmanager
def input_hooks(
    layers: dict[str, QuantizedLayer], fn: Callable[[str, QuantizedLayer, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``fn(name, layer, input)`` before every forward of each layer; hooks always go away."""
    handles = [
        layer.register_forward_pre_hook(lambda mod, args, _name=name: fn(_name, mod, args[0]))
        for name, layer in layers.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate_from_data(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    a_bits: dict[str, int],
    calib: list[Batch] | ForwardLoop,
    observer: Observer | str = Observer.MINMAX,
    percentile: float = 99.99,
) -> None:
    """Observe the float inputs of `layers` over `calib`, then install an input quantizer on each.

    Observation runs with every input quantizer off (float activations, quantized weights).
    """
    observers = {name: RangeObserver(observer, percentile) for name in layers}
    saved = {name: layer.act_quant for name, layer in layers.items()}
    for layer in layers.values():
        layer.act_quant = None
    try:
        with input_hooks(layers, lambda name, _, x: observers[name].update(x)):
            forward_all(model, calib)
    finally:
        for name, layer in layers.items():
            layer.act_quant = saved[name]
    for name, layer in layers.items():
        if not observers[name].seen:
            log.warning("layer %s saw no calibration input; its input stays float", name)
            continue
        bits = a_bits[name]
        layer.act_quant = ActQuantizer(bits, *observers[name].range(bits))


def reference_noise_range(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """SQuant's data-free range for one activation tensor (ALGORITHMS.md 2.2)."""
    s = NOISE_STD_MULTIPLIER[bits]
    x = x.detach().float()
    if x.min() >= 0:
        pos = x[x > 0]
        alpha = s * pos.std().item() if pos.numel() > 1 else x.max().item()
        if bits < 6:
            alpha = min(alpha, x.max().item())
        return 0.0, alpha
    alpha = s * x.std().item() / 1.25
    if bits < 6:
        alpha = min(alpha, x.abs().max().item())
    return -alpha, alpha


@torch.no_grad()
def calibrate_reference_noise(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    a_bits: dict[str, int],
    example: Any,
    seed: int = 0,
    n: int = 256,
) -> None:
    """SQuant's reference rule: one forward pass of seeded ``torch.rand(n, *input_shape)``.

    Each layer's range is set the first time it sees its input, so later layers see the quantized
    outputs of earlier ones, as in the reference.
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError("the noise rule needs image-like tensor inputs; pass calibration data instead")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, *example.shape[1:], generator=generator, dtype=example.dtype)

    def install(name: str, layer: QuantizedLayer, x: torch.Tensor) -> None:
        if layer.act_quant is None:
            layer.act_quant = ActQuantizer(a_bits[name], *reference_noise_range(x, a_bits[name]))

    for layer in layers.values():
        layer.act_quant = None
    with input_hooks(layers, install):
        forward_all(model, [noise])
