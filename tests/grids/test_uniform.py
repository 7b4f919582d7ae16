from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.errors import NonFiniteWeightError, RecipeError
from postquant.grids import Granularity, fit_grid, fit_uniform_grid
from postquant.model import quantized_layers
from tests.conftest import make_tiny_llama, require_shared


def _golden_tensors():
    folder = require_shared("golden", "squant")
    for path in sorted(folder.glob("*.npz")):
        d = np.load(path)
        for tid in sorted({str(t) for t in d["index/tensor"]}):
            key = f"{tid}/w" if f"{tid}/w" in d.files else str(d[f"{tid}/w_same_as"]) + "/w"
            yield f"{path.stem}:{tid}", d, tid, d[key]


def test_reference_grid_matches_golden_bitwise():
    """docs/algorithms.md 1.1: S, Z and x = S*w - Z equal the reference's float32 values for every golden tensor."""
    mismatches, n = [], 0
    for case, d, tid, w in _golden_tensors():
        bits = int(d[f"{tid}/bits"])
        grid = fit_uniform_grid(torch.from_numpy(w), bits)
        x = grid.to_int(torch.from_numpy(w))
        n += 1
        if not (
            torch.equal(grid.inv_scale.flatten(), torch.from_numpy(d[f"{tid}/scale"]))
            and torch.equal(grid.zero_point.flatten(), torch.from_numpy(d[f"{tid}/zero_point"]))
            and torch.equal(x, torch.from_numpy(d[f"{tid}/x"]))
        ):
            mismatches.append(case)
    assert n >= 100
    assert mismatches == []


@pytest.mark.parametrize("gran", ["channel", "tensor", "group"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_round_trip_error_is_at_most_half_a_step(gran, symmetric, bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 16, 3, 3)
    grid = fit_uniform_grid(w, bits, gran, symmetric=symmetric, group_size=48)
    q = grid.nearest(w)
    assert q.dtype == torch.int32 and q.shape == w.shape
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    w_hat = grid.dequantize(q)
    step = (1 / grid.inv_scale).reshape(-1, 1)
    rows = (w_hat - w).reshape(step.shape[0], -1)
    assert (rows.abs() <= step / 2 + 1e-5).all()


def test_granularity_shapes():
    w = torch.randn(4, 64)
    assert fit_uniform_grid(w, 4, "channel").inv_scale.shape == (4, 1)
    assert fit_uniform_grid(w, 4, "tensor").inv_scale.shape == (1, 1)
    assert fit_uniform_grid(w, 4, "group", group_size=16).inv_scale.shape == (16, 1)


def test_group_size_must_divide_inputs():
    with pytest.raises(RecipeError, match="does not divide"):
        fit_uniform_grid(torch.randn(4, 30), 4, Granularity.GROUP, group_size=16)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0])
def test_bits_out_of_range(bits):
    with pytest.raises(RecipeError, match="2 to 8"):
        fit_uniform_grid(torch.randn(4, 4), bits)


def test_non_finite_weights_are_refused():
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        fit_uniform_grid(w, 4)


def test_mse_range_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    w[:, 0] = 8.0  # an outlier per channel: clipping it pays off
    for bits in (2, 3, 4):
        err = {}
        for method in ("minmax", "mse"):
            g = fit_uniform_grid(w, bits, range_method=method)
            err[method] = (g.dequantize(g.nearest(w)) - w).pow(2).sum(dim=1)
        assert (err["mse"] <= err["minmax"] + 1e-6).all()
        assert err["mse"].sum() < 0.9 * err["minmax"].sum()


@pytest.mark.parametrize(
    "fit", [{}, {"granularity": "group", "group_size": 32, "range_method": "lp"}], ids=["minmax", "lp"]
)
def test_constant_and_zero_channels_are_finite(fit):
    w = torch.zeros(3, 64)
    w[1] = 0.25
    w[2, :32] = torch.linspace(-1, 1, 32)
    g = fit_uniform_grid(w, 4, **fit)
    w_hat = g.dequantize(g.nearest(w))
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[0], w[0])
    assert torch.allclose(w_hat[1], w[1])


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    oc=st.integers(1, 6),
    n=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    symmetric=st.booleans(),
)
def test_codes_in_range_and_dequantize_inverts_to_int(bits, oc, n, seed, symmetric):
    g_ = torch.Generator().manual_seed(seed)
    w = torch.randn(oc, n, generator=g_) * torch.rand(oc, 1, generator=g_) * 3
    grid = fit_uniform_grid(w, bits, symmetric=symmetric)
    q = grid.nearest(w)
    assert int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    # dequantize inverts to_int on grid points (constant channels, n=1, have S = (2^b-1)/1e-8: excluded)
    back = grid.to_int(grid.dequantize(q))
    assert torch.allclose(back, q.float(), atol=1e-3)


def _lp_error(w: torch.Tensor, grid, p: int) -> torch.Tensor:
    """Each row's ``sum |w - w_hat|^p`` under nearest rounding, in float64."""
    rows = w.reshape(grid.inv_scale.shape[0], -1)
    err = (grid.dequantize(grid.nearest(w)).reshape(rows.shape) - rows).double()
    return err.abs().pow(p).sum(dim=1)


