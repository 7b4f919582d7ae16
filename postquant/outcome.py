"""`QuantizationResult`: what one `quantize` call decided and measured, reachable from the quantized model
through `result(qmodel)` (one documented accessor instead of attributes hung on the module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from postquant.calib.act_ranges import ActRanges
from postquant.calib.observers import Observer
from postquant.plan import Plan
from postquant.recipe import Recipe

if TYPE_CHECKING:  # annotations only: the stages that make them import this module
    from postquant.mixed.apply import MixedResult
    from postquant.reconstruct.engine import ReconstructionReport

__all__ = ["QuantizationResult", "attach_result", "find_result", "result"]

_RESULT_ATTR = "_postquant_result"


@dataclass
class QuantizationResult:
    """What one `quantize` call decided and measured; `result(qmodel)` returns it.

    Attributes:
        recipe: the effective recipe (preset policies and the mixed allocation written in as overrides), so
            quantizing with it again reproduces the model; it is what a checkpoint saves. None only for a
            checkpoint whose recipe this postquant version cannot read.
        plan: the frozen per-layer plan, each choice with its source (`postquant.plan.Source`).
        seconds: wall time per stage, in the order the stages ran.
        mixed: the mixed-precision allocation, when the recipe asked for one.
        learned: per-unit outcomes of learned rounding, when the method learns.
        model_name: the name a checkpoint records for its float model (zoo name or ``module:factory``).
        act_ranges: the activation-range rule that ran (``auto`` resolved), None without input quantizers.
        act_observer: the observer of that rule (None for the reference noise rule, which has its own).
    """

    recipe: Recipe | None
    plan: Plan
    seconds: dict[str, float] = field(default_factory=dict)
    mixed: MixedResult | None = None
    learned: ReconstructionReport | None = None
    model_name: str | None = None
    act_ranges: ActRanges | None = None
    act_observer: Observer | None = None


def result(qmodel: nn.Module) -> QuantizationResult:
    """The `QuantizationResult` of a model returned by `postquant.quantize` or `postquant.load`.

    Raises:
        TypeError: `qmodel` did not come from `quantize` or `load`.
    """
    found = qmodel.__dict__.get(_RESULT_ATTR) if isinstance(qmodel, nn.Module) else None
    if not isinstance(found, QuantizationResult):
        raise TypeError(
            f"this {type(qmodel).__name__} carries no quantization result: pass a model returned by "
            "postquant.quantize or postquant.load"
        )
    return found


def attach_result(qmodel: nn.Module, outcome: QuantizationResult) -> None:
    """Make `outcome` reachable through `result(qmodel)` (it is copied with the module by deepcopy)."""
    qmodel.__dict__[_RESULT_ATTR] = outcome


def find_result(qmodel: nn.Module) -> QuantizationResult | None:
    """`result(qmodel)`, or None for a model without one."""
    found = qmodel.__dict__.get(_RESULT_ATTR)
    return found if isinstance(found, QuantizationResult) else None
