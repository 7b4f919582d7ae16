"""The study of ALGORITHMS.md 2.4 and 3: each choice of learned rounding measured over seeds, one axis at a time."""

from postquant.study.axes import AXES, AXIS_NAMES, Axis, Variant, get_axis
from postquant.study.driver import study_all, study_axis
from postquant.study.report import verdict
from postquant.study.runner import (
    DEFAULT_BITS,
    StudyRunner,
    StudySettings,
    default_settings,
    parse_bits,
    plan_axis,
    variant_recipe,
)

__all__ = [
    "AXES",
    "AXIS_NAMES",
    "DEFAULT_BITS",
    "Axis",
    "StudyRunner",
    "StudySettings",
    "Variant",
    "default_settings",
    "get_axis",
    "parse_bits",
    "plan_axis",
    "study_all",
    "study_axis",
    "variant_recipe",
    "verdict",
]
