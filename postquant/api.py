"""The one public verb: ``quantize(model, recipe, calib=None, example_inputs=None)``."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from postquant.calib import ActRanges, as_calibration, calibrate_from_data, calibrate_reference_noise
from postquant.calib.act_ranges import bn_noise_ranges
from postquant.calib.moments import input_moments
from postquant.calib.observers import Observer
from postquant.errors import DataError, UnsupportedModelError
from postquant.grids import PowerGrid
from postquant.model import fold_batchnorm, matches, quantizable_layers, quantized_layers, replace_module
from postquant.model.convert import float_weight_modules, with_linear_layers
from postquant.nn import QuantizedLayer
from postquant.nn.layer import upcast_half
from postquant.plan import LayerPlan, check_finite, make_plan
from postquant.progress import progress_bar
from postquant.recipe import Method, Recipe
from postquant.reconstruct import is_learned, learned_rounding
from postquant.reconstruct import prepare as prepare_learned
from postquant.reconstruct.engine import check_calibration
from postquant.rounding import nearest_codes, squant_codes, squant_codes_many

log = logging.getLogger(__name__)


def weight_codes(method: Method, x: torch.Tensor, qmin: int, qmax: int, recipe: Recipe) -> torch.Tensor:
    """Integer codes for integer-domain weights `x` by the recipe's rounding method."""
    if method is Method.SQUANT:
        return squant_codes(x, qmin, qmax, recipe.squant_mode)
    return nearest_codes(x, qmin, qmax)


def quantize_weights(
    model: nn.Module,
    plan: dict[str, LayerPlan],
    recipe: Recipe,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedLayer]:
    """Replace every planned layer of `model` (in place) by a `QuantizedLayer` with the recipe's codes.

    Each layer gets the recipe's grid (`recipe.grid`: uniform, or power with its exponent fixed or searched
    per layer, docs/algorithms.md 1.1-1.2; `importance` weighs the search's error per layer, see
    `power_search_importance`); the rounding method chooses codes in that grid's integer domain. Off the CPU,
    SQuant chooses the codes of layers of one shape together (`squant_codes_many`: the same codes, fewer GPU
    operations), holding at most `_BATCH_ELEMENTS` integer-domain weights at once.
    """
    importance = importance or {}
    done: dict[str, QuantizedLayer] = {}
    pending: list[tuple[str, nn.Module, Any, torch.Tensor]] = []  # layers whose codes are chosen together

    def install() -> None:
        all_codes: dict[int, torch.Tensor] = {}
        if recipe.method is Method.SQUANT:  # one batch per integer range (squant_codes_many)
            ranges: dict[tuple[int, int], list[int]] = {}
            for i, (_, _, g, _) in enumerate(pending):
                ranges.setdefault((g.qmin, g.qmax), []).append(i)
            for (qmin, qmax), members in ranges.items():
                xs = [pending[i][3] for i in members]
                all_codes.update(
                    zip(members, squant_codes_many(xs, qmin, qmax, recipe.squant_mode), strict=True)
                )
        else:
            for i, (_, _, g, x) in enumerate(pending):
                all_codes[i] = weight_codes(recipe.method, x, g.qmin, g.qmax, recipe)
        for i, (name, layer, grid, _) in enumerate(pending):
            qlayer = QuantizedLayer(layer, grid, all_codes[i])
            names = replace_module(model, name, qlayer)  # a shared module: every use runs the quantized layer
            if len(names) > 1:
                log.info(
                    "%s is shared (also %s): quantized once, used at every place", name, ", ".join(names[1:])
                )
            done[name] = qlayer
        pending.clear()

    for name, lp in progress_bar(plan.items(), total=len(plan), desc="quantize weights", unit="layer"):
        if lp.w_bits is None:
            continue
        layer = model.get_submodule(name)
        w = upcast_half(layer.weight.detach())  # grids and codes of half-precision weights in float32
        grid = recipe.weight_grid(w, lp.w_bits, importance.get(name))
        if isinstance(grid, PowerGrid):
            log.debug("%s: power grid exponent %.2f", name, float(grid.exponent))
        pending.append((name, layer, grid, grid.to_int(w)))
        if sum(x.numel() for *_, x in pending) >= _BATCH_ELEMENTS or w.device.type == "cpu":
            install()
    if pending:
        install()
    return done


# Integer-domain weights held at once while their codes are chosen together (float32: 1 GiB).
_BATCH_ELEMENTS = 1 << 28


