"""The power grid (docs/algorithms.md 1.2): a = 1 is the uniform grid, invariants, the exponent search, rounding."""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.errors import NonFiniteWeightError, RecipeError
from postquant.grids import (
    GridConfig,
    GridKind,
    PowerGrid,
    UniformGrid,
    fit_grid,
    fit_power_grid,
    fit_uniform_grid,
    grid_from_state,
    grid_state,
)
from postquant.model import quantized_layers
from postquant.recipe import Recipe
from postquant.rounding import squant_codes


def _laplace(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(shape, generator=g).clamp_min(1e-12))  # Exp(1)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return e * sign * 0.05


def _sse(grid, w: torch.Tensor, codes: torch.Tensor | None = None) -> float:
    codes = grid.nearest(w) if codes is None else codes
    return float((grid.dequantize(codes) - w).pow(2).sum())


@pytest.mark.parametrize("gran", ["channel", "tensor", "group"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize("range_method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exponent_one_is_the_uniform_grid_bitwise(gran, symmetric, range_method, bits):
    w = _laplace((8, 16, 3, 3), bits)
    kw = {"symmetric": symmetric, "range_method": range_method, "group_size": 48}
    uni = fit_uniform_grid(w, bits, gran, **kw)
    pow1 = fit_power_grid(w, bits, gran, exponent=1.0, **kw)
    assert torch.equal(pow1.inv_scale, uni.inv_scale) and torch.equal(pow1.zero_point, uni.zero_point)
    assert torch.equal(pow1.to_int(w), uni.to_int(w))
    q = uni.nearest(w)
    assert torch.equal(pow1.nearest(w), q)
    assert torch.equal(pow1.dequantize(q), uni.dequantize(q))
    soft = uni.to_int(w)  # non-integer codes too (learned rounding)
    assert torch.equal(pow1.dequantize(soft), uni.dequantize(soft))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    oc=st.integers(1, 6),
    n=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.floats(0.2, 1.0),
    symmetric=st.booleans(),
)
def test_nearest_codes_in_range_sign_kept_error_within_local_spacing(bits, oc, n, seed, exponent, symmetric):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(oc, n, generator=g) * torch.rand(oc, 1, generator=g) * 3
    grid = fit_power_grid(w, bits, exponent=exponent, symmetric=symmetric)
    q = grid.nearest(w)
    assert q.dtype == torch.int32 and int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    w_hat = grid.dequantize(q)
    assert torch.isfinite(w_hat).all()
    assert not ((w_hat * w) < 0).any()  # the sign of a weight never flips (0 may become 0)
    # the error is at most the spacing to a neighbouring level (past the ends: the virtual level qmin-1 or
    # qmax+1, as the rounded zero point lets x reach half a step beyond the range)
    up = grid.dequantize(q + 1) - w_hat
    down = w_hat - grid.dequantize(q - 1)
    spacing = torch.maximum(up, down)
    assert ((w_hat - w).abs() <= spacing * (1 + 1e-4) + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), exponent=st.floats(0.2, 1.0))
def test_dequantize_is_strictly_increasing_in_the_code(bits, seed, exponent):
    w = torch.randn(5, 30, generator=torch.Generator().manual_seed(seed))
    grid = fit_power_grid(w, bits, exponent=exponent)
    levels = torch.arange(grid.qmin, grid.qmax + 1, dtype=torch.float32).expand(5, -1)  # (5, 2^b)
    values = grid.dequantize(levels.contiguous())
    assert (values.diff(dim=1) > 0).all()


def test_levels_crowd_near_zero_for_small_exponents():
    w = torch.linspace(-1, 1, 33).reshape(1, -1)
    spacing = {}
    for a in (1.0, 0.5):
        grid = fit_power_grid(w, 4, exponent=a)
        levels = grid.dequantize(torch.arange(-8, 8, dtype=torch.float32).reshape(1, -1)).flatten()
        gaps = levels.diff()
        spacing[a] = (float(gaps[gaps.numel() // 2]), float(gaps[-1]))  # (near zero, at the edge)
    assert spacing[1.0][0] == pytest.approx(spacing[1.0][1], rel=1e-5)
    assert spacing[0.5][0] < 0.3 * spacing[0.5][1]


def test_zero_and_constant_rows_are_handled():
    w = torch.zeros(3, 9)
    w[1] = 0.25
    w[2] = torch.linspace(-1, 1, 9)
    for a in (0.5, None):
        grid = fit_power_grid(w, 4, exponent=a)
        w_hat = grid.dequantize(grid.nearest(w))
        assert torch.isfinite(w_hat).all()
        assert torch.equal(w_hat[0], w[0])
        assert torch.allclose(w_hat[1], w[1])


def test_dequantize_is_differentiable_in_soft_codes():
    w = _laplace((4, 20), 0)
    w[0, :5] = 0.0  # codes that dequantize to exactly 0: the gradient must stay finite
    grid = fit_power_grid(w, 3, exponent=0.5)
    x = grid.to_int(w).clone().requires_grad_(True)
    grid.dequantize(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_is_never_worse_than_uniform(bits, seed):
    w = _laplace((16, 8, 3, 3), seed)
    grid = fit_power_grid(w, bits)
    assert 0 < float(grid.exponent) <= 1
    assert _sse(grid, w) <= _sse(fit_uniform_grid(w, bits), w)


def test_search_is_strictly_better_on_laplace_weights_at_3_bits():
    w = _laplace((32, 16, 3, 3), 7)
    grid = fit_power_grid(w, 3)
    assert float(grid.exponent) < 1
    assert _sse(grid, w) < 0.85 * _sse(fit_uniform_grid(w, 3), w)


def test_search_keeps_the_candidate_of_least_error():
    w = _laplace((16, 64), 3)
    searched = fit_power_grid(w, 3, candidates=(0.4, 0.6, 0.8))
    errors = {a: _sse(fit_power_grid(w, 3, exponent=a), w) for a in (0.4, 0.6, 0.8, 1.0)}
    best = min(errors, key=errors.__getitem__)
    assert float(searched.exponent) == pytest.approx(best)
    assert _sse(searched, w) == errors[best]


def test_importance_weights_change_the_objective():
    """Output-aware search: weighting columns changes which exponent wins, and it wins on the weighted error."""
    w = _laplace((16, 64), 5)
    w[:, :8] = torch.linspace(-0.3, 0.3, 16 * 8).reshape(16, 8)  # uniform-looking columns
    imp = torch.ones(1, 64)
    imp[:, :8] = 1e4  # ...that matter most
    plain = fit_power_grid(w, 3, candidates=(0.3, 0.5, 0.7, 0.9))
    weighted = fit_power_grid(w, 3, candidates=(0.3, 0.5, 0.7, 0.9), importance=imp)

    def werr(grid):
        return float(((grid.dequantize(grid.nearest(w)) - w).pow(2) * imp).sum())

    assert werr(weighted) <= werr(plain)
    assert float(weighted.exponent) > float(plain.exponent)


def test_squant_on_a_power_grid_keeps_codes_in_range_and_lowers_channel_error_sums():
    w = _laplace((16, 8, 3, 3), 11)
    for grid in (fit_uniform_grid(w, 3), fit_power_grid(w, 3)):
        x = grid.to_int(w)
        codes = squant_codes(x, grid.qmin, grid.qmax)
        assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
        rtn_sum = (grid.nearest(w) - x).sum(dim=(1, 2, 3)).abs()
        sq_sum = (codes - x).sum(dim=(1, 2, 3)).abs()
        assert (sq_sum <= 0.5 + 1e-3).all()  # docs/algorithms.md 2.2: |channel error sum| <= 0.5
        assert sq_sum.sum() < 0.5 * rtn_sum.sum()
        assert torch.isfinite(grid.dequantize(codes)).all()


def test_with_inv_scale_changes_only_the_step():
    w = _laplace((4, 16), 0)
    grid = fit_power_grid(w, 4, exponent=0.6)
    scaled = grid.with_inv_scale(grid.inv_scale * 2)
    assert isinstance(scaled, PowerGrid)
    assert torch.equal(scaled.max_abs, grid.max_abs) and torch.equal(scaled.exponent, grid.exponent)
    assert torch.equal(scaled.inv_scale, grid.inv_scale * 2) and torch.equal(
        grid.inv_scale * 1, grid.inv_scale
    )


@pytest.mark.parametrize("kind", ["uniform", "power"])
def test_state_round_trips(kind):
    w = _laplace((6, 24), 4)
    grid = fit_grid(w, 3, kind, "group", group_size=8)
    config, tensors = grid_state(grid)
    assert config.kind == kind
    back = grid_from_state(config, tensors)
    assert type(back) is (PowerGrid if kind == "power" else UniformGrid)
    assert torch.equal(back.dequantize(back.nearest(w)), grid.dequantize(grid.nearest(w)))


def test_state_errors():
    config, tensors = grid_state(fit_power_grid(torch.randn(4, 8), 4, exponent=0.5))
    with pytest.raises(RecipeError, match="max_abs"):
        grid_from_state(config, {k: v for k, v in tensors.items() if k != "max_abs"})
    with pytest.raises(ValueError, match=r"unknown grid kind 'lloyd' \(known: uniform, power, gguf-q4_0"):
        GridConfig.model_validate({**config.model_dump(), "kind": "lloyd"})


def test_fit_grid_dispatches_on_kind():
    w = torch.randn(4, 8)
    assert isinstance(fit_grid(w, 4, GridKind.UNIFORM), UniformGrid)
    assert isinstance(fit_grid(w, 4, "power", power_exponent=0.5), PowerGrid)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, float("nan"), float("inf"), True])
def test_bad_exponent_is_a_recipe_error(bad):
    with pytest.raises(RecipeError, match=r"\(0, 1\]"):
        fit_power_grid(torch.randn(4, 8), 4, exponent=bad)
    with pytest.raises(RecipeError, match=r"\(0, 1\]"):
        fit_power_grid(torch.randn(4, 8), 4, candidates=(0.5, bad))


@pytest.mark.parametrize("exponent", [0.5, None])
def test_non_finite_weights_are_refused(exponent):
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        fit_power_grid(w, 4, exponent=exponent)


# ------------------------------------------------------------------------------------- recipe and API


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), float("inf"), "half"])
def test_recipe_refuses_a_bad_exponent(bad):
    with pytest.raises(RecipeError, match="power_exponent"):
        Recipe.coerce({"grid": "power", "power_exponent": bad})


