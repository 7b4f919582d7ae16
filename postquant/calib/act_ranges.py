"""Choosing activation ranges: from calibration data, or data-free (SQuant's reference noise rule)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from postquant.calib.data import Batch, ForwardLoop, forward_all
from postquant.calib.observers import Observer, RangeObserver
from postquant.choices import ActRanges  # noqa: F401 (re-exported; defined there, torch-free)
from postquant.nn import QuantizedLayer
from postquant.progress import progress_bar

log = logging.getLogger(__name__)


# The reference's multiplier s by activation bits (12/14/25 at 4/6/8 bits; other widths interpolated).
NOISE_STD_MULTIPLIER = {2: 12.0, 3: 12.0, 4: 12.0, 5: 13.0, 6: 14.0, 7: 19.5, 8: 25.0}


@contextlib.contextmanager
def input_hooks(
    layers: dict[str, nn.Module],
    fn: Callable[[str, nn.Module, torch.Tensor], None],
    bar: Any = None,
) -> Iterator[None]:
    """Call ``fn(name, layer, input)`` before every forward of each layer; hooks always go away.

    With a progress `bar` (tqdm), each call advances it by one.
    """

    def hook(name: str, mod: nn.Module, x: torch.Tensor) -> None:
        fn(name, mod, x)
        if bar is not None:
            bar.update()

    handles = [
        layer.register_forward_pre_hook(lambda mod, args, _name=name: hook(_name, mod, args[0]))
        for name, layer in layers.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _observation_bar(desc: str, n_layers: int, calib: Any, enabled: bool) -> Any:
    """A bar over the layer inputs a calibration pass observes (layers x batches; unknown for a loop)."""
    total = n_layers * len(calib) if isinstance(calib, list) else None
    return progress_bar(total=total, desc=desc, unit="input", enabled=enabled, dynamic_ncols=True)


def calibrate_from_data(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    a_bits: dict[str, int],
    calib: list[Batch] | ForwardLoop,
    observer: Observer | str = Observer.MINMAX,
    percentile: float = 99.99,
    progress: bool = True,
) -> None:
    """Observe the float inputs of `layers` over `calib`, then install an input quantizer on each.

    Observation runs with every input quantizer off (float activations, quantized weights); `progress`
    shows a bar over the observed layer inputs.
    """
    observers = {name: RangeObserver(observer, percentile) for name in layers}
    saved = {name: layer.act_quant for name, layer in layers.items()}
    for layer in layers.values():
        layer.act_quant = None
    try:
        with (
            _observation_bar(f"activation ranges ({observer})", len(layers), calib, progress) as bar,
            input_hooks(layers, lambda name, _, x: observers[name].update(x), bar),
        ):
            forward_all(model, calib)
    finally:
        for name, layer in layers.items():
            layer.act_quant = saved[name]
    for name, layer in layers.items():
        if not observers[name].seen:
            log.warning("layer %s saw no calibration input; its input stays float", name)
            continue
        bits = a_bits[name]
        layer.act_quant = layer.input_quantizer(bits, *observers[name].range(bits))


def _positive_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the positive elements of `x` (as ``x[x > 0].std()``, without the slow gather)."""
    mask = x > 0
    count = mask.sum()
    mean = torch.where(mask, x, 0).sum() / count
    var = torch.where(mask, (x - mean).square(), 0).sum() / (count - 1)
    return var.sqrt()


def reference_noise_range(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """SQuant's data-free range for one activation tensor (docs/algorithms.md 2.2)."""
    s = NOISE_STD_MULTIPLIER[bits]
    x = x.detach().float()
    if x.min() >= 0:
        count = int((x > 0).sum())
        alpha = s * _positive_std(x).item() if count > 1 else x.max().item()
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
    progress: bool = True,
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
            layer.act_quant = layer.input_quantizer(a_bits[name], *reference_noise_range(x, a_bits[name]))

    for layer in layers.values():
        layer.act_quant = None
    with (
        _observation_bar("activation ranges (squant-noise)", len(layers), [noise], progress) as bar,
        input_hooks(layers, install, bar),
    ):
        forward_all(model, [noise])


@contextlib.contextmanager
def bn_matched(model: nn.Module) -> Iterator[int]:
    """Inside this context every BatchNorm's *input* is re-standardised, per channel, to its running mean
    and variance, so that noise flowing through the float model has the first two moments real data had
    (ZeroQ's statistics, without any optimisation). Yields the number of BatchNorm layers."""
    bns = [
        m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and m.track_running_stats
    ]

    def restandardise(
        bn: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor]:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True).clamp(min=1e-6)
        target_std = torch.sqrt(bn.running_var + bn.eps).reshape(shape)
        y = x - mean  # then in place, the same arithmetic as (x - mean) / std * target_std + mean_bn
        return (y.div_(std).mul_(target_std).add_(bn.running_mean.reshape(shape)),)

    handles = [bn.register_forward_pre_hook(restandardise) for bn in bns]
    try:
        yield len(bns)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def bn_noise_ranges(
    float_model: nn.Module,
    names: dict[str, int],
    example: Any,
    observer: Observer | str,
    seed: int = 0,
    n: int = 256,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Data-free activation ranges from the *float* model (before BN folding).

    Standard-normal noise shaped like `example` (the scale of normalised inputs) is run through the float
    model with every BatchNorm input re-standardised to the BN's running statistics (`bn_matched`); the
    inputs of the layers in `names` (name -> bits) are observed with `observer`; `progress` shows a bar over
    the observed layer inputs.
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError("the bn-noise rule needs tensor inputs; pass calibration data instead")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *example.shape[1:], generator=generator, dtype=example.dtype)
    observers = {name: RangeObserver(observer, seed=seed) for name in names}
    layers = {name: float_model.get_submodule(name) for name in names}
    with bn_matched(float_model) as n_bn:
        if n_bn == 0:
            log.warning("bn-noise: the model has no BatchNorm; activations come from plain Gaussian noise")
        batches = list(torch.split(noise, 64))
        with (
            _observation_bar(
                f"activation ranges (bn-noise, {observer})", len(layers), batches, progress
            ) as bar,
            input_hooks(layers, lambda name, _, x: observers[name].update(x), bar),  # type: ignore[arg-type]
        ):
            forward_all(float_model.eval(), batches)
    return {name: observers[name].range(bits) for name, bits in names.items() if observers[name].seen}
