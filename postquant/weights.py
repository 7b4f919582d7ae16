"""Weights to codes: a grid per planned layer, integer codes by the recipe's rounding, `QuantizedLayer`s."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from postquant.calib.data import batch_size_of, run_model
from postquant.distributed import Ranks, shard, split_work
from postquant.errors import NonFiniteWeightError, RecipeError
from postquant.grids import Grid, PowerGrid, grid_from_state, grid_state
from postquant.model import replace_module
from postquant.nn import DynamicActQuantizer, QuantizedLayer, cached_weights
from postquant.nn.layer import upcast_half
from postquant.plan import Plan
from postquant.progress import progress_bar
from postquant.recipe import Method, Recipe
from postquant.rounding import nearest_codes, squant_codes, squant_codes_many
from postquant.rounding.gptq import HessianAccumulator, affine_params, gptq_codes

__all__ = [
    "gptq_weights",
    "layer_gptq_codes",
    "quantize_weights",
    "reduce_hessians",
    "solve_gptq",
    "weight_codes",
]

log = logging.getLogger(__name__)


def weight_codes(method: Method, x: torch.Tensor, qmin: int, qmax: int, recipe: Recipe) -> torch.Tensor:
    """Integer codes for integer-domain weights `x` by the recipe's rounding method."""
    if method is Method.SQUANT:
        return squant_codes(x, qmin, qmax, recipe.squant_mode)
    return nearest_codes(x, qmin, qmax)


def quantize_weights(
    model: nn.Module,
    plan: Plan,
    recipe: Recipe,
    importance: dict[str, torch.Tensor] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, QuantizedLayer]:
    """Replace every planned layer of `model` (in place) by a `QuantizedLayer` with the recipe's codes.

    Each layer gets the recipe's grid (`recipe.grid`: uniform, or power with its exponent fixed or searched
    per layer, docs/algorithms.md 1.1-1.2; `importance` weighs the search's error per layer, see
    `power_search_importance`); the rounding method chooses codes in that grid's integer domain. Off the CPU,
    SQuant chooses the codes of layers of one shape together (`squant_codes_many`: the same codes, fewer GPU
    operations), holding at most `_BATCH_ELEMENTS` integer-domain weights at once.

    With `ranks` (a process group, `postquant.distributed`), each rank fits the grids and chooses the codes
    of a share of the layers (`split_work`, balanced by weight size) and every rank installs all of them
    (`_quantize_split`): the same grids and codes, bit for bit, as one process computes.
    """
    importance = importance or {}
    if ranks is not None:
        return _quantize_split(model, plan, recipe, importance, ranks)
    done: dict[str, QuantizedLayer] = {}
    pending: list[tuple[str, nn.Module, Any, torch.Tensor]] = []  # layers whose codes are chosen together

    def install() -> None:
        all_codes = _codes(recipe, [(g, x) for _, _, g, x in pending])
        for i, (name, layer, grid, _) in enumerate(pending):
            done[name] = _install(model, name, layer, grid, all_codes[i])
        pending.clear()

    for name, lp in progress_bar(plan.items(), total=len(plan), desc="quantize weights", unit="layer"):
        if lp.w_bits is None:
            continue
        layer = model.get_submodule(name)
        w = upcast_half(layer.weight.detach())  # grids and codes of half-precision weights in float32
        try:
            grid = recipe.weight_grid(w, lp.w_bits, importance.get(name))
        except (RecipeError, NonFiniteWeightError) as exc:  # say which layer (shape) the grid did not fit
            raise type(exc)(f"layer {name!r} (weight {tuple(w.shape)}): {exc}") from exc
        if isinstance(grid, PowerGrid):
            log.debug("%s: power grid exponent %.2f", name, float(grid.exponent))
        pending.append((name, layer, grid, grid.to_int(w)))
        if sum(x.numel() for *_, x in pending) >= _BATCH_ELEMENTS or w.device.type == "cpu":
            install()
    if pending:
        install()
    return done


