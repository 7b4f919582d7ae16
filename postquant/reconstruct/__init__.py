"""Learned rounding (AdaRound / BRECQ / QDrop family): one reconstruction loop, typed config, presets.

The config and presets (what a recipe holds) are imported with the package; the engine and the loop are
imported on first use (PEP 562), so `postquant.recipe` can hold a `LearnedConfig` without importing the
engine, which itself takes a `Recipe`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from postquant.reconstruct.config import (
    CalibSource,
    CodeRange,
    Init,
    LearnedConfig,
    Loss,
    Optimizer,
    OutputMetric,
    Schedule,
    Selection,
    UnitKind,
    Variable,
)
from postquant.reconstruct.presets import LEARNED_METHODS, PRESETS, is_learned, learned_config, preset

if TYPE_CHECKING:
    from postquant.reconstruct.engine import (
        ReconstructionReport,
        learned_rounding,
        prepare,
        reconstruct_model,
    )
    from postquant.reconstruct.loop import UnitOutcome, evaluate_unit, optimise, reconstruct_unit

_LAZY = {
    "ReconstructionReport": "postquant.reconstruct.engine",
    "learned_rounding": "postquant.reconstruct.engine",
    "prepare": "postquant.reconstruct.engine",
    "reconstruct_model": "postquant.reconstruct.engine",
    "UnitOutcome": "postquant.reconstruct.loop",
    "evaluate_unit": "postquant.reconstruct.loop",
    "optimise": "postquant.reconstruct.loop",
    "reconstruct_unit": "postquant.reconstruct.loop",
}

__all__ = [
    "LEARNED_METHODS",
    "PRESETS",
    "CalibSource",
    "CodeRange",
    "Init",
    "LearnedConfig",
    "Loss",
    "Optimizer",
    "OutputMetric",
    "ReconstructionReport",
    "Schedule",
    "Selection",
    "UnitKind",
    "UnitOutcome",
    "Variable",
    "evaluate_unit",
    "is_learned",
    "learned_config",
    "learned_rounding",
    "optimise",
    "prepare",
    "preset",
    "reconstruct_model",
    "reconstruct_unit",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'postquant.reconstruct' has no attribute {name!r}")
