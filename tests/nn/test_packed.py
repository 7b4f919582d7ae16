"""A QuantizedLayer holds packed codes and grid tensors only, and computes exactly what a float copy did."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from postquant.grids import fit_grid, fit_uniform_grid
from postquant.grids.pack import pack_codes, unpack_codes
from postquant.nn import QuantizedLayer, cached_weights
from postquant.nn.layer import upcast_half


def _layer(
    module: nn.Module, bits: int = 4, granularity: str = "group", group_size: int = 64, kind: str = "uniform"
) -> QuantizedLayer:
    w = upcast_half(module.weight.detach())
    grid = fit_grid(w, bits, kind, granularity, group_size=group_size)
    return QuantizedLayer(module, grid, grid.nearest(w))


def _buffer_bytes(layer: QuantizedLayer) -> dict[str, int]:
    return {k: t.numel() * t.element_size() for k, t in layer.named_buffers()}


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_the_layer_keeps_no_float_weight_only_packed_codes_and_the_grid(bits):
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False).to(torch.bfloat16)
    q = _layer(linear, bits)
    sizes = _buffer_bytes(q)
    numel = 512 * 256
    assert sizes["packed"] == numel * bits // 8
    assert sizes["grid_inv_scale"] == numel // 64 * 4  # float32 steps, one per group of 64
    assert q.grid_zero_point.dtype in (torch.int8, torch.int16)  # integer-valued zero points, compacted
    assert sum(sizes.values()) < numel * bits / 8 + numel / 64 * 6
    assert not any(t.is_floating_point() and t.numel() >= numel for t in q.state_dict().values())
    assert q._buffers["weight"] is None and "weight" not in q.state_dict()


def test_two_w4_bfloat16_linears_take_under_a_third_of_their_float_bytes():
    """The issue's example: two bf16 Linear(512, 512) took 1.05 MB as float and 2.63 MB after W4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512)).to(torch.bfloat16)
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantized = nn.Sequential(*(_layer(m, 4, "group", 64) for m in model))
    q_bytes = sum(t.numel() * t.element_size() for t in quantized.state_dict().values())
    weights = sum(m.weight.numel() * 2 for m in model)
    assert q_bytes - 2 * 512 * 2 <= 0.3 * weights  # without the (bf16) biases
    assert q_bytes < 0.32 * float_bytes


LAYERS = {
    "linear": lambda: nn.Linear(128, 32),
    "conv2d": lambda: nn.Conv2d(8, 16, 3, padding=1),
    "conv1d": lambda: nn.Conv1d(8, 16, 4),
}


