"""Grids: pure tensor math that maps float values to integer codes and back."""

from postquant.grids.gguf import GGUFGrid, fit_gguf_grid
from postquant.grids.power import PowerGrid, fit_power_grid
from postquant.grids.state import Grid, GridConfig, GridKind, fit_grid, grid_from_state, grid_state
from postquant.grids.uniform import (
    Granularity,
    RangeMethod,
    UniformGrid,
    check_bits,
    fit_uniform_grid,
    signed_range,
)

__all__ = [
    "GGUFGrid",
    "Granularity",
    "Grid",
    "GridConfig",
    "GridKind",
    "PowerGrid",
    "RangeMethod",
    "UniformGrid",
    "check_bits",
    "fit_gguf_grid",
    "fit_grid",
    "fit_power_grid",
    "fit_uniform_grid",
    "grid_from_state",
    "grid_state",
    "signed_range",
]
