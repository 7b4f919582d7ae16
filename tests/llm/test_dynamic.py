"""Dynamic per-token input quantization (``act_ranges: dynamic``) of a tiny random Llama: every planned Linear
quantizes its input per token, with or without calibration data, on the whole-model and the block path; GPTQ
and learned rounding see quantized inputs; a checkpoint round-trips it; static ranges stay refused on the
block path and dynamic ones on convolutions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import postquant  # noqa: E402
from postquant.blockwise import quantize_blocks, quantize_checkpoint  # noqa: E402
from postquant.choices import ActRanges  # noqa: E402
from postquant.errors import RecipeError  # noqa: E402
from postquant.io import load, save  # noqa: E402
from postquant.model import quantized_layers  # noqa: E402
from postquant.nn import DynamicActQuantizer, quantize_tokens  # noqa: E402
from tests.conftest import make_tiny_cnn  # noqa: E402
from tests.llm.test_blockwise import LEARNED, calib, codes, grid_recipe, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def dyn_recipe(method: str, a_bits: int = 8, **extra) -> dict:
    return grid_recipe(method, a_bits=a_bits, act_ranges="dynamic", **extra)


def assert_dynamic_inputs(qmodel: torch.nn.Module, a_bits: int) -> None:
    """Every quantized layer but the first (the '@first' float-input default) quantizes its input per token,
    at `a_bits` (8 for the last: the '@last' default), and computes ``linear(quantize_tokens(x), w_hat)``."""
    layers = quantized_layers(qmodel)
    names = list(layers)
    assert layers[names[0]].act_quant is None
    for name in names[1:]:
        quant = layers[name].act_quant
        assert isinstance(quant, DynamicActQuantizer), name
        assert quant.bits == (8 if name == names[-1] else a_bits), name
    layer = layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 5, layer.weight_shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), F.linear(quantize_tokens(x, a_bits), layer.weight), rtol=0, atol=0
        )
    assert postquant.result(qmodel).act_ranges is ActRanges.DYNAMIC


def test_rtn_needs_no_calibration_and_both_paths_agree() -> None:
    model = tiny_llama()
    whole = postquant.quantize(model, dyn_recipe("rtn"))  # calib=None, no example inputs
    blocks = quantize_blocks(model, dyn_recipe("rtn"))
    assert_dynamic_inputs(whole, 8)
    assert_dynamic_inputs(blocks, 8)
    ids = calib()[0]
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, blocks(ids).logits, rtol=0, atol=0)
        weight_only = postquant.quantize(model, grid_recipe("rtn"))(ids).logits
    assert not torch.equal(whole(ids).logits, weight_only)  # the inputs are quantized


@pytest.mark.parametrize("path", ["whole", "blocks"])
def test_gptq_hessians_come_from_quantized_inputs(path: str) -> None:
    """At 3-bit inputs the Hessians of quantized inputs differ from the float ones: so do the codes."""
    model = tiny_llama(layers=2)
    run = postquant.quantize if path == "whole" else quantize_blocks
    dyn = run(model, dyn_recipe("gptq", a_bits=3), calib())
    assert_dynamic_inputs(dyn, 3)
    plain = run(model, grid_recipe("gptq"), calib())
    a, b = codes(dyn), codes(plain)
    first = next(iter(a))
    assert torch.equal(a[first], b[first])  # the first layer's input stays float: the same Hessian
    # k_proj sees q_proj's input, through nothing quantized before it: only its own input quantizer differs
    assert not torch.equal(a["model.layers.0.self_attn.k_proj"], b["model.layers.0.self_attn.k_proj"])
    assert sum(not torch.equal(a[n], b[n]) for n in a) >= len(a) // 2


@pytest.mark.parametrize("path", ["whole", "blocks"])
def test_learned_rounding_with_dynamic_inputs(path: str) -> None:
    model = tiny_llama(layers=2)
    recipe = dyn_recipe("learned", a_bits=4, learned=LEARNED, calib_size=8)
    run = postquant.quantize if path == "whole" else quantize_blocks
    q = run(model, recipe, calib())
    assert_dynamic_inputs(q, 4)
    report = postquant.result(q).learned
    assert report is not None and report.units
    assert all(u.error_after <= u.error_before for u in report.units)
    assert any(u.error_after < u.error_before for u in report.units)


def test_block_path_from_a_checkpoint_directory(tmp_path) -> None:
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    q = quantize_checkpoint(tmp_path, dyn_recipe("rtn"))
    assert_dynamic_inputs(q, 8)
    ids = calib()[0]
    with torch.no_grad():
        ref = quantize_blocks(model, dyn_recipe("rtn"))(ids).logits
        torch.testing.assert_close(q(ids).logits, ref, rtol=0, atol=0)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path) -> None:
    q = postquant.quantize(tiny_llama(layers=2), dyn_recipe("rtn"))
    save(q, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    acts = [entry["act"] for entry in manifest["layers"].values() if entry["act"] is not None]
    assert acts and all(a == {"bits": 8, "qmin": -127, "qmax": 127, "dynamic": True} for a in acts)
    loaded = load(tmp_path / "ck", tiny_llama(layers=2))
    assert_dynamic_inputs(loaded, 8)
    ids = calib()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, q(ids).logits, rtol=0, atol=0)


def test_block_path_refuses_static_ranges() -> None:
    with pytest.raises(RecipeError, match="static activation ranges"):
        quantize_blocks(tiny_llama(layers=1), grid_recipe("rtn", a_bits=8, act_ranges="calib"), calib())


def test_convolutions_are_refused_before_any_work() -> None:
    recipe = {"w_bits": 4, "a_bits": 8, "act_ranges": "dynamic"}
    with pytest.raises(RecipeError, match=r"not Linear: .*Conv2d"):
        postquant.quantize(make_tiny_cnn(), recipe)
