"""Learned rounding (AdaRound / BRECQ / QDrop family): one reconstruction loop, typed config, presets."""

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
from postquant.reconstruct.engine import (
    ReconstructionReport,
    is_learned,
    learned_config,
    learned_rounding,
    prepare,
    reconstruct_model,
)
from postquant.reconstruct.loop import UnitOutcome, evaluate_unit, optimise, reconstruct_unit
from postquant.reconstruct.presets import LEARNED_METHODS, PRESETS, preset

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