def quantize(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    calib: Any = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Quantize a trained float model after training; the original is not modified.

    Args:
        model: any ``nn.Module`` built from Conv1d/Conv2d/Linear layers (subclasses count). Hugging Face's
            ``Conv1D`` (GPT-2) and ``nn.MultiheadAttention`` are first rebuilt from equivalent Linears
            (`postquant.model.convert`). Modules with weights of other types stay float, with a warning that
            names them.
        recipe: a `Recipe`, a dict of its fields, or the path of a YAML recipe.
        calib: calibration data (a DataLoader, an iterable of batches, a tensor, or a callable
            ``forward_loop(model)``); needed for activation ranges unless a data-free rule is chosen.
        example_inputs: one batch the model accepts; data-free methods use it for input shapes and
            BatchNorm folding uses it to verify the fold.

    Returns:
        An ordinary ``nn.Module`` (a copy of `model`) whose layers are `QuantizedLayer`s, in eval mode.

    Quantization always runs the model in eval mode (BatchNorm uses its running statistics, dropout is off):
    a model passed in train mode is switched to eval mode for the call and its modes are restored after it,
    so its parameters, buffers and ``training`` flags are the same afterwards.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"quantize takes the float model as a torch.nn.Module, not a {type(model).__name__}; to quantize a "
            "named model, build it first (postquant.zoo.load_model(name).model)"
        )
    if quantized_layers(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is already quantized ({len(quantized_layers(model))} QuantizedLayers): "
            "quantize the float model it came from instead"
        )
    recipe = Recipe.coerce(recipe)
    with _eval_mode(model):
        qmodel = _quantize(model, recipe, calib, example_inputs)
    log.info(
        "quantized %d layers (%s, W%s A%s) in %.3f s",
        len(quantized_layers(qmodel)),
        qmodel.postquant_recipe.method.value,
        qmodel.postquant_recipe.w_bits,
        qmodel.postquant_recipe.a_bits,
        time.perf_counter() - start,
    )
    return qmodel


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode inside the block, then give every module back its own ``training`` flag."""
    modes = [(m, m.training) for m in model.modules()]
    if any(training for _, training in modes):
        log.info(
            "%s is in train mode: quantizing it in eval mode (BatchNorm running statistics are used, not "
            "updated); its modes are restored afterwards and the quantized model is in eval mode",
            type(model).__name__,
        )
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _quantize(model: nn.Module, recipe: Recipe, calib: Any, example_inputs: Any) -> nn.Module:
    """`quantize` on a validated recipe and a model in eval mode."""
    torch.manual_seed(recipe.seed)
    model = with_linear_layers(model)  # Conv1D and MultiheadAttention rebuilt from nn.Linear, in a copy
    plan = make_plan(model, recipe)  # validates the layer set before any work
    _warn_unmatched_patterns(model, recipe)
    check_finite(model, list(plan))
    left = float_weight_modules(model, list(plan), recipe.ignore)
    if left:
        log.warning(
            "%d modules with weights stay float (no quantizer for their type; ignore=[...] silences this): %s",
            len(left),
            ", ".join(f"{name} ({kind})" for name, kind in list(left.items())[:8])
            + (", ..." if len(left) > 8 else ""),
        )
    batches = as_calibration(calib, recipe.calib_size) if calib is not None else None
    if isinstance(batches, list) and batches:
        check_calibration(model, batches, 0)  # a batch the model cannot run: a DataError before any work
    if example_inputs is None and isinstance(batches, list):
        example_inputs = batches[0]
    if is_learned(recipe):  # preset first/last-layer policy, synthetic calibration data (float model)
        recipe, batches = prepare_learned(model, recipe, batches, example_inputs)
        plan = make_plan(model, recipe)
        if example_inputs is None and isinstance(batches, list):
            example_inputs = batches[0]

    qmodel = copy.deepcopy(model).eval()
    if recipe.fold_bn:
        if example_inputs is None:
            log.info("BatchNorm not folded: pass example_inputs or calib so the fold can be verified")
        else:
            qmodel, _ = fold_batchnorm(qmodel, example_inputs)
    search = power_search_importance(qmodel, plan, recipe, batches)
    mixed = None
    if recipe.mixed is not None:  # importance-based bits per layer -> per-layer overrides (postquant.mixed)
        from postquant.mixed.apply import apply_mixed

        recipe, mixed = apply_mixed(qmodel, recipe, batches, search)
        plan = make_plan(model, recipe)
    teacher = copy.deepcopy(qmodel) if is_learned(recipe) else None  # float, folded: the target of learning
    layers = quantize_weights(qmodel, plan, recipe, search)

    a_bits = {name: plan[name].a_bits for name in layers if plan[name].a_bits is not None}
    if a_bits:
        act_layers = {name: layers[name] for name in a_bits}
        _calibrate_activations(model, qmodel, act_layers, a_bits, recipe, batches, example_inputs)  # type: ignore[arg-type]
    if teacher is not None:  # learned rounding (AdaRound/BRECQ/QDrop family), postquant.reconstruct
        qmodel.postquant_learned = learned_rounding(qmodel, teacher, batches, recipe)  # type: ignore[assignment]
    qmodel.postquant_recipe = recipe  # type: ignore[assignment]
    if mixed is not None:
        qmodel.postquant_mixed = mixed  # type: ignore[assignment]
    return qmodel.eval()  # the QuantizedLayers are new modules, created in train mode


def _warn_unmatched_patterns(model: nn.Module, recipe: Recipe) -> None:
    """Warn about ignore patterns that match no module and override patterns that match no layer (typos)."""
    modules = list(model.named_modules())
    layers = quantizable_layers(model)
    unmatched = [p for p in recipe.ignore if not any(matches(name, m, p) for name, m in modules)]
    unmatched += [
        p
        for p in recipe.overrides
        if not p.startswith("@") and not any(matches(name, m, p) for name, m in layers.items())
    ]
    if unmatched:
        log.warning(
            "%d layer patterns match nothing in %s (a typo?): %s",
            len(unmatched),
            type(model).__name__,
            ", ".join(repr(p) for p in unmatched),
        )


def power_search_importance(
    model: nn.Module, plan: dict[str, LayerPlan], recipe: Recipe, batches: Any
) -> dict[str, torch.Tensor] | None:
    """The per-weight factors of an output-error exponent search (``power_search: outputs``), else None.

    Measured on the float (BatchNorm-folded) model: ``E[x_j^2]`` of every input of each planned layer.

    Raises:
        DataError: ``power_search: outputs`` without calibration batches.
    """
    if not recipe.searches_on_outputs:
        return None
    if not isinstance(batches, list):
        raise DataError(
            "power_search: outputs measures each layer's inputs on calibration data: pass calib=... (tensors, "
            "batches or a DataLoader; not a forward loop), or use power_search: weights"
        )
    layers = [name for name, lp in plan.items() if lp.w_bits is not None]
    start = time.perf_counter()
    moments = input_moments(model, layers, batches)
    log.info(
        "input moments of %d layers for the power exponent search in %.1f s",
        len(layers),
        time.perf_counter() - start,
    )
    return moments


def _data_free_default(float_model: nn.Module, example_inputs: Any) -> ActRanges:
    """The data-free activation rule that measured better: BN-matched noise where the model has BatchNorm
    (EfficientNet-Lite0 W6A6: 83.6 vs 81.2 for SQuant's reference rule; CIFAR ResNets within seed noise),
    else the reference's uniform-noise rule."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in float_model.modules())
    return (
        ActRanges.BN_NOISE if has_bn and isinstance(example_inputs, torch.Tensor) else ActRanges.SQUANT_NOISE
    )


def _observer(recipe: Recipe, rule: ActRanges) -> Observer:
    """The recipe's activation observer, else the measured best for its rule and method: percentile for
    bn-noise ranges (benchmarks/results/accuracy*.md), MSE for learned rounding (min/max loses 2.5 points on
    resnet20 W4A4 and 5.2 at W2A4: benchmarks/results/default_check/), min/max otherwise."""
    if recipe.a_observer is not None:
        return recipe.a_observer
    if rule is ActRanges.BN_NOISE:
        return Observer.PERCENTILE
    return Observer.MSE if is_learned(recipe) else Observer.MINMAX


def _calibrate_activations(
    float_model: nn.Module,
    qmodel: nn.Module,
    layers: dict[str, QuantizedLayer],
    a_bits: dict[str, int],
    recipe: Recipe,
    batches: Any,
    example_inputs: Any,
) -> None:
    rule = recipe.act_ranges
    if rule is ActRanges.AUTO:
        rule = ActRanges.CALIB if batches is not None else _data_free_default(float_model, example_inputs)
    if rule is ActRanges.CALIB:
        if batches is None:
            raise DataError(
                "activation quantization with act_ranges='calib' needs calibration data: pass calib=..., "
                "or choose a data-free rule (act_ranges='squant-noise')"
            )
        calibrate_from_data(qmodel, layers, a_bits, batches, _observer(recipe, rule), recipe.a_percentile)
        return
    if example_inputs is None:
        raise DataError(
            "data-free activation ranges need example_inputs=... (one batch, for the input shape)"
        )
    if rule is ActRanges.BN_NOISE:
        ranges = bn_noise_ranges(
            float_model, a_bits, example_inputs, _observer(recipe, rule), seed=recipe.seed
        )
        for name, (lo, hi) in ranges.items():
            layers[name].act_quant = layers[name].input_quantizer(a_bits[name], lo, hi)
        return
    calibrate_reference_noise(qmodel, layers, a_bits, example_inputs, seed=recipe.seed)
