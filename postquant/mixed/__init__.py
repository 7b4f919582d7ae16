"""Importance-based mixed precision: importance tables, the exact bit allocator, typed config.

The pure parts are exported here. The model plumbing lives in `postquant.mixed.importance` (cost tables),
`postquant.mixed.apply` (called by `postquant.quantize`) and `postquant.mixed.report` (table, plot, JSON);
import them from their modules: `postquant.recipe` holds a `MixedConfig`, and importing it must not import
the plumbing, which takes a `Recipe`.
"""

from postquant.mixed.allocate import allocate_bits, budget_table, solve_knapsack
from postquant.mixed.config import DEFAULT_BIT_CHOICES, Importance, MixedConfig, parse_size
from postquant.mixed.size import codes_bytes, float_tensor_bytes, grid_bytes, model_bytes, stored_bytes

__all__ = [
    "DEFAULT_BIT_CHOICES",
    "Importance",
    "MixedConfig",
    "allocate_bits",
    "budget_table",
    "codes_bytes",
    "float_tensor_bytes",
    "grid_bytes",
    "model_bytes",
    "parse_size",
    "solve_knapsack",
    "stored_bytes",
]
