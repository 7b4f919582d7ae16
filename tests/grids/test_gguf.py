"""llama.cpp's block formats as grids (postquant.grids.gguf): llama.cpp's scales, exact fp16, every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.errors import RecipeError
from postquant.grids import GGUFGrid, GridKind, fit_gguf_grid, fit_grid, grid_from_state, grid_state
from postquant.grids.gguf import FORMATS, fp16_scale, gguf_grid_kind, gguf_kind_for_bits
from postquant.model import quantized_layers
from postquant.recipe import Recipe

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

KINDS = [GridKind.GGUF_Q4_0, GridKind.GGUF_Q4_1, GridKind.GGUF_Q8_0]
IDS = [k.value for k in KINDS]


def _ggml(kind: GridKind) -> GGMLQuantizationType:
    return GGMLQuantizationType[FORMATS[kind].ggml_name]


def _weights(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[:, :3] *= 6  # a few large inputs, as in LLM weights
    return w


def _reference(w: torch.Tensor, kind: GridKind) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's reference quantization (gguf.quants): its fp16 scales (G,) and dequantized weights."""
    blocks = quants.quantize(w.numpy(), _ggml(kind))
    nbytes = {GridKind.GGUF_Q4_0: 18, GridKind.GGUF_Q4_1: 20, GridKind.GGUF_Q8_0: 34}[kind]
    d = blocks.reshape(-1, nbytes)[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    return torch.from_numpy(d), torch.from_numpy(quants.dequantize(blocks, _ggml(kind)))


def test_every_fp16_scale_survives_its_inverse():
    """The grid stores S = 1/d and reads d = fp16(1/S): exact for every finite non-zero fp16 value."""
    h = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    for d in (h, -h):
        assert torch.equal(fp16_scale(1.0 / (1.0 / d)), d)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_minmax_is_llama_cpp_rule_and_rounds_no_worse(kind):
    """minmax gives llama.cpp's fp16 scales exactly; nearest rounding on them is never further from any weight
    than llama.cpp's codes (which are chosen on the scale before its fp16 rounding)."""
    w = _weights((48, 256), 0)
    grid = fit_gguf_grid(w, kind)
    d_ref, w_ref = _reference(w, kind)
    assert torch.equal(grid.scale.reshape(-1), d_ref)
    w_hat = grid.dequantize(grid.nearest(w))
    assert ((w_hat - w).abs() <= (w_ref - w).abs() + 1e-7).all()
    assert (w_hat == w_ref).float().mean() > 0.98  # the same codes but near rounding ties


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_mse_fit_never_loses_to_minmax_per_block(kind):
    w = _weights((32, 512), 1)
    rows = w.reshape(-1, 32)

    def block_sse(grid: GGUFGrid) -> torch.Tensor:
        return (grid.dequantize(grid.nearest(w)) - w).reshape(-1, 32).pow(2).sum(1)

    mm, mse = block_sse(fit_gguf_grid(w, kind)), block_sse(fit_gguf_grid(w, kind, "mse"))
    assert (mse <= mm).all() and rows.shape[0] == mse.numel()
    if kind is not GridKind.GGUF_Q8_0:  # 4 bits: shrinking the range pays off on most blocks
        assert mse.sum() < 0.97 * mm.sum()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), scale=st.floats(1e-4, 10.0))
def test_nearest_codes_stay_in_range_and_scales_are_fp16(seed, kind, scale):
    w = _weights((4, 64), seed) * scale
    grid = fit_gguf_grid(w, kind, "mse")
    q = grid.nearest(w)
    assert int(q.min()) >= FORMATS[kind].qmin and int(q.max()) <= FORMATS[kind].qmax
    assert torch.equal(grid.scale, grid.scale.half().float()) and (grid.scale != 0).all()
    assert torch.equal(grid.offset, grid.offset.half().float())
    w_hat = grid.dequantize(q)
    assert w_hat.dtype == torch.float32 and torch.isfinite(w_hat).all()


def test_blocks_of_zeros_and_constants_are_exact():
    w = torch.zeros(2, 64)
    w[1, 32:] = 0.125  # a constant block: Q4_1 stores it in m
    for kind in KINDS:
        grid = fit_gguf_grid(w, kind)
        w_hat = grid.dequantize(grid.nearest(w))
        assert torch.equal(w_hat[0], w[0]), kind
    q41 = fit_gguf_grid(w, GridKind.GGUF_Q4_1)
    assert torch.equal(q41.dequantize(q41.nearest(w)), w)


def test_inputs_not_a_multiple_of_32_are_refused_with_what_to_do():
    with pytest.raises(RecipeError, match=r"blocks of 32 inputs.*ignore"):
        fit_gguf_grid(torch.randn(4, 48), GridKind.GGUF_Q4_0)


