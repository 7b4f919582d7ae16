"""Choosing activation ranges: from calibration data, data-free (SQuant's reference noise rule), or none at all
(dynamic per-token input quantizers, `install_dynamic`)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from postquant.calib.data import Batch, ForwardLoop, batch_size_of, forward_all
from postquant.calib.observers import (  # noqa: F401 (NOISE_STD_MULTIPLIER, reference_noise_range re-exported)
    NOISE_STD_MULTIPLIER,
    Observer,
    RangeObserver,
    make_observer,
    reference_noise_range,
)
from postquant.choices import ActRanges  # defined there, torch-free; re-exported
from postquant.distributed import Ranks, shard
from postquant.errors import RecipeError
from postquant.nn import DynamicActQuantizer, QuantizedLayer, cached_weights
from postquant.nn.residual import INPUT, OUTPUT, POINT_BITS, ResidualQuant, install_points, tracking
from postquant.progress import progress_bar

if TYPE_CHECKING:
    from postquant.plan import Plan
    from postquant.recipe import Recipe

log = logging.getLogger(__name__)


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
    ranks: Ranks | None = None,
    sample_size: int = 1 << 20,
    residual: bool = False,
) -> None:
    """Observe the float inputs of `layers` over `calib`, then install an input quantizer on each.

    With `residual` (the recipe's ``a_residual``), the same pass observes the points of integer residuals
    (`postquant.nn.residual`: conv outputs that are residual add operands, global pooling inputs) with the
    same observer, and installs them on `model` as 8-bit quantizers.

    Observation runs with every input quantizer off (float activations, quantized weights); `progress`
    shows a bar over the observed layer inputs. With `ranks` (a process group, `postquant.distributed`),
    each rank observes its contiguous shard of the batches and the observers are merged in rank order, so
    every rank installs the same ranges: those of one process for min/max and percentile, and for MSE and
    std unless one layer input holds more values than the observer's sample (`RangeObserver.merge`). A
    forward loop cannot be split: every rank then runs all of it. `sample_size`: the values per layer input
    the mse and std observers keep.
    """
    observers = {
        name: make_observer(observer, percentile=percentile, sample_size=sample_size) for name in layers
    }
    points: dict[str, RangeObserver] = {}  # point name (`_point_name`) -> observer

    def observe_point(kind: str, key: str, t: torch.Tensor) -> torch.Tensor:
        if kind != INPUT:
            points.setdefault(
                _point_name(kind, key),
                make_observer(observer, percentile=percentile, sample_size=sample_size),
            ).update(t)
        return t

    if ranks is not None and not isinstance(calib, list):
        ranks = None  # each rank sees everything: nothing to merge
    if ranks is not None:
        calib = shard(ranks, calib, sum(batch_size_of(b) for b in calib))
    saved = {name: layer.act_quant for name, layer in layers.items()}
    for layer in layers.values():
        layer.act_quant = None
    try:
        with (
            _observation_bar(f"activation ranges ({observer})", len(layers), calib, progress) as bar,
            input_hooks(layers, lambda name, _, x: observers[name].update(x), bar),
            cached_weights(model),
            tracking(model, set(layers), observe_point) if residual else contextlib.nullcontext(),
        ):
            forward_all(model, calib)
    finally:
        for name, layer in layers.items():
            layer.act_quant = saved[name]
    observers |= points  # ranks see the same model: the same points
    if ranks is not None:
        states = ranks.gather_objects(
            {n: o.state() for n, o in observers.items()}, "merging activation ranges"
        )
        layer_states = {name: [s[name] for s in states] for name in observers}
        sent = ranks.gather_objects(
            {n: o.values_for(layer_states[n], ranks.rank) for n, o in observers.items()},
            "merging activation ranges",
        )
        for name, obs in observers.items():
            obs.merge(layer_states[name], [v[name] for v in sent])
    for name, layer in layers.items():
        if not observers[name].seen:
            log.warning("layer %s saw no calibration input; its input stays float", name)
            continue
        bits = a_bits[name]
        layer.act_quant = layer.input_quantizer(bits, *observers[name].range(bits))
    if residual and layers:
        _install_residual(model, layers, {name: observers[name] for name in points})


def check_dynamic_layers(layers: dict[str, nn.Module]) -> None:
    """Raise `RecipeError` unless every layer (float or `QuantizedLayer`) is a Linear: per token means per
    row of the last dimension, which for a convolution's input is a row of pixels, not a token."""
    kinds = {n: type(m.inner if isinstance(m, QuantizedLayer) else m) for n, m in layers.items()}
    not_linear = [n for n, kind in kinds.items() if not issubclass(kind, nn.Linear)]
    if not_linear:
        shown = ", ".join(f"{n} ({kinds[n].__name__})" for n in not_linear[:4])
        raise RecipeError(
            f"act_ranges: dynamic quantizes Linear inputs per token (per row of the last dimension); "
            f"{len(not_linear)} planned layers with input bits are not Linear: {shown}"
            + (", ..." if len(not_linear) > 4 else "")
            + ". Keep their inputs float (overrides: {'<name>': {a_bits: null}}) or use a static act_ranges"
        )


def dynamic_input_bits(recipe: Recipe, plan: Plan) -> dict[str, int]:
    """Layer name -> input bits of the planned layers quantized per token at run time (``act_ranges:
    dynamic``); empty for every other rule."""
    if recipe.act_ranges is not ActRanges.DYNAMIC:
        return {}
    return {name: lp.a_bits for name, lp in plan.items() if lp.w_bits is not None and lp.a_bits is not None}


def install_dynamic(layers: dict[str, QuantizedLayer], a_bits: dict[str, int]) -> None:
    """Give each layer in `a_bits` (name -> input bits) a `DynamicActQuantizer` (recipe ``act_ranges: dynamic``).

    No data is needed: each token's step is computed from the input itself at every forward.

    Raises:
        RecipeError: a layer in `a_bits` is not a Linear (`check_dynamic_layers`).
    """
    check_dynamic_layers({name: layers[name] for name in a_bits})
    for name, bits in a_bits.items():
        layers[name].act_quant = DynamicActQuantizer(bits)


def _point_name(kind: str, key: str) -> str:
    """The observer name of a point of integer residuals (never a layer name: those hold no '@')."""
    return f"@{kind}:{key}"


def _install_residual(
    model: nn.Module, layers: dict[str, QuantizedLayer], observers: dict[str, RangeObserver]
) -> None:
    """Install the observed points of integer residuals on `model` (`ResidualQuant`)."""
    some = next(iter(layers.values()))
    outputs, pools = {}, {}
    for point, obs in observers.items():
        kind, _, key = point[1:].partition(":")
        lo, hi = obs.range(POINT_BITS)
        if kind == OUTPUT:
            outputs[key] = model.get_submodule(key).input_quantizer(POINT_BITS, lo, hi)
        else:
            pools[int(key)] = some.input_quantizer(POINT_BITS, lo, hi)
    install_points(model, ResidualQuant(outputs, pools))
    log.info(
        "integer residuals: %d conv outputs before residual adds and %d global pooling inputs quantized",
        len(outputs),
        len(pools),
    )


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


def centred_channel_std(y: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation per channel (dim 1) of `y`, whose per-channel means are zero: (C,).

    Equal to ``y.std(dim=every dim but 1)`` up to float rounding (a two-pass variance: `y` is already
    centred). On a contiguous or channels-last (N, C, ...) tensor the sums of squares are taken along
    (n, c) rows in memory order, a vectorised reduction many times faster than ``Tensor.std``'s.
    """
    count = y.numel() // y.shape[1]
    if y.dim() >= 3 and y.is_contiguous():
        rows = y.reshape(y.shape[0], y.shape[1], -1)  # (N, C, L), a view
        return (torch.linalg.vector_norm(rows, dim=2).square().sum(0) / (count - 1)).sqrt()
    channels_last = y.permute(0, *range(2, y.dim()), 1)  # (N, ..., C)
    if y.dim() >= 3 and channels_last.is_contiguous():
        rows = channels_last.reshape(y.shape[0], -1, y.shape[1])  # (N, L, C), a view
        return (torch.linalg.vector_norm(rows, dim=1).square().sum(0) / (count - 1)).sqrt()
    squares = y.square().sum(dim=[d for d in range(y.dim()) if d != 1])  # (C,)
    return (squares / (count - 1)).sqrt()


@contextlib.contextmanager
def bn_matched(model: nn.Module) -> Iterator[int]:
    """Inside this context every BatchNorm's *input* is re-standardised, per channel, to its running mean
    and variance, so that noise flowing through the float model has the first two moments real data had
    (ZeroQ's statistics, without any optimisation). Yields the number of BatchNorm layers.

    Each input x becomes ``(x - mean) * (sqrt(running_var + eps) / std) + running_mean`` with the batch's
    per-channel mean and unbiased std (at least 1e-6), computed in place on one new tensor.
    """
    bns = [
        m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and m.track_running_stats
    ]

    def restandardise(
        bn: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor]:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = x - x.mean(dim=dims, keepdim=True)  # the output, then in place
        std = centred_channel_std(y).clamp(min=1e-6)  # (C,)
        scale = (torch.sqrt(bn.running_var + bn.eps) / std).reshape(shape)
        return (y.mul_(scale).add_(bn.running_mean.reshape(shape)),)

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
    sample_size: int = 1 << 20,
) -> dict[str, tuple[float, float]]:
    """Data-free activation ranges from the *float* model (before BN folding), which is not modified.

    Standard-normal noise shaped like `example` (the scale of normalised inputs) is run through a copy of the
    float model with every BatchNorm input re-standardised to the BN's running statistics (`bn_matched`);
    the inputs of the layers in `names` (name -> bits) are observed with `observer`; `progress` shows a bar
    over the observed layer inputs. Image-shaped (4-D) noise runs in channels-last memory format, where CPU
    convolutions are faster; a model whose forward needs NCHW tensors (a ``.view`` of an activation) is
    run again in NCHW. `sample_size`: the values per layer input the mse and std observers keep.
    """
    if not isinstance(example, torch.Tensor):
        raise TypeError("the bn-noise rule needs tensor inputs; pass calibration data instead")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *example.shape[1:], generator=generator, dtype=example.dtype)
    model = copy.deepcopy(float_model).eval()

    def observe(memory_format: torch.memory_format) -> dict[str, RangeObserver]:
        observers = {name: make_observer(observer, seed=seed, sample_size=sample_size) for name in names}
        layers = {name: model.get_submodule(name) for name in names}
        model.to(memory_format=memory_format)
        batches = [b.contiguous(memory_format=memory_format) for b in torch.split(noise, 64)]
        with (
            bn_matched(model),
            _observation_bar(
                f"activation ranges (bn-noise, {observer})", len(layers), batches, progress
            ) as bar,
            input_hooks(layers, lambda name, _, x: observers[name].update(x), bar),  # type: ignore[arg-type]
        ):
            forward_all(model, batches)
        return observers

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        log.warning("bn-noise: the model has no BatchNorm; activations come from plain Gaussian noise")
    if noise.dim() == 4:
        try:
            observers = observe(torch.channels_last)
        except RuntimeError as err:
            log.info("bn-noise: the model does not run in channels-last memory format (%s); using NCHW", err)
            observers = observe(torch.contiguous_format)
    else:
        observers = observe(torch.contiguous_format)
    return {name: observers[name].range(bits) for name, bits in names.items() if observers[name].seen}
