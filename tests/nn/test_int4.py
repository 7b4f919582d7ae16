"""The opt-in int4 CPU kernel path: the same codes and grids, scales rounded to the kernel's dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from postquant.errors import UnsupportedModelError
from postquant.grids import fit_grid
from postquant.model import quantized_layers, use_int4_kernels
from postquant.nn import ActQuantizer, Int4Linear, QuantizedLayer, cached_weights
from postquant.nn.int4 import int4_kernel_group
from postquant.nn.layer import upcast_half


def _layer(
    module: nn.Module, bits: int = 4, granularity: str = "group", group_size: int = 64, **kw
) -> QuantizedLayer:
    w = upcast_half(module.weight.detach())
    grid = fit_grid(w, bits, kw.pop("kind", "uniform"), granularity, group_size=group_size, **kw)
    return QuantizedLayer(module, grid, grid.nearest(w))


@pytest.mark.parametrize(
    ("granularity", "group_size", "kernel_group"),
    [("group", 64, 64), ("group", 32, 32), ("group", 512, 256), ("channel", 0, 128), ("tensor", 0, 128)],
)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_float32_kernel_matches_the_dequantized_layer_to_float_rounding(
    granularity, group_size, kernel_group, symmetric
):
    torch.manual_seed(0)
    q = _layer(
        nn.Linear(384 if granularity != "group" else 1024, 48),
        4,
        granularity,
        group_size,
        symmetric=symmetric,
    )
    kernel = Int4Linear(q, torch.float32)
    assert kernel.group_size == int4_kernel_group(q) == kernel_group
    x = torch.randn(2, 5, q.weight_shape[1])  # (batch, seq, K): leading dimensions kept
    with torch.no_grad():
        ref, out = q(x), kernel(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= 1e-5 * float(
        ref.abs().max()
    )  # float32 rounding, not a layout slip


@pytest.mark.parametrize("kind", ["gguf-q4_0", "gguf-q4_1"])
def test_gguf_q4_grids_run_on_the_kernel_with_blocks_of_32(kind):
    torch.manual_seed(0)
    q = _layer(nn.Linear(128, 32), 4, kind=kind)
    kernel = Int4Linear(q, torch.float32)
    assert kernel.group_size == 32
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref, out = q(x), kernel(x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # float32 rounding only


def test_bfloat16_kernel_on_a_bfloat16_layer_with_an_input_quantizer():
    torch.manual_seed(0)
    q = _layer(nn.Linear(256, 32).to(torch.bfloat16), 4, "group", 64)
    q.act_quant = ActQuantizer(8, -3.0, 3.0)
    x = torch.randn(7, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = q(x).float()
    for dtype in (torch.bfloat16, torch.float32):
        with torch.no_grad():
            out = Int4Linear(q, dtype)(x)
        assert out.dtype == torch.bfloat16
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < 1e-2, (dtype, err)  # bfloat16 scales and outputs: about 2^-8 relative


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: _layer(nn.Conv1d(32, 16, 1), 4, "channel"), "not a plain nn.Linear"),
        (lambda: _layer(nn.Linear(64, 16), 3, "channel"), "3-bit uniform"),
        (lambda: _layer(nn.Linear(64, 16), 4, "channel", kind="power", power_exponent=0.5), "4-bit power"),
        (lambda: _layer(nn.Linear(64, 16), 8, kind="gguf-q8_0"), "8-bit gguf-q8_0"),
        (lambda: _layer(nn.Linear(64, 10), 4, "channel"), "multiple of 16"),
        (lambda: _layer(nn.Linear(64, 16), 4, "group", 16), "rows of 16 inputs"),
    ],
    ids=["conv", "3-bit", "power", "q8_0", "out-10", "group-16"],
)
def test_layers_the_kernel_cannot_run_are_refused_with_the_reason(make, why):
    with pytest.raises(UnsupportedModelError, match=why):
        Int4Linear(make())


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 64)
        self.odd = nn.Linear(64, 24)  # 24 output features: stays on the plain path
        self.down = nn.Linear(24, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.odd(torch.relu(self.up(x)))))


def test_use_int4_kernels_converts_what_it_can_and_says_why_not_for_the_rest():
    torch.manual_seed(0)
    model = _Tiny().eval()
    model.up = _layer(model.up, 4, "group", 64)
    model.odd = _layer(model.odd, 4, "group", 32)
    model.down = _layer(model.down, 4, "channel")  # 24 inputs: no kernel group size divides them
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = model(x)
        swap = use_int4_kernels(model, torch.float32)
        out = model(x)
    assert swap.converted == ["up"] and set(swap.skipped) == {"odd", "down"}
    assert "multiple of 16" in swap.skipped["odd"] and "rows of 24 inputs" in swap.skipped["down"]
    assert isinstance(model.up, Int4Linear) and set(quantized_layers(model)) == {"odd", "down"}
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with cached_weights(model), torch.no_grad():  # the plain layers still cache alongside the kernel
        assert torch.equal(model(x), out)
