"""Weights to codes: a grid per planned layer, integer codes by the recipe's rounding, `QuantizedLayer`s."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from postquant.distributed import Ranks, split_work
from postquant.grids import Grid, PowerGrid, grid_from_state, grid_state
from postquant.model import replace_module
from postquant.nn import QuantizedLayer
from postquant.nn.layer import upcast_half
from postquant.plan import Plan
from postquant.progress import progress_bar
from postquant.recipe import Method, Recipe
from postquant.rounding import nearest_codes, squant_codes, squant_codes_many

__all__ = ["quantize_weights", "weight_codes"]

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
        grid = recipe.weight_grid(w, lp.w_bits, importance.get(name))
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
