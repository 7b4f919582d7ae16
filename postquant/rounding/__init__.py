"""Rounding methods: pure functions from integer-domain values to integer codes on a grid."""

from postquant.rounding.nearest import nearest_codes
from postquant.rounding.squant import SquantMode, squant_codes, squant_codes_many

__all__ = ["SquantMode", "nearest_codes", "squant_codes", "squant_codes_many"]
