"""The activation fake-quantizer: the in-place path (no autograd) gives exactly the reference formula."""

from __future__ import annotations

import pytest
import torch

from postquant.nn.act import ActQuantizer


@pytest.mark.parametrize(
    ("bits", "lo", "hi"), [(8, -3.7, 3.73), (8, 0.0, 6.0), (4, -1.0, 2.5), (2, 0.0, 1.0)]
)
def test_forward_is_the_qdq_formula_with_and_without_autograd(bits, lo, hi):
    quant = ActQuantizer(bits, lo, hi)
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(bits)) * 3
    q = torch.clamp(torch.round(x / quant.scale) + quant.zero_point, quant.qmin, quant.qmax)
    expected = (q - quant.zero_point) * quant.scale
    with torch.inference_mode():
        torch.testing.assert_close(quant(x), expected, rtol=0, atol=0)
    x_grad = x.clone().requires_grad_()
    out = quant(x_grad)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    assert out.requires_grad
    assert torch.equal(x, x_grad.detach())  # the input is never changed in place
