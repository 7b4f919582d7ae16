"""Grid kinds as data: choosing, fitting, saving and rebuilding a grid by its kind."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from postquant.choices import GridKind
from postquant.errors import RecipeError
from postquant.grids.gguf import GGUFGrid, fit_gguf_grid, gguf_kind_for_bits
from postquant.grids.power import PowerGrid, fit_power_grid
from postquant.grids.uniform import Granularity, RangeMethod, UniformGrid, fit_uniform_grid

Grid = UniformGrid | PowerGrid | GGUFGrid
"""Any weight grid: ``to_int``, ``dequantize``, ``nearest``, ``clamp``, ``with_inv_scale``, ``qmin``/``qmax``,
``bits``, ``granularity``, ``group_size``, ``inv_scale`` and ``zero_point`` (G, 1)."""


def fit_grid(
    w: torch.Tensor,
    bits: int,
    kind: GridKind | str = GridKind.UNIFORM,
    granularity: Granularity | str = Granularity.CHANNEL,
    *,
    power_exponent: float | None = None,
    importance: torch.Tensor | None = None,
    symmetric: bool = False,
    range_method: RangeMethod | str = RangeMethod.MINMAX,
    group_size: int = 128,
) -> Grid:
    """Fit a grid of `kind` to weight `w` (`fit_uniform_grid`, `fit_power_grid` or `fit_gguf_grid`).

    `power_exponent` is the power grid's exponent (None: searched per layer, on the weight error weighted
    by `importance` if given, e.g. `postquant.calib.moments.input_moments`); a uniform grid ignores both.
    A GGUF kind fixes the granularity (blocks of 32 inputs) and the symmetry; `bits` picks the format
    (`gguf_kind_for_bits`: the kind's own width, or Q8_0 at 8 bits, Q4_0 at 4).
    """
    kind = GridKind(kind)
    if kind.is_gguf:
        return fit_gguf_grid(w, gguf_kind_for_bits(kind, bits), range_method)
    common = {"symmetric": symmetric, "range_method": range_method, "group_size": group_size}
    if kind is GridKind.POWER:
        return fit_power_grid(  # type: ignore[arg-type]
            w, bits, granularity, exponent=power_exponent, importance=importance, **common
        )
    return fit_uniform_grid(w, bits, granularity, **common)  # type: ignore[arg-type]


class GridConfig(BaseModel):
    """What a grid is apart from its tensors: its kind, bits, granularity and group size.

    A `QuantizedLayer` keeps it (``grid_config``) and a checkpoint's manifest records it per layer, as
    ``{"kind", "bits", "granularity", "group_size"}``.
    """

    model_config = ConfigDict(frozen=True)

    kind: GridKind
    bits: int
    granularity: Granularity
    group_size: int

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> Any:
        if value not in {k.value for k in GridKind}:
            known = ", ".join(k.value for k in GridKind)
            raise ValueError(
                f"unknown grid kind {value!r} (known: {known}); was it saved by a newer postquant?"
            )
        return value


def grid_state(grid: Grid) -> tuple[GridConfig, dict[str, torch.Tensor]]:
    """Split a grid into its config and its tensors (for saving and for module buffers)."""
    if isinstance(grid, GGUFGrid):
        kind = grid.kind
    else:
        kind = GridKind.POWER if isinstance(grid, PowerGrid) else GridKind.UNIFORM
    config = GridConfig(kind=kind, bits=grid.bits, granularity=grid.granularity, group_size=grid.group_size)
    tensors = {"inv_scale": grid.inv_scale, "zero_point": grid.zero_point}
    if isinstance(grid, PowerGrid):
        tensors |= {"max_abs": grid.max_abs, "exponent": grid.exponent}
    if isinstance(grid, GGUFGrid):
        tensors["offset"] = grid.offset
    return config, tensors


def grid_from_state(config: GridConfig, tensors: dict[str, torch.Tensor]) -> Grid:
    """Rebuild a grid written by `grid_state`.

    Raises:
        RecipeError: a tensor the grid's kind needs is missing.
    """
    try:
        if config.kind.is_gguf:
            return GGUFGrid(
                tensors["inv_scale"], tensors["zero_point"], tensors["offset"], config.kind, config.bits
            )
        if config.kind is GridKind.POWER:
            return PowerGrid(
                tensors["inv_scale"],
                tensors["zero_point"],
                tensors["max_abs"],
                tensors["exponent"],
                config.bits,
                config.granularity,
                config.group_size,
            )
        return UniformGrid(
            tensors["inv_scale"], tensors["zero_point"], config.bits, config.granularity, config.group_size
        )
    except KeyError as exc:
        raise RecipeError(
            f"a {config.kind.value} grid needs the tensor {exc.args[0]!r}; the saved grid is incomplete"
        ) from None
