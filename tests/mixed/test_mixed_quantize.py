"""`quantize` with a mixed-precision budget: budgets hold, the plan is data, every rounding method, save/load."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import postquant
from postquant.errors import BudgetError
from postquant.io import load, save
from postquant.mixed.size import model_bytes
from postquant.model import quantized_layers
from postquant.recipe import LayerOverride


def _bits(qmodel) -> dict[str, int]:
    return {name: layer.bits for name, layer in quantized_layers(qmodel).items()}


LEARNED = {"iters": 20, "progress": False, "first_last_w_bits": None}


@pytest.fixture
def sensitive_cnn(tiny_cnn):
    """The tiny CNN with one outlier weight in conv3: with a per-tensor grid it stretches conv3's range so
    that the other channels lose their resolution, so conv3 is far more sensitive to low bits."""
    with torch.no_grad():
        w = tiny_cnn.conv3.weight  # (16, 4, 1, 1)
        w[0, 0] = 20 * w.abs().max()
    return tiny_cnn


@pytest.mark.parametrize(
    "method,importance",
    [("rtn", "loss"), ("rtn", "taylor"), ("rtn", "fisher"), ("squant", "datafree"), ("learned", "loss")],
)
def test_budget_holds_and_bits_differ(sensitive_cnn, images, method, importance):
    mixed = {"w_bits_budget": 3.0, "importance": importance, "calib_size": 16}
    recipe = {"method": method, "granularity": "tensor", "mixed": mixed}
    if method == "learned":
        recipe["learned"] = LEARNED
    calib = None if importance == "datafree" else images
    qmodel = postquant.quantize(sensitive_cnn, recipe, calib=calib, example_inputs=images)
    result = postquant.result(qmodel).mixed
    bits = _bits(qmodel)
    assert bits == result.bits  # the installed layers are the allocation
    numel = {name: layer.codes.numel() for name, layer in quantized_layers(qmodel).items()}
    avg = sum(numel[n] * bits[n] for n in bits) / sum(numel.values())
    assert avg == pytest.approx(result.avg_w_bits) and avg <= 3.0
    assert len(set(bits.values())) > 1, bits
    assert bits["conv3"] == max(bits.values()), bits  # the sensitive layer gets the most bits
    overrides = postquant.result(qmodel).recipe.overrides
    assert all(overrides[name] == LayerOverride(w_bits=b) for name, b in bits.items())


def test_pinned_layers_are_fixed_and_counted(tiny_cnn, images):
    recipe = {"overrides": {"fc": {"w_bits": 8}, "conv1": {"w_bits": None}}, "mixed": {"w_bits_budget": 6.0}}
    qmodel = postquant.quantize(tiny_cnn, recipe, calib=images)
    result = postquant.result(qmodel).mixed
    rows = {row.name: row for row in result.layers}
    assert "conv1" not in rows and "conv1" not in _bits(qmodel)  # float: outside the budget
    assert rows["fc"].fixed and rows["fc"].bits == 8 and _bits(qmodel)["fc"] == 8
    assert 5.24 < result.avg_w_bits <= 6.0  # fc: 160 of the 296 weights, at 8 bits


def test_learned_preset_first_last_8_bit_are_fixed(tiny_cnn, images):
    learned = {**LEARNED, "first_last_w_bits": 8}
    recipe = {"method": "learned", "learned": learned, "mixed": {"w_bits_budget": 7.0, "calib_size": 16}}
    qmodel = postquant.quantize(tiny_cnn, recipe, calib=images)
    rows = {row.name: row for row in postquant.result(qmodel).mixed.layers}
    assert rows["conv1"].fixed and rows["fc"].fixed and _bits(qmodel)["conv1"] == _bits(qmodel)["fc"] == 8
    assert not rows["conv2"].fixed


def _safetensors_data_bytes(path) -> int:
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_size_budget_and_save_load_round_trip(tiny_cnn, images, tmp_path, granularity):
    recipe = {
        "granularity": granularity,
        "a_bits": 8,
        "mixed": {"size_budget": 700, "importance": "datafree"},
    }
    qmodel = postquant.quantize(tiny_cnn, recipe, calib=images)
    result = postquant.result(qmodel).mixed
    assert result.size_bytes <= 700
    save(qmodel, tmp_path / "ckpt")
    data = _safetensors_data_bytes(tmp_path / "ckpt" / "model.safetensors")
    assert data == result.size_bytes == model_bytes(qmodel)  # the size model is the checkpoint's tensor bytes
    loaded = load(tmp_path / "ckpt", model=tiny_cnn)
    assert _bits(loaded) == _bits(qmodel) == result.bits
    assert postquant.result(loaded).recipe.overrides == postquant.result(qmodel).recipe.overrides
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert {name: e["bits"] for name, e in manifest["layers"].items()} == result.bits
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), qmodel(images), rtol=0, atol=0)


def test_saved_recipe_reproduces_the_allocation(tiny_cnn, images):
    first = postquant.quantize(tiny_cnn, {"mixed": {"w_bits_budget": 3.5, "calib_size": 16}}, calib=images)
    again = postquant.quantize(tiny_cnn, postquant.result(first).recipe.model_dump(mode="json"), calib=images)
    assert _bits(again) == _bits(first)
    assert all(row.fixed for row in postquant.result(again).mixed.layers)  # pinned by the saved overrides
    assert postquant.result(again).mixed.avg_w_bits == postquant.result(first).mixed.avg_w_bits <= 3.5


def test_infeasible_budget_fails_before_measuring(tiny_cnn, images):
    # no calibration data for 'loss': the budget error must come first, before any importance is measured
    with pytest.raises(BudgetError, match="feasible range is 2 to 8 average weight bits"):
        postquant.quantize(tiny_cnn, {"mixed": {"w_bits_budget": 1.5}}, example_inputs=images)


@pytest.mark.parametrize("importance", ["loss", "datafree"])
def test_each_layer_grid_is_fitted_once_per_bit_width(tiny_cnn, images, monkeypatch, importance):
    """Power grids search an exponent per fit: the allocation fits each (layer, bits) once, and `quantize`
    fits each layer once more at its chosen bits."""
    from postquant.recipe import Recipe

    calls: list[int] = []
    fit = Recipe.weight_grid

    def counting(self, w, bits, importance=None):
        calls.append(bits)
        return fit(self, w, bits, importance)

    # counts grid fits (a cost, not a result): no public observable, and a counter would be code for tests
    monkeypatch.setattr(Recipe, "weight_grid", counting)
    choices = [2, 4, 8]
    mixed = {"w_bits_budget": 4.0, "importance": importance, "bit_choices": choices, "calib_size": 16}
    recipe = {"method": "rtn", "grid": "power", "mixed": mixed}
    calib = None if importance == "datafree" else images
    qmodel = postquant.quantize(tiny_cnn, recipe, calib=calib, example_inputs=images)
    layers = len(quantized_layers(qmodel))
    assert len(calls) == layers * len(choices) + layers
