"""Half-precision models (bfloat16, float16): codes fitted in float32, layers computed in the model's dtype."""

from __future__ import annotations

import logging

import pytest
import torch

import postquant
from postquant.io import load, save
from postquant.model import fold_batchnorm, quantized_layers
from tests.conftest import make_tiny_cnn

HALF = [torch.bfloat16, torch.float16]
LEARNED = {"iters": 5, "progress": False}


def _half(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    model = make_tiny_cnn().to(dtype)
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    return model, images


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_codes_are_those_of_the_same_weights_in_float32(dtype, method):
    model, images = _half(dtype)
    recipe = {"method": method, "w_bits": 4, "fold_bn": False}
    half = postquant.quantize(model, recipe, example_inputs=images)
    full = postquant.quantize(model.float(), recipe, example_inputs=images.float())
    for name, layer in quantized_layers(half).items():
        assert torch.equal(layer.codes, quantized_layers(full)[name].codes), name
    out = half(images)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), full(images.float()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "recipe",
    [
        {"w_bits": 4, "a_bits": 8, "a_observer": "percentile"},
        {"w_bits": 4, "grid": "power", "power_search": "outputs"},
        {"w_bits": 4, "mixed": {"w_bits_budget": 3.0, "importance": "loss"}},
        {"method": "learned", "w_bits": 4, "a_bits": 4, "learned": LEARNED},
        {
            "method": "learned",
            "w_bits": 4,
            "learned": {**LEARNED, "calib_source": "synthetic", "synthetic_steps": 3},
        },
    ],
    ids=["acts", "power", "mixed", "learned", "synthetic"],
)
def test_every_path_runs_in_the_models_dtype_and_reloads_bit_exactly(dtype, recipe, tmp_path):
    model, images = _half(dtype)
    qmodel = postquant.quantize(model, recipe, calib=images, example_inputs=images[:2])
    out = qmodel(images)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    # close to the float model: the quantization error, not a dtype accident
    ref = model(images).float()
    assert float((out.float() - ref).norm() / ref.norm()) < 0.5
    save(qmodel, tmp_path / "ckpt")
    assert torch.equal(load(tmp_path / "ckpt", model)(images), out)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_batchnorm_folds_within_half_precision_rounding(dtype, caplog):
    model, images = _half(dtype)
    with caplog.at_level(logging.WARNING):
        folded, pairs = fold_batchnorm(model, images)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")] and "left unfolded" not in caplog.text
    assert folded.conv1.weight.dtype == dtype and folded.conv1.bias.dtype == dtype


def test_a_bfloat16_model_exports_to_onnx_in_float32(tmp_path):
    pytest.importorskip("onnxruntime")
    from postquant.io import export_onnx

    model, images = _half(torch.bfloat16)
    qmodel = postquant.quantize(model, {"w_bits": 8, "a_bits": 8}, calib=images)
    result = export_onnx(qmodel, images[:2], tmp_path / "m.onnx", verify_batches=[images])
    assert result["top1_agreement"] >= 90.0 and result["sqnr_db"] > 25  # bfloat16 simulation vs float32 ORT
