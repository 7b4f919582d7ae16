"""Nearest rounding (RTN), the baseline of every comparison (docs/algorithms.md 2.1)."""

from __future__ import annotations

import torch


def nearest_codes(x: torch.Tensor, tmin: int, tmax: int) -> torch.Tensor:
    """``clamp(round_half_even(x), tmin, tmax)`` as int32 codes, for integer-domain values `x`."""
    return torch.round(x).clamp(tmin, tmax).to(torch.int32)
