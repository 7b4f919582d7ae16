"""The plan: which layer gets which bits, and where each choice came from (default, override, mixed).

`make_plan` resolves a recipe once; stages read the frozen `Plan` and return updates (`Plan.with_w_bits`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

import torch
from torch import nn

from postquant.errors import NonFiniteWeightError, UnsupportedModelError
from postquant.model import matches, quantizable_layers
from postquant.recipe import Recipe


class Source(StrEnum):
    """Where a layer's bits came from."""

    DEFAULT = "default"  # the recipe's w_bits / a_bits
    OVERRIDE = (
        "override"  # an ``overrides`` pattern of the recipe (or of its learned preset's first/last policy)
    )
    MIXED = "mixed"  # the mixed-precision allocation


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: weight bits (None: stays float), input bits (None: float input), and where
    each came from."""

    name: str
    w_bits: int | None
    a_bits: int | None
    w_source: Source = Source.DEFAULT
    a_source: Source = Source.DEFAULT


class Plan(Mapping[str, LayerPlan]):
    """The frozen plan: layer name -> `LayerPlan`, in registration order. Updates return a new plan."""

    def __init__(self, layers: Iterable[LayerPlan]) -> None:
        self._layers = {lp.name: lp for lp in layers}  # read-only through Mapping; updates copy

    def __getitem__(self, name: str) -> LayerPlan:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Plan({list(self._layers.values())!r})"

    def with_w_bits(self, bits: Mapping[str, int], source: Source = Source.MIXED) -> Plan:
        """A copy whose layers in `bits` get those weight bits, recorded as coming from `source`."""
        unknown = [name for name in bits if name not in self._layers]
        if unknown:
            raise KeyError(f"not in the plan: {', '.join(unknown)}")
        return Plan(
            replace(lp, w_bits=bits[lp.name], w_source=source) if lp.name in bits else lp
            for lp in self._layers.values()
        )

    def by_source(self, source: Source) -> dict[str, int]:
        """Quantized layers whose weight bits came from `source`: name -> bits."""
        return {
            lp.name: lp.w_bits
            for lp in self._layers.values()
            if lp.w_bits is not None and lp.w_source is source
        }

    @property
    def weight_layers(self) -> list[str]:
        """Names of the layers whose weights are quantized."""
        return [lp.name for lp in self._layers.values() if lp.w_bits is not None]


def make_plan(model: nn.Module, recipe: Recipe) -> Plan:
    """Resolve the recipe against the model's layers, in registration order.

    Overrides apply in the order written; ``@first``/``@last`` name the first/last quantizable layer.
    """
    layers = quantizable_layers(model, recipe.ignore)
    if not layers:
        found = quantizable_layers(model)
        why = (
            f"all {len(found)} Conv/Linear layers are excluded by ignore={recipe.ignore}"
            if found
            else "it has no Conv1d, Conv2d or Linear layer (subclasses count)"
        )
        raise UnsupportedModelError(f"nothing to quantize in {type(model).__name__}: {why}")
    names = list(layers)
    plan: list[LayerPlan] = []
    for i, (name, module) in enumerate(layers.items()):
        w_bits: int | None = recipe.w_bits
        a_bits: int | None = recipe.a_bits
        w_source = a_source = Source.DEFAULT
        for pattern, override in recipe.overrides.items():
            hit = (
                (pattern == "@first" and i == 0)
                or (pattern == "@last" and name == names[-1])
                or (not pattern.startswith("@") and matches(name, module, pattern))
            )
            if not hit:
                continue
            if "w_bits" in override.model_fields_set:
                w_bits, w_source = override.w_bits, Source.OVERRIDE
            if "a_bits" in override.model_fields_set:
                a_bits = override.a_bits if recipe.a_bits is not None or override.a_bits is None else None
                a_source = Source.OVERRIDE
        plan.append(LayerPlan(name, w_bits, a_bits, w_source, a_source))
    return Plan(plan)


def check_finite(model: nn.Module, names: list[str]) -> None:
    """Raise `NonFiniteWeightError` naming every layer whose weight or bias holds NaN/Inf."""
    bad = []
    for name in names:
        layer = model.get_submodule(name)
        for pname, p in layer.named_parameters(recurse=False):
            if not torch.isfinite(p).all():
                bad.append(f"{name}.{pname}")
    if bad:
        raise NonFiniteWeightError(
            f"non-finite (NaN/Inf) values in {', '.join(bad)}; the float model is broken: fix or re-train "
            "these layers, or exclude them with ignore=[...]"
        )
