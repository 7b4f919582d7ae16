"""Input second moments per weight (the diagonal output-error Hessian) and the output-aware power search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import postquant
from postquant.calib.moments import input_moments
from postquant.errors import DataError, RecipeError
from postquant.grids import fit_power_grid
from postquant.model import fold_batchnorm, quantized_layers
from postquant.plan import make_plan
from postquant.recipe import Recipe


class Mixed(nn.Module):
    """A plain conv, a depthwise conv, a grouped conv and a Linear applied to a token sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 4, 1, groups=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(torch.relu(self.dw(torch.relu(self.conv(x)))))  # (N, 4, H, W)
        return self.fc(x.flatten(2).transpose(1, 2))  # (N, H*W, 4) tokens -> (N, H*W, 5)


def _inputs(model: nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(seen)


def test_moments_match_brute_force_and_broadcast_to_the_weight():
    torch.manual_seed(0)
    model = Mixed().eval()
    batches = [torch.randn(4, 3, 6, 6) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1) for _ in range(3)]
    moments = input_moments(model, ["conv", "dw", "grouped", "fc"], batches)
    for name, m in moments.items():
        layer = model.get_submodule(name)
        x = _inputs(model, name, batches).double()
        assert torch.broadcast_shapes(m.shape, layer.weight.shape) == layer.weight.shape
        if name == "fc":
            expected = x.reshape(-1, 4).pow(2).mean(0)  # per feature over all tokens
            torch.testing.assert_close(m, expected.float().reshape(1, 4))
            continue
        per_channel = x.transpose(0, 1).flatten(1).pow(2).mean(1)  # (C_in,)
        w = layer.weight
        for o in range(w.shape[0]):  # output channel o reads input channels of its group
            group = o // (w.shape[0] // layer.groups)
            wanted = per_channel[group * w.shape[1] : (group + 1) * w.shape[1]]
            torch.testing.assert_close(m[o].flatten(), wanted.float())
    assert float(moments["conv"][0, 1]) > 100 * float(moments["conv"][0, 2])  # the scaled input channels


def test_moments_need_batches_that_reach_the_layers():
    model = Mixed().eval()
    with pytest.raises(DataError, match="calibration batches"):
        input_moments(model, ["conv"], [])
    with pytest.raises(DataError, match="never reach"):
        input_moments(model, ["conv"], [torch.randn(0, 3, 6, 6)])


def test_output_search_minimises_the_weighted_error(tiny_cnn, images):
    """`power_search: outputs` installs, per layer, the exponent of least sum E[x^2] (w - w_hat)^2."""
    recipe = Recipe.coerce({"method": "rtn", "w_bits": 3, "grid": "power", "power_search": "outputs"})
    qmodel = postquant.quantize(tiny_cnn, recipe, calib=images)
    folded, _ = fold_batchnorm(tiny_cnn, images)
    imp = input_moments(folded, make_plan(folded, recipe).weight_layers, [images])
    assert imp is not None
    plain = postquant.quantize(
        tiny_cnn, {"method": "rtn", "w_bits": 3, "grid": "power"}, example_inputs=images
    )
    for name, layer in quantized_layers(qmodel).items():
        w = folded.get_submodule(name).weight.detach()

        def werr(grid, w=w, name=name):
            return float(((grid.dequantize(grid.nearest(w)) - w).pow(2) * imp[name]).sum())

        assert float(layer.grid_exponent) == float(fit_power_grid(w, 3, importance=imp[name]).exponent)
        assert werr(layer.grid) <= werr(plain.get_submodule(name).grid) * (1 + 1e-6)


def test_output_search_needs_calibration_data_and_a_power_grid(tiny_cnn, images):
    with pytest.raises(DataError, match="power_search: outputs"):
        postquant.quantize(tiny_cnn, {"grid": "power", "power_search": "outputs"}, example_inputs=images)
    with pytest.raises(RecipeError, match="set grid: power"):
        Recipe.coerce({"power_search": "outputs"})
    with pytest.raises(RecipeError, match="leave power_exponent unset"):
        Recipe.coerce({"grid": "power", "power_exponent": 0.5, "power_search": "outputs"})


def test_output_search_with_mixed_precision_installs_the_grids_it_measured(tiny_cnn, images):
    mixed = {"w_bits_budget": 4.0, "importance": "datafree", "bit_choices": [2, 4, 8]}
    recipe = Recipe.coerce({"grid": "power", "power_search": "outputs", "mixed": mixed})
    qmodel = postquant.quantize(tiny_cnn, recipe, calib=images)
    folded, _ = fold_batchnorm(tiny_cnn, images)
    imp = input_moments(folded, make_plan(folded, recipe).weight_layers, [images])
    assert imp is not None
    for name, layer in quantized_layers(qmodel).items():
        w = folded.get_submodule(name).weight.detach()
        expected = fit_power_grid(w, layer.bits, importance=imp[name])
        assert float(layer.grid_exponent) == float(expected.exponent)
        torch.testing.assert_close(layer.grid.inv_scale, expected.inv_scale)