def _codes(recipe: Recipe, items: list[tuple[Grid, torch.Tensor]]) -> list[torch.Tensor]:
    """The codes of integer-domain weights on their grids, by the recipe's rounding (SQuant: one
    `squant_codes_many` call per integer range)."""
    if recipe.method is not Method.SQUANT:
        return [weight_codes(recipe.method, x, g.qmin, g.qmax, recipe) for g, x in items]
    all_codes: dict[int, torch.Tensor] = {}
    ranges: dict[tuple[int, int], list[int]] = {}
    for i, (g, _) in enumerate(items):
        ranges.setdefault((g.qmin, g.qmax), []).append(i)
    for (qmin, qmax), members in ranges.items():
        xs = [items[i][1] for i in members]
        all_codes.update(zip(members, squant_codes_many(xs, qmin, qmax, recipe.squant_mode), strict=True))
    return [all_codes[i] for i in range(len(items))]


def _install(
    model: nn.Module, name: str, layer: nn.Module, grid: Grid, codes: torch.Tensor
) -> QuantizedLayer:
    qlayer = QuantizedLayer(layer, grid, codes)
    names = replace_module(model, name, qlayer)  # a shared module: every use runs the quantized layer
    if len(names) > 1:
        log.info("%s is shared (also %s): quantized once, used at every place", name, ", ".join(names[1:]))
    return qlayer


