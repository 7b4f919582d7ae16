"""Grids: pure tensor math that maps float values to integer codes and back."""

from postquant.grids.uniform import (
    Granularity,
    RangeMethod,
    UniformGrid,
    check_bits,
    fit_uniform_grid,
    grid_from_state,
    grid_state,
    signed_range,
)

__all__ = [
    "Granularity",
    "RangeMethod",
    "UniformGrid",
    "check_bits",
    "fit_uniform_grid",
    "grid_from_state",
    "grid_state",
    "signed_range",
]
