from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from postquant.grids import fit_uniform_grid
from postquant.nn import ActQuantizer, QuantizedLayer, act_qparams


class SamePaddedConv(nn.Conv2d):
    """A conv subclass that pads in its own forward (like EfficientNet's TF-'same' convs)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.pad(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


LAYERS = {
    "conv2d": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "grouped": lambda: nn.Conv2d(4, 6, 1, groups=2, bias=False),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, padding=2),
    "linear": lambda: nn.Linear(4, 6),
    "same-padded": lambda: SamePaddedConv(4, 6, 3, stride=2),
}


def _input(layer: nn.Module) -> torch.Tensor:
    torch.manual_seed(3)
    if isinstance(layer, nn.Linear):
        return torch.randn(5, 4)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(5, 4, 9)
    return torch.randn(5, 4, 9, 9)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("a_bits", [None, 4, 8], ids=lambda b: f"a{b}")
def test_forward_equals_float_layer_on_dequantized_weight_and_quantized_input(kind, a_bits):
    torch.manual_seed(0)
    layer = LAYERS[kind]().eval()
    x = _input(layer)
    grid = fit_uniform_grid(layer.weight.detach(), 3)
    codes = grid.nearest(layer.weight.detach())
    act = ActQuantizer(a_bits, float(x.min()), float(x.max())) if a_bits else None
    q = QuantizedLayer(layer, grid, codes, act)
    reference = LAYERS[kind]().eval()
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        reference.weight.copy_(grid.dequantize(codes))
        x_ref = act(x) if act is not None else x
        assert torch.equal(q(x), reference(x_ref))  # exact, not approximate
    assert torch.equal(q.codes.int(), codes)
    assert not hasattr(q.inner, "weight") or "weight" not in dict(q.inner.named_parameters())


def test_original_layer_untouched():
    layer = nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    grid = fit_uniform_grid(layer.weight.detach(), 2)
    QuantizedLayer(layer, grid, grid.nearest(layer.weight.detach()))
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_quantizer_matches_onnx_semantics(bits):
    x = torch.linspace(-3, 5, 1001)
    aq = ActQuantizer(bits, -2.0, 4.0)
    scale, zp = aq.scale, aq.zero_point
    q = torch.clamp(torch.round(x / scale) + zp, aq.qmin, aq.qmax)
    assert torch.equal(aq(x), (q - zp) * scale)
    assert aq(torch.zeros(1)).item() == 0.0  # zero is exact
    assert len(torch.unique(aq(x))) <= 2**bits


def test_act_qparams_unsigned_for_non_negative_ranges():
    scale, zp, qmin, qmax = act_qparams(0.0, 6.0, 4)
    assert (qmin, qmax, zp) == (0, 15, 0)
    assert scale == pytest.approx(6.0 / 15)
    _, zp, qmin, qmax = act_qparams(-1.0, 3.0, 8)
    assert (qmin, qmax) == (-128, 127) and qmin <= zp <= qmax