def test_recipe_grid_fields():
    r = Recipe.coerce({"grid": "power", "power_exponent": 0.5})
    assert r.grid is GridKind.POWER and r.power_exponent == 0.5
    assert Recipe.coerce(yaml.safe_load(r.to_yaml())) == r
    assert Recipe.coerce({}).grid is GridKind.UNIFORM
    with pytest.raises(RecipeError, match="grid"):
        Recipe.coerce({"grid": "lloyd"})
    with pytest.raises(RecipeError, match="set grid: power"):
        Recipe.coerce({"power_exponent": 0.5})  # an exponent on the uniform grid would be ignored silently


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_quantize_fits_the_recipe_grid_per_layer(tiny_cnn, images, method):
    uni = postquant.quantize(tiny_cnn, {"method": method, "w_bits": 3}, example_inputs=images)
    pw = postquant.quantize(tiny_cnn, {"method": method, "w_bits": 3, "grid": "power"}, example_inputs=images)
    fixed = postquant.quantize(
        tiny_cnn,
        {"method": method, "w_bits": 3, "grid": "power", "power_exponent": 0.6},
        example_inputs=images,
    )
    for name, layer in quantized_layers(pw).items():
        assert layer.grid_config.kind == "power" and isinstance(layer.grid, PowerGrid)
        assert 0 < float(layer.grid_exponent) <= 1
        assert float(fixed.get_submodule(name).grid_exponent) == pytest.approx(0.6)
        assert int(layer.codes.min()) >= -4 and int(layer.codes.max()) <= 3
        if method == "rtn":  # the searched exponent is never worse than uniform, layer by layer
            w = uni.get_submodule(name)
            err_pw = float((layer.weight - _float_weight(tiny_cnn, images, name)).pow(2).sum())
            err_uni = float((w.weight - _float_weight(tiny_cnn, images, name)).pow(2).sum())
            assert err_pw <= err_uni * (1 + 1e-6)
    with torch.inference_mode():
        assert torch.isfinite(pw(images)).all()


def _float_weight(model, images, name):
    from postquant.model import fold_batchnorm

    folded, _ = fold_batchnorm(model, images)
    return folded.get_submodule(name).weight.detach()


def test_quantize_refuses_nan_weights_on_the_power_grid(tiny_cnn, images):
    with torch.no_grad():
        tiny_cnn.conv3.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        postquant.quantize(tiny_cnn, {"w_bits": 4, "grid": "power"}, example_inputs=images)