def test_learned_scale_is_rounded_to_fp16_straight_through():
    w = _weights((4, 64), 2)
    grid = fit_gguf_grid(w, GridKind.GGUF_Q4_0)
    log_scale = torch.zeros_like(grid.inv_scale, requires_grad=True)
    moved = grid.with_inv_scale(grid.inv_scale * torch.exp(-(log_scale + 0.0123)))
    w_hat = moved.dequantize(grid.nearest(w).float())
    assert torch.equal(moved.scale.detach(), moved.scale.detach().half().float())
    w_hat.sum().backward()
    assert log_scale.grad is not None and log_scale.grad.abs().sum() > 0


def test_state_round_trip_and_bits_pick_the_format():
    w = _weights((8, 64), 3)
    for kind in KINDS:
        grid = fit_grid(w, FORMATS[kind].bits, kind)
        config, tensors = grid_state(grid)
        back = grid_from_state(config, tensors)
        assert isinstance(back, GGUFGrid) and back.kind is kind and config.kind.value == kind.value
        assert torch.equal(back.dequantize(grid.nearest(w)), grid.dequantize(grid.nearest(w)))
    assert gguf_kind_for_bits(GridKind.GGUF_Q4_1, 8) is GridKind.GGUF_Q8_0
    assert gguf_kind_for_bits(GridKind.GGUF_Q8_0, 4) is GridKind.GGUF_Q4_0
    with pytest.raises(RecipeError, match=r"4-bit .* or 8-bit"):
        gguf_kind_for_bits(GridKind.GGUF_Q4_0, 3)


def test_type_names_parse_and_unknown_ones_list_the_supported():
    assert gguf_grid_kind("q4_0") is GridKind.GGUF_Q4_0
    assert gguf_grid_kind("Q8_0") is GridKind.GGUF_Q8_0
    assert gguf_grid_kind("gguf-q4_1") is GridKind.GGUF_Q4_1
    with pytest.raises(RecipeError, match=r"Q5_K.*supported: Q8_0, Q4_0, Q4_1"):
        gguf_grid_kind("Q5_K")


def test_recipe_fills_and_guards_the_fields_the_format_fixes():
    r = Recipe.coerce({"grid": "gguf-q8_0"})
    assert (r.w_bits, r.granularity.value, r.group_size, r.symmetric) == (8, "group", 32, True)
    assert Recipe.coerce({"grid": "gguf-q4_1"}).symmetric is False
    assert Recipe.coerce(Recipe.coerce({"grid": "gguf-q4_0"}), method="squant").w_bits == 4
    for bad, field in [
        ({"w_bits": 3}, "w_bits: 4"),
        ({"granularity": "channel"}, "granularity: group"),
        ({"group_size": 64}, "group_size: 32"),
        ({"symmetric": False}, "symmetric: True"),
        ({"overrides": {"lm_head": {"w_bits": 6}}}, "'lm_head'"),
    ]:
        with pytest.raises(RecipeError, match=field):
            Recipe.coerce({"grid": "gguf-q4_0", **bad})


@pytest.mark.parametrize("method", ["rtn", "squant"])
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_every_method_puts_layers_on_the_format(kind, method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(16, 64)
    recipe = {"grid": kind.value, "method": method, "overrides": {"2": {"w_bits": 8}}}
    qmodel = postquant.quantize(model, recipe, example_inputs=x)
    layers = quantized_layers(qmodel)
    assert layers["0"].grid_config.kind.value == kind.value
    assert layers["2"].grid_config.kind.value == "gguf-q8_0"  # an 8-bit override is Q8_0
    for layer in layers.values():
        grid = layer.grid
        assert isinstance(grid, GGUFGrid)
        assert torch.equal(layer.weight, grid.dequantize(layer.codes.to(torch.int32)))
        assert grid.qmin <= int(layer.codes.min()) and int(layer.codes.max()) <= grid.qmax


def test_a_saved_checkpoint_keeps_the_format_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(16, 64)
    recipe = {"grid": "gguf-q4_1", "method": "squant", "w_range": "mse"}
    qmodel = postquant.quantize(model, recipe, example_inputs=x)
    postquant.save(qmodel, tmp_path / "ckpt")
    loaded = postquant.load(tmp_path / "ckpt", model)
    for name, layer in quantized_layers(loaded).items():
        assert isinstance(layer.grid, GGUFGrid) and layer.grid.kind is GridKind.GGUF_Q4_1
        assert torch.equal(layer.weight, quantized_layers(qmodel)[name].weight)
    assert torch.equal(loaded(x), qmodel(x))
