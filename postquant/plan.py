"""The plan: which layer gets which bits. Per-layer choices are data (an ordered map of patterns)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from postquant.errors import NonFiniteWeightError, UnsupportedModelError
from postquant.model import matches, quantizable_layers
from postquant.recipe import Recipe


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: weight bits (None: stays float) and input bits (None: float input)."""

    name: str
    w_bits: int | None
    a_bits: int | None


def make_plan(model: nn.Module, recipe: Recipe) -> dict[str, LayerPlan]:
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
    plan: dict[str, LayerPlan] = {}
    for i, (name, module) in enumerate(layers.items()):
        w_bits: int | None = recipe.w_bits
        a_bits: int | None = recipe.a_bits
        for pattern, override in recipe.overrides.items():
            hit = (
                (pattern == "@first" and i == 0)
                or (pattern == "@last" and name == names[-1])
                or (not pattern.startswith("@") and matches(name, module, pattern))
            )
            if not hit:
                continue
            if "w_bits" in override.model_fields_set:
                w_bits = override.w_bits
            if "a_bits" in override.model_fields_set:
                a_bits = override.a_bits if recipe.a_bits is not None or override.a_bits is None else None
        plan[name] = LayerPlan(name, w_bits, a_bits)
    return plan


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
