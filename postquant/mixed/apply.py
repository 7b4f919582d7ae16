"""Mixed precision inside `postquant.quantize`: importance table -> exact allocation -> per-layer overrides.

The allocation becomes data: one ``overrides`` entry per allocated layer (its exact name -> ``w_bits``),
appended to the recipe's own overrides, so the plan, the saved recipe and the checkpoint all record it.
Layers whose weight bits the recipe already pins (an override setting ``w_bits``, e.g. 8-bit first/last
layers of a learned-rounding preset) keep them and count in the budget; layers kept float (``w_bits:
null``, or ignored) are outside the budget.

The returned recipe keeps ``mixed`` for the record. Quantizing with it again reproduces the allocation: its
per-layer overrides now pin every layer, so nothing is re-allocated and only the budget is checked. To
allocate again (another budget or importance), start from the recipe without those overrides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from postquant.distributed import Ranks
from postquant.grids import Grid
from postquant.mixed.allocate import allocate_bits, budget_table
from postquant.mixed.config import MixedConfig
from postquant.mixed.importance import fit_weight_grid, importance_table
from postquant.mixed.size import codes_bytes, float_tensor_bytes, grid_bytes
from postquant.plan import Plan, Source
from postquant.recipe import LayerOverride, Recipe

__all__ = ["LayerAllocation", "MixedResult", "apply_mixed", "free_and_fixed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerAllocation:
    """One layer of an allocation: its weights, chosen bits, predicted cost and the whole cost row."""

    name: str
    numel: int
    bits: int
    cost: float  # predicted damage at `bits` (0 for a fixed layer)
    fixed: bool  # bits pinned by the recipe, not chosen
    costs: dict[int, float] = field(default_factory=dict)  # bits -> predicted damage


@dataclass
class MixedResult:
    """The outcome of mixed precision: ``postquant.result(qmodel).mixed``."""

    importance: str
    w_bits_budget: float | None
    size_budget: int | None
    layers: list[LayerAllocation]
    avg_w_bits: float  # sum n_l b_l / sum n_l over the layers in the budget
    size_bytes: int  # bytes of the checkpoint's tensors (`postquant.mixed.size`), without file headers
    objective: float  # sum of the chosen costs
    seconds: float

    @property
    def bits(self) -> dict[str, int]:
        """Layer name -> weight bits."""
        return {row.name: row.bits for row in self.layers}

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (``allocation.json``)."""
        data = asdict(self)
        data["layers"] = [
            {**row, "costs": {str(b): c for b, c in row["costs"].items()}} for row in data["layers"]
        ]
        return data


def free_and_fixed(plan: Plan) -> tuple[list[str], dict[str, int]]:
    """Layers whose bits follow the recipe's ``w_bits`` (free to allocate), and layers pinned by overrides."""
    return list(plan.by_source(Source.DEFAULT)), plan.by_source(Source.OVERRIDE)


def _layer_nbytes(numel: int, grids: dict[int, Grid]) -> dict[int, int]:
    """Bytes of one layer in a checkpoint at each bit width: packed codes plus its fitted grid."""
    return {b: codes_bytes(numel, b) + grid_bytes(grid) for b, grid in grids.items()}


def apply_mixed(
    model: nn.Module,
    recipe: Recipe,
    plan: Plan,
    batches: Any,
    search: dict[str, torch.Tensor] | None = None,
    ranks: Ranks | None = None,
) -> tuple[Recipe, MixedResult]:
    """Allocate weight bits per layer for ``recipe.mixed`` and return the recipe with those overrides.

    Args:
        model: the float model as it will be quantized (BatchNorm folded); not modified.
        recipe: a recipe with ``mixed`` set.
        plan: the recipe's plan for `model` (`postquant.plan.make_plan`).
        batches: calibration batches (a list), or None for ``importance='datafree'``.
        search: per-layer error factors of the power exponent search (the pipeline's search stage),
            so that the grids measured here are the grids `quantize` installs.
        ranks: the process group: the importance measure is split over its ranks, and every rank gets the
            same table, hence the same allocation (`importance_table`).

    Returns:
        (recipe with one ``overrides`` entry per allocated layer, the `MixedResult`).
    """
    cfg: MixedConfig = recipe.mixed  # type: ignore[assignment]
    start = time.perf_counter()
    free, fixed = free_and_fixed(plan)
    names = [name for name in plan if name in fixed or name in free]
    weights = {name: model.get_submodule(name).weight for name in names}
    numel = {name: w.numel() for name, w in weights.items()}
    grids = {  # fitted once: the size model and the importance measures share them
        name: {
            b: fit_weight_grid(w.detach(), b, recipe, (search or {}).get(name))
            for b in ([fixed[name]] if name in fixed else cfg.bit_choices)
        }
        for name, w in weights.items()
    }
    nbytes = {name: _layer_nbytes(numel[name], grids[name]) for name in names}
    act_bytes = 8 * sum(1 for lp in plan.values() if lp.a_bits is not None)
    other = float_tensor_bytes(model, names) + act_bytes  # float tensors + input quantizers
    budget = {
        "w_bits_budget": cfg.w_bits_budget,
        "size_budget": cfg.size_budget,
        "fixed": {name: fixed[name] for name in names if name in fixed},
        "nbytes": nbytes,
        "other_bytes": other,
    }
    budget_table(numel, cfg.bit_choices, **budget)  # a budget error before minutes of measuring
    costs = importance_table(
        model,
        free,
        cfg.bit_choices,
        recipe,
        cfg.importance,
        batches,
        cfg.calib_size,
        grids,
        cfg.checkpoint_dir,
        ranks,
    )
    bits = allocate_bits(costs, numel, cfg.bit_choices, **budget)
    rows = [
        LayerAllocation(
            n, numel[n], bits[n], costs.get(n, {}).get(bits[n], 0.0), n in fixed, costs.get(n, {})
        )
        for n in names
    ]
    total = sum(numel.values())
    result = MixedResult(
        importance=cfg.importance.value,
        w_bits_budget=cfg.w_bits_budget,
        size_budget=cfg.size_budget,
        layers=rows,
        avg_w_bits=sum(numel[n] * bits[n] for n in names) / total,
        size_bytes=other + sum(nbytes[n][bits[n]] for n in names),
        objective=sum(row.cost for row in rows),
        seconds=time.perf_counter() - start,
    )
    overrides = dict(recipe.overrides)
    for n in free:  # an exact-name override that set other fields keeps them
        old = overrides.get(n)
        fields = old.model_dump(include=old.model_fields_set) if old is not None else {}
        overrides[n] = LayerOverride(**{**fields, "w_bits": bits[n]})
    log.info(
        "mixed precision (%s importance): %.3f average weight bits, %d bytes, bits %s, in %.1f s",
        result.importance,
        result.avg_w_bits,
        result.size_bytes,
        _histogram(rows),
        result.seconds,
    )
    return recipe.model_copy(update={"overrides": overrides}), result


def _histogram(rows: list[LayerAllocation]) -> str:
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.bits] = counts.get(row.bits, 0) + 1
    return ", ".join(f"{n} layers at {b}" for b, n in sorted(counts.items()))
