"""The study of docs/algorithms.md 2.4 and 3: each choice of learned rounding measured over seeds, one axis at a time."""

from postquant_lab.study.axes import AXES, AXIS_NAMES, Axis, Variant, get_axis
from postquant_lab.study.driver import AxisReport, study_all, study_axis
from postquant_lab.study.report import verdict
from postquant_lab.study.runner import StudyRunner, plan_axis, variant_recipe
from postquant_lab.study.settings import DEFAULT_BITS, StudySettings, default_settings, parse_bits

__all__ = [
    "AXES",
    "AXIS_NAMES",
    "DEFAULT_BITS",
    "Axis",
    "AxisReport",
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
