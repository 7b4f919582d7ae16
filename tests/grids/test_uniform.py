from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from postquant.errors import NonFiniteWeightError, RecipeError
from postquant.grids import Granularity, fit_uniform_grid
from tests.conftest import require_shared


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


def test_constant_and_zero_channels_are_finite():
    w = torch.zeros(3, 9)
    w[1] = 0.25
    w[2] = torch.linspace(-1, 1, 9)
    g = fit_uniform_grid(w, 4)
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