@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lp_range_error_per_group_at_most_minmax_and_zero_points_integer(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 256) * torch.rand(16, 1) + 0.3 * torch.randn(16, 1)
    w[:, 7] = 6.0  # an outlier in one group of every row
    minmax = fit_uniform_grid(w, bits, "group", group_size=64, symmetric=symmetric)
    lp = fit_uniform_grid(w, bits, "group", group_size=64, symmetric=symmetric, range_method="lp")
    assert lp.inv_scale.shape == minmax.inv_scale.shape == (64, 1)
    assert torch.equal(lp.zero_point, torch.round(lp.zero_point))
    if symmetric:
        assert (lp.zero_point == 0).all()
    q = lp.nearest(w)
    assert q.min() >= lp.qmin and q.max() <= lp.qmax
    err_lp, err_mm = _lp_error(w, lp, 8), _lp_error(w, minmax, 8)
    assert (err_lp <= err_mm * (1 + 1e-4)).all()
    assert err_lp.sum() < 0.9 * err_mm.sum()  # the search finds better grids, not only min/max's


def test_lp_range_is_deterministic_and_keeps_large_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    a = fit_uniform_grid(w, 3, "group", group_size=64, range_method="lp")
    b = fit_uniform_grid(w.clone(), 3, "group", group_size=64, range_method="lp")
    assert torch.equal(a.inv_scale, b.inv_scale) and torch.equal(a.zero_point, b.zero_point)
    # a soft maximum: unlike the squared error's range, it does not clip each group's largest weights far
    rows = w.reshape(-1, 64)
    peak = rows.abs().argmax(dim=1, keepdim=True)
    for method, bound in (("lp", 1.0), ("mse", None)):
        g = fit_uniform_grid(w, 3, "group", group_size=64, range_method=method)
        err = (g.dequantize(g.nearest(w)).reshape(rows.shape) - rows).gather(1, peak).abs()
        step = 1 / g.inv_scale
        if bound is not None:
            assert (err <= bound * step + 1e-6).all()
        else:
            assert (err > step).any()  # the squared error's range clips some peaks by more than a step


def test_lp_range_arguments_are_checked():
    w = torch.randn(4, 64)
    with pytest.raises(RecipeError, match="even integer"):
        fit_uniform_grid(w, 4, range_method="lp", lp_p=3)
    with pytest.raises(RecipeError, match="lp_ratios"):
        fit_uniform_grid(w, 4, range_method="lp", lp_ratios=(1.1, 0.9, 5))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    groups=st.integers(1, 8),
    n=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    symmetric=st.booleans(),
    p=st.sampled_from([2, 4, 8]),
)
def test_lp_range_never_worse_than_minmax_in_its_own_norm(bits, groups, n, seed, symmetric, p):
    g_ = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, n, generator=g_) * torch.rand(groups, 1, generator=g_) * 3
    w = w + torch.randn(groups, 1, generator=g_)  # groups off centre: the zero point matters
    minmax = fit_uniform_grid(w, bits, symmetric=symmetric)
    lp = fit_uniform_grid(w, bits, symmetric=symmetric, range_method="lp", lp_p=p)
    assert torch.equal(lp.zero_point, torch.round(lp.zero_point))
    q = lp.nearest(w)
    assert int(q.min()) >= lp.qmin and int(q.max()) <= lp.qmax
    assert (_lp_error(w, lp, p) <= _lp_error(w, minmax, p) * (1 + 1e-4) + 1e-30).all()


def test_lp_range_is_refused_on_gguf_grids():
    with pytest.raises(RecipeError, match="integer zero points"):
        fit_grid(torch.randn(4, 64), 4, "gguf-q4_1", range_method="lp")


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_tiny_llama_quantizes_end_to_end_with_lp_range(method):
    pytest.importorskip("transformers")
    model = make_tiny_llama(layers=2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    recipe = {"method": method, "w_bits": 4, "granularity": "group", "group_size": 16, "ignore": ["lm_head"]}
    with torch.no_grad():
        ref = model(ids).logits
        out = {r: postquant.quantize(model, {**recipe, "w_range": r}) for r in ("minmax", "lp")}
    layers = quantized_layers(out["lp"])
    assert len(layers) == 14  # 7 Linears per decoder layer
    for name, layer in layers.items():
        w = model.get_submodule(name).weight.detach()
        expect = fit_uniform_grid(w, 4, "group", group_size=16, range_method="lp")
        assert torch.equal(layer.grid.inv_scale, expect.inv_scale)
        assert torch.equal(layer.grid.zero_point, torch.round(layer.grid.zero_point))
        assert layer.codes.min() >= -8 and layer.codes.max() <= 7
    with torch.no_grad():
        err = {r: (m(ids).logits - ref).pow(2).mean() for r, m in out.items()}
    assert err["lp"] < 2 * err["minmax"]  # a working model, not a broken one