def _input(module: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(module, nn.Linear):
        return torch.randn(6, module.in_features, generator=g)
    if isinstance(module, nn.Conv1d):
        return torch.randn(2, 8, 11, generator=g)
    return torch.randn(2, 8, 7, 7, generator=g)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    "grid",
    [("uniform", "group", 3), ("uniform", "channel", 5), ("uniform", "tensor", 2), ("power", "channel", 4)],
    ids=lambda g: "-".join(map(str, g)),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_outputs_equal_the_float_layer_on_the_dequantized_weight_bit_for_bit(kind, grid, dtype):
    torch.manual_seed(0)
    module = LAYERS[kind]().to(dtype).eval()
    grid_kind, granularity, bits = grid
    w = module.weight.detach()
    wf = w if dtype == torch.float64 else w.float()
    g = fit_grid(wf, bits, grid_kind, granularity, group_size=8)
    codes = g.nearest(wf)
    q = QuantizedLayer(module, g, codes)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        reference.weight.copy_(g.dequantize(codes))  # what the layer kept as a float copy before
        x = _input(module).to(dtype)
        assert torch.equal(q(x), reference(x))
        with cached_weights(q):
            assert torch.equal(q(x), reference(x)) and torch.equal(q(x), reference(x))
    assert torch.equal(q.weight, g.dequantize(codes))
    assert q.weight.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert q.codes.dtype == torch.int8 and torch.equal(q.codes.int(), codes)


def test_cached_weights_dequantize_once_and_follow_code_and_grid_changes():
    torch.manual_seed(0)
    q = _layer(nn.Linear(64, 8), 4, "channel")
    x = torch.randn(3, 64)
    assert q.weight is not q.weight  # no cache: computed on each access
    with cached_weights(nn.Sequential(q)):
        first = q.weight
        assert q.weight is first  # one dequantization
        out = q(x)
        codes = q.codes.clone()
        codes[0, 0] = -codes[0, 0] - 1  # another code
        q.set_codes(codes)
        assert not torch.equal(q.weight, first) and torch.equal(q.codes, codes)
        changed = q.weight
        q.grid_inv_scale.mul_(2)  # an in-place change of the grid
        torch.testing.assert_close(q.weight, changed / 2, rtol=1e-6, atol=0)
        q.grid_inv_scale = q.grid_inv_scale / 2  # a new grid tensor
        assert torch.equal(q.weight, changed)
        with cached_weights(q):  # nested: the outer cache stays
            assert q.weight is q.weight
        assert q.weight is q.weight
    assert q._cache is None and not torch.equal(q(x), out)


def test_functional_call_substitutes_the_weight_and_gradients_reach_it():
    torch.manual_seed(0)
    q = _layer(nn.Linear(64, 8), 4, "group", 32)
    model = nn.Sequential(q, nn.ReLU())
    x = torch.randn(3, 64)
    soft = (q.weight + 0.01 * torch.randn_like(q.weight)).requires_grad_()
    out = functional_call(model, {"0.weight": soft}, (x,))
    assert torch.equal(out, F.relu(F.linear(x, soft, q.inner.bias)))
    out.sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert q._buffers["weight"] is None  # the slot is empty again
    assert torch.equal(q(x), F.linear(x, q.grid.dequantize(q.codes.int()), q.inner.bias))


def test_state_dict_round_trip_and_copies():
    torch.manual_seed(0)
    q = _layer(nn.Conv2d(4, 8, 3), 3, "channel")
    other = _layer(nn.Conv2d(4, 8, 3), 3, "channel")
    assert set(q.state_dict()) == {"packed", "grid_inv_scale", "grid_zero_point", "inner.bias"}
    other.load_state_dict(q.state_dict())
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(other(x), q(x)) and torch.equal(other.codes, q.codes)
    twin = copy.deepcopy(q)
    assert torch.equal(twin(x), q(x)) and twin.packed.data_ptr() != q.packed.data_ptr()


def test_set_codes_refuses_another_shape():
    q = _layer(nn.Linear(64, 8), 4, "channel")
    with pytest.raises(ValueError, match="shape"):
        q.set_codes(torch.zeros(8, 32, dtype=torch.int32))


def test_input_quantizer_follows_the_layer_precision():
    q = _layer(nn.Linear(64, 8).double(), 4, "channel")
    assert q.input_quantizer(8, -1.0, 1.0).scale.dtype == torch.float64
    assert _layer(nn.Linear(64, 8)).input_quantizer(8, -1.0, 1.0).scale.dtype == torch.float32


def _reference_bytes(values: list[int], bits: int) -> list[int]:
    """The documented layout in Python integers: code i at bits b*i.. of one little-endian integer."""
    offset = 2 ** (bits - 1)
    total = sum((v + offset) << (bits * i) for i, v in enumerate(values))
    return list(total.to_bytes(-(-len(values) * bits // 8), "little")) if values else []


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_packing_is_the_documented_dense_layout_for_every_width(bits, data):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = data.draw(st.lists(st.integers(lo, hi), max_size=70))
    packed = pack_codes(torch.tensor(values, dtype=torch.int64), bits)
    assert packed.tolist() == _reference_bytes(values, bits)
    assert unpack_codes(packed, bits, len(values)).tolist() == values


def test_a_power_grid_layer_round_trips_its_exponent_and_row_maxima():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    grid = fit_grid(linear.weight.detach(), 4, "power", "channel", power_exponent=0.5)
    q = QuantizedLayer(linear, grid, grid.nearest(linear.weight.detach()))
    assert torch.equal(q.grid.exponent, grid.exponent) and torch.equal(q.grid.max_abs, grid.max_abs)
    assert torch.equal(q.weight, grid.dequantize(grid.nearest(linear.weight.detach())))


def test_a_uniform_grid_with_non_integer_zero_points_stays_float():
    linear = nn.Linear(16, 4)
    grid = fit_uniform_grid(linear.weight.detach(), 4)
    grid.zero_point = grid.zero_point + 0.5  # not integer-valued: not compacted
    q = QuantizedLayer(linear, grid, grid.nearest(linear.weight.detach()))
    assert q.grid_zero_point.dtype == torch.float32 and torch.equal(q.grid.zero_point, grid.zero_point)


def test_hooks_on_the_inner_float_module_still_run():
    torch.manual_seed(0)
    q = _layer(nn.Linear(64, 8), 4, "channel")
    x = torch.randn(3, 64)
    plain = q(x)
    seen: list[torch.Tensor] = []
    handle = q.inner.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        assert torch.equal(q(x), plain) and len(seen) == 1 and torch.equal(seen[0], plain)
    finally:
        handle.remove()


GGUF_LAYERS = {  # 32 inputs per output channel or a multiple: llama.cpp's blocks
    "linear": (lambda: nn.Linear(96, 16), (5, 96)),
    "conv1d": (lambda: nn.Conv1d(8, 16, 4), (2, 8, 11)),
    "conv2d": (lambda: nn.Conv2d(32, 8, 1), (2, 32, 5, 5)),
}


@pytest.mark.parametrize("kind", list(GGUF_LAYERS))
@pytest.mark.parametrize("grid_kind", ["gguf-q4_0", "gguf-q4_1", "gguf-q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gguf_grids_give_the_float_layer_on_llama_cpps_weights_bit_for_bit(kind, grid_kind, dtype):
    torch.manual_seed(0)
    make, shape = GGUF_LAYERS[kind]
    module = make().to(dtype).eval()
    w = module.weight.detach().float()
    g = fit_grid(w, 8 if grid_kind.endswith("8_0") else 4, grid_kind, "group")
    codes = g.nearest(w)
    q = QuantizedLayer(module, g, codes)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        reference.weight.copy_(g.dequantize(codes))
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        assert torch.equal(q(x), reference(x))
        with cached_weights(q):
            assert torch.equal(q(x), reference(x))
    assert torch.equal(q.weight, g.dequantize(codes)) and torch.equal(q.codes.int(), codes.int())
    # per block of 32: the packed codes, an fp32 step, an int8 zero point and the minimum (int8 zeros if none)
    assert q.packed.numel() == w.numel() * q.bits // 8 and q.grid_zero_point.dtype == torch.int8
    assert q.grid_offset.dtype == (torch.float32 if grid_kind == "gguf-q4_1" else torch.int8)
