"""`MixedConfig`: the typed settings of importance-based mixed precision (docs/algorithms.md 3)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from postquant.choices import Importance

__all__ = ["DEFAULT_BIT_CHOICES", "Importance", "MixedConfig", "parse_size"]

DEFAULT_BIT_CHOICES = (2, 3, 4, 6, 8)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"2MB"``, ``"500KB"``, ``"1.5 MiB"`` or ``"123456"``.

    KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"a size is a number of bytes or a string like '2MB', not {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(
                f"cannot read the size {value!r}: write a number of bytes or a number with a unit "
                f"({', '.join(u for u in _UNITS if u)}), e.g. '2MB' or '500KB'"
            )
        number, unit = float(m.group(1)), m.group(2).upper()
    else:
        raise ValueError(f"a size is a number of bytes or a string like '2MB', not {type(value).__name__}")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size budget must be positive, got {value!r}")
    return size


class MixedConfig(BaseModel):
    """Mixed precision: choose weight bits per layer from `bit_choices` under exactly one budget.

    The allocation minimises the summed predicted damage ``sum_l cost[l, b_l]`` (`importance`) exactly
    (`postquant.mixed.allocate`), and becomes per-layer ``overrides`` of the recipe.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    w_bits_budget: float | None = Field(
        default=None, gt=0, description="average weight bits, weighted by each layer's number of weights"
    )
    size_budget: int | None = Field(
        default=None, description="model size in bytes (accepts '2MB', '500KB', '1.5MiB')"
    )
    bit_choices: list[int] = Field(default_factory=lambda: list(DEFAULT_BIT_CHOICES))
    importance: Importance = Importance.LOSS
    calib_size: int = Field(default=64, ge=1, description="calibration samples for the importance measure")
    checkpoint_dir: Path | None = Field(
        default=None,
        description="save the measured importance here layer by layer: an interrupted measurement resumes, "
        "and the same model, data and grids reuse it (another budget allocates in no time)",
    )

    @field_validator("size_budget", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)

    @field_validator("bit_choices")
    @classmethod
    def _choices(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"bit choices must be integers from 2 to 8, got {bad}")
        if not v:
            raise ValueError("bit_choices is empty: give at least one bit width, e.g. [2, 3, 4, 6, 8]")
        return sorted(set(v))

    @model_validator(mode="after")
    def _one_budget(self) -> MixedConfig:
        if (self.w_bits_budget is None) == (self.size_budget is None):
            raise ValueError(
                "set exactly one budget: w_bits_budget (average weight bits, e.g. 3.0) or size_budget "
                "(bytes, e.g. '2MB')"
            )
        return self
