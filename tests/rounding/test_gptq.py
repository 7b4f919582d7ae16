"""GPTQ: nearest rounding when inputs are uncorrelated, lower output error than nearest rounding when they are
correlated, the same codes for any lazy-update block size, Hessians of convolutions, and the pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import postquant
from postquant.errors import DataError, RecipeError
from postquant.eval import sqnr_db
from postquant.grids import GridKind, fit_grid
from postquant.grids.uniform import Granularity
from postquant.rounding.gptq import HessianAccumulator, affine_params, gptq_codes


def _grid(w: torch.Tensor, bits: int = 3, granularity: Granularity = Granularity.CHANNEL):
    grid = fit_grid(w, bits, GridKind.UNIFORM, granularity, group_size=8)
    s, z = affine_params(grid, w)
    return grid, s, z


def _output_error(w: torch.Tensor, deq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - deq).T) ** 2).sum())


@given(st.integers(0, 2**31 - 1), st.sampled_from([Granularity.CHANNEL, Granularity.GROUP]))
@settings(max_examples=25, deadline=None)
def test_a_diagonal_hessian_gives_nearest_rounding(seed: int, granularity: Granularity) -> None:
    """Uncorrelated inputs: no column's error can be compensated on another, so GPTQ is nearest rounding."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 16, generator=gen)
    grid, s, z = _grid(w, granularity=granularity)
    h = torch.diag(torch.rand(16, generator=gen, dtype=torch.float64) + 0.1)
    codes = gptq_codes(w, h, s, z, grid.qmin, grid.qmax, block_size=5)
    nearest = torch.round(grid.to_int(w)).clamp(grid.qmin, grid.qmax).to(torch.int32)
    assert torch.equal(codes, nearest)


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_block_size_does_not_change_the_codes(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 24, generator=gen)
    x = torch.randn(200, 24, generator=gen) @ torch.randn(24, 24, generator=gen)
    grid, s, z = _grid(w)
    h = (2 * x.T @ x / len(x)).double()
    one = gptq_codes(w, h, s, z, grid.qmin, grid.qmax, block_size=1)
    lazy = gptq_codes(w, h, s, z, grid.qmin, grid.qmax, block_size=7)
    assert (one != lazy).float().mean() <= 0.01  # float rounding of the update order only


@pytest.mark.parametrize("act_order", [False, True])
def test_correlated_inputs_lower_the_output_error_below_nearest_rounding(act_order: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    grid, s, z = _grid(w)
    h = (2 * x.T @ x / len(x)).double()
    codes = gptq_codes(w, h, s, z, grid.qmin, grid.qmax, act_order=act_order)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    nearest = torch.round(grid.to_int(w)).clamp(grid.qmin, grid.qmax).to(torch.int32)
    gptq_err = _output_error(w, grid.dequantize(codes), x)
    rtn_err = _output_error(w, grid.dequantize(nearest), x)
    assert gptq_err < 0.8 * rtn_err


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_hessian_is_that_of_its_receptive_fields(groups: int) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups)
    x = torch.randn(5, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(conv)
    for part in x.split(2):
        acc.add(part)
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 4 * 9).double()
    per = 4 // groups * 9
    for g in range(groups):
        c = cols[:, g * per : (g + 1) * per]
        torch.testing.assert_close(acc.h[g], 2 * c.T @ c / len(c))
    assert acc.n == len(cols)
    one = HessianAccumulator(conv)
    one.add(x[0])  # an unbatched call: one sample
    torch.testing.assert_close(one.h, _hessian_of(conv, x[:1]).h)


def _hessian_of(layer: nn.Module, x: torch.Tensor) -> HessianAccumulator:
    acc = HessianAccumulator(layer)
    acc.add(x)
    return acc


def test_a_power_grid_is_refused() -> None:
    w = torch.randn(4, 8)
    grid = fit_grid(w, 3, GridKind.POWER, Granularity.CHANNEL, power_exponent=0.5)
    with pytest.raises(RecipeError, match="affine grid"):
        affine_params(grid, w)
    with pytest.raises(RecipeError, match="grid uniform"):
        postquant.Recipe.coerce({"method": "gptq", "grid": "power"})
    with pytest.raises(RecipeError, match="apply to method gptq"):
        postquant.Recipe.coerce({"method": "rtn", "gptq": {"damp": 0.1}})


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).eval()


def test_quantize_with_gptq_beats_nearest_rounding_and_needs_data() -> None:
    model = _model()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    calib = list(x.split(16))
    ref = model(x)
    rtn = postquant.quantize(model, {"method": "rtn", "w_bits": 3}, calib=calib)
    gptq = postquant.quantize(model, {"method": "gptq", "w_bits": 3}, calib=calib)
    assert float(sqnr_db(ref, gptq(x))) > float(sqnr_db(ref, rtn(x))) + 1.0
    assert postquant.requirements(postquant.Recipe(method="gptq")).calib.value == "required"
    with pytest.raises(DataError, match="gptq"):
        postquant.quantize(model, {"method": "gptq", "w_bits": 3})
    saved = postquant.result(gptq).recipe
    assert saved.method.value == "gptq" and "gptq" not in postquant.Recipe().model_dump()