def _quantize_split(
    model: nn.Module, plan: Plan, recipe: Recipe, importance: dict[str, torch.Tensor], ranks: Ranks
) -> dict[str, QuantizedLayer]:
    """`quantize_weights` over a process group: this rank's share of the layers, then everyone's, gathered.

    Each layer's grid and codes are computed as one process computes them on the CPU (one layer at a time);
    they travel as the grid's config and tensors and the codes, so every rank installs the same bits.
    """
    names = [name for name, lp in plan.items() if lp.w_bits is not None]
    owners = split_work([model.get_submodule(n).weight.numel() for n in names], ranks.world)
    mine: dict[str, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
    for name, owner in progress_bar(
        list(zip(names, owners, strict=True)), desc="quantize weights (this rank's share)", unit="layer"
    ):
        if owner != ranks.rank:
            continue
        w = upcast_half(model.get_submodule(name).weight.detach())
        grid = recipe.weight_grid(w, plan[name].w_bits, importance.get(name))  # type: ignore[arg-type]
        (codes,) = _codes(recipe, [(grid, grid.to_int(w))])
        config, tensors = grid_state(grid)
        mine[name] = (config, {k: t.detach().cpu() for k, t in tensors.items()}, codes.cpu())
    gathered: dict[str, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
    for part in ranks.gather_objects(mine, "gathering the layers' codes"):
        gathered.update(part)
    done: dict[str, QuantizedLayer] = {}
    for name in names:
        layer = model.get_submodule(name)
        device = layer.weight.device
        config, tensors, codes = gathered[name]
        grid = grid_from_state(config, {k: t.to(device) for k, t in tensors.items()})
        done[name] = _install(model, name, layer, grid, codes.to(device))
    log.info(
        "rank %d chose the codes of %d of %d layers; all %d installed",
        ranks.rank,
        len(mine),
        len(names),
        len(names),
    )
    return done


# Integer-domain weights held at once while their codes are chosen together (float32: 1 GiB).
_BATCH_ELEMENTS = 1 << 28


class _Seen(Exception):
    """Raised by the Hessian hook once the layer has its input: the rest of the forward pass is not needed."""


def layer_hessian(
    model: nn.Module,
    name: str,
    batches: list[Any],
    warn: bool = True,
    input_quant: nn.Module | None = None,
) -> HessianAccumulator:
    """The input Hessian of layer `name` of `model` over calibration `batches`, each forward pass stopped
    once the layer has been called (the layers before it run as they are: quantized ones quantized).
    `warn`: log a warning when the layer was not called. `input_quant`: applied to the layer's input first
    (the Hessian of the inputs a layer with that input quantizer will see)."""
    layer = model.get_submodule(name)
    acc = HessianAccumulator(layer)

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        acc.add(upcast_half(input_quant(x) if input_quant is not None else x))
        raise _Seen

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            with contextlib.suppress(_Seen):
                run_model(model, batch)
    finally:
        handle.remove()
    if acc.n == 0 and warn:
        log.warning("GPTQ: %s was not called on the calibration data; it keeps nearest rounding", name)
    return acc


def reduce_hessians(accs: Sequence[HessianAccumulator], ranks: Ranks) -> None:
    """Sum the Hessians each rank accumulated on its shard of the calibration data, in one all-reduce, in
    place: ``H = sum_r n_r H_r / sum_r n_r``, the ``2/n sum x x^T`` over all the ranks' samples that one
    process accumulates (up to float64 summation order), and ``n`` the total; every rank gets the same bits."""
    if not accs:
        return
    sums = [acc.h * acc.n for acc in accs]
    counts = torch.tensor([float(acc.n) for acc in accs], dtype=torch.float64, device=sums[0].device)
    ranks.all_reduce_sum_([*sums, counts], "summing GPTQ Hessians")
    for acc, total, n in zip(accs, sums, counts.tolist(), strict=True):
        acc.n = int(n)
        acc.h = total / n if n else total


def solve_gptq(
    items: Sequence[tuple[str, torch.Tensor, HessianAccumulator, Grid]],
    recipe: Recipe,
    ranks: Ranks | None = None,
) -> dict[str, torch.Tensor]:
    """GPTQ codes of each ``(name, weight, hessian, grid)``.

    With `ranks`, each rank solves a share of the layers (`split_work`, balanced by `_solve_cost`) and the codes
    are all-gathered, so every rank holds the same codes (computed once, on one rank, from the same reduced
    Hessian), whatever the ranks' float kernels.
    """
    owners = (
        split_work([_solve_cost(acc) for _, _, acc, _ in items], ranks.world) if ranks is not None else None
    )
    mine: dict[str, torch.Tensor] = {}
    for i, (name, w, acc, grid) in enumerate(items):
        if owners is not None and owners[i] != ranks.rank:  # type: ignore[union-attr]
            continue
        try:
            s, z = affine_params(grid, w)
        except RecipeError as exc:
            raise RecipeError(f"layer {name!r} (weight {tuple(w.shape)}): {exc}") from exc
        mine[name] = layer_gptq_codes(w, acc, grid, s, z, recipe)
    if ranks is None:
        return mine
    gathered: dict[str, torch.Tensor] = {}
    for part in ranks.gather_objects({n: c.cpu() for n, c in mine.items()}, "gathering the GPTQ codes"):
        gathered.update(part)
    return {name: gathered[name].to(w.device) for name, w, _, _ in items}


def _solve_cost(acc: HessianAccumulator) -> int:
    """The relative time of one layer's `gptq_codes`: a per-column loop over the rows plus the cubic
    factorisations of H (fitted on one CPU thread: 192x576 0.19 s, 576x576 0.23 s, 1536x576 0.40 s,
    576x1536 1.54 s), per conv group."""
    layer_rows = acc.layer.weight.shape[0] // acc.groups
    cols = acc.h.shape[-1]
    return acc.groups * (cols * (layer_rows + 1000) + cols**3 // 666)


def gptq_weights(
    model: nn.Module,
    plan: Plan,
    recipe: Recipe,
    batches: list[Any],
    importance: dict[str, torch.Tensor] | None = None,
    ranks: Ranks | None = None,
    dynamic_inputs: dict[str, int] | None = None,
) -> dict[str, QuantizedLayer]:
    """Replace every planned layer of `model` (in place, in plan order) by a `QuantizedLayer` whose codes GPTQ
    chose on the recipe's grid, from the layer's inputs in the model as quantized so far (docs/algorithms.md
    2.5): each layer sees the error of the layers before it, as in GPTQ's sequential form.

    `dynamic_inputs` (layer name -> bits; recipe ``act_ranges: dynamic``): those layers' inputs are quantized per
    token at run time, so each one's Hessian is taken from its *quantized* inputs (GPTQ then minimises
    ``||(W - W_hat) Q(x)||``, the error on the inputs the layer will see) and it gets its `DynamicActQuantizer`
    at once, so later layers' Hessians see quantized activations too.

    With `ranks` (a process group, `postquant.distributed`), each rank runs its contiguous shard of the
    `batches` to accumulate each layer's Hessian, the Hessians are summed (`reduce_hessians`) and one rank
    solves the layer (`solve_gptq`): every rank installs the same codes, those of one process up to the
    float64 summation order of the Hessian.
    """
    importance = importance or {}
    if ranks is not None:
        batches = shard(ranks, batches, sum(batch_size_of(b) for b in batches))
    done: dict[str, QuantizedLayer] = {}
    with contextlib.ExitStack() as keep:  # the layers done so far run on every later layer's Hessian pass
        for name, lp in progress_bar(plan.items(), total=len(plan), desc="GPTQ", unit="layer"):
            if lp.w_bits is not None:
                bits = (dynamic_inputs or {}).get(name)
                done[name] = _gptq_layer(
                    model, name, lp.w_bits, recipe, batches, importance.get(name), ranks, bits
                )
                if bits is not None:
                    done[name].act_quant = DynamicActQuantizer(bits)
                keep.enter_context(cached_weights(done[name]))
    return done


def _gptq_layer(
    model: nn.Module,
    name: str,
    bits: int,
    recipe: Recipe,
    batches: list[Any],
    importance: torch.Tensor | None,
    ranks: Ranks | None,
    input_bits: int | None = None,
) -> QuantizedLayer:
    layer = model.get_submodule(name)
    w = upcast_half(layer.weight.detach())
    try:
        grid = recipe.weight_grid(w, bits, importance)
    except (RecipeError, NonFiniteWeightError) as exc:
        raise type(exc)(f"layer {name!r} (weight {tuple(w.shape)}): {exc}") from exc
    quant = DynamicActQuantizer(input_bits) if input_bits is not None else None
    acc = layer_hessian(model, name, batches, warn=ranks is None, input_quant=quant)
    if ranks is not None:
        reduce_hessians([acc], ranks)
        if acc.n == 0:
            log.warning("GPTQ: %s was not called on the calibration data; it keeps nearest rounding", name)
    codes = solve_gptq([(name, w, acc, grid)], recipe, ranks)[name]
    return _install(model, name, layer, grid, codes)


def layer_gptq_codes(
    w: torch.Tensor, acc: HessianAccumulator, grid: Any, s: torch.Tensor, z: torch.Tensor, recipe: Recipe
) -> torch.Tensor:
    """GPTQ codes of weight `w` (shaped like the layer's weight) on `grid` (``x = s * w - z``), each conv
    group's rows with that group's Hessian."""
    cfg = recipe.gptq_config
    rows = w.reshape(w.shape[0], -1)
    s2, z2 = s.reshape(rows.shape), z.reshape(rows.shape)
    per = rows.shape[0] // acc.groups
    parts = [
        gptq_codes(
            rows[g * per : (g + 1) * per],
            acc.h[g],
            s2[g * per : (g + 1) * per],
            z2[g * per : (g + 1) * per],
            grid.qmin,
            grid.qmax,
            damp=cfg.damp,
            act_order=cfg.act_order,
            block_size=cfg.block_size,
        )
        for g in range(acc.groups)
    ]
    return torch.cat(parts).view(w.shape)
