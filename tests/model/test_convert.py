"""Hugging Face Conv1D (GPT-2) is quantized as the equivalent Linear; other weight modules are named, not
silently left float."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import postquant
from postquant.errors import UnsupportedModelError
from postquant.io import load, save
from postquant.model import quantized_layers
from postquant.model.convert import is_conv1d, replace_conv1d

transformers = pytest.importorskip("transformers")


@pytest.fixture
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_gpt2_conv1d_layers_are_quantized_like_linears(gpt2, method):
    conv1d = [name for name, m in gpt2.named_modules() if is_conv1d(m)]
    assert len(conv1d) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    recipe = {"method": method, "w_bits": 4}

    qmodel = postquant.quantize(gpt2, recipe)
    assert set(conv1d) <= set(quantized_layers(qmodel))
    # the original is untouched
    assert all(is_conv1d(gpt2.get_submodule(name)) for name in conv1d)
    assert all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())

    # the same codes as quantizing a model built with nn.Linear in the first place (weight = W^T)
    by_hand = transformers.GPT2LMHeadModel(gpt2.config).eval()
    by_hand.load_state_dict(gpt2.state_dict())
    for name in conv1d:
        layer = by_hand.get_submodule(name)
        linear = nn.Linear(layer.weight.shape[0], layer.nf)
        with torch.no_grad():
            linear.weight.copy_(layer.weight.t())
            linear.bias.copy_(layer.bias)
        postquant.model.set_module(by_hand, name, linear)
    reference = postquant.quantize(by_hand, recipe)
    for name in conv1d:
        assert torch.equal(quantized_layers(qmodel)[name].codes, quantized_layers(reference)[name].codes)
    ids = _ids()
    assert torch.equal(_logits(qmodel, ids), _logits(reference, ids))
    # and it is a 4-bit model of the float one: close, not equal
    err = (_logits(qmodel, ids) - _logits(gpt2, ids)).norm() / _logits(gpt2, ids).norm()
    assert 0 < err < 0.5


def test_gpt2_checkpoint_reloads_bit_exactly(gpt2, tmp_path):
    qmodel = postquant.quantize(
        gpt2, {"method": "rtn", "w_bits": 3, "granularity": "group", "group_size": 16}
    )
    save(qmodel, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt", model=gpt2)  # the float model as the user has it: Conv1D layers
    ids = _ids()
    assert torch.equal(_logits(again, ids), _logits(qmodel, ids))


class NotConv1D(nn.Module):
    """Named like Hugging Face's Conv1D, with its attributes, but computing something else."""

    def __init__(self) -> None:
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight + self.bias)


NotConv1D.__name__ = "Conv1D"


def test_a_conv1d_that_computes_something_else_is_refused():
    model = nn.Sequential(NotConv1D(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="does not compute x @ weight \\+ bias"):
        replace_conv1d(model)
    with pytest.raises(UnsupportedModelError, match="'0'"):
        postquant.quantize(model, {"method": "rtn", "w_bits": 4})


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)  # in_proj_weight is no Linear
        self.pos = nn.Parameter(torch.zeros(1, 48, 16))  # not a weight: no warning

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.up(self.conv(x))).flatten(1, 2) + self.pos
        return self.attn(y, y, y, need_weights=False)[0]


def test_weight_modules_without_a_quantizer_are_named(caplog):
    model = Upsampler().eval()
    with caplog.at_level(logging.WARNING, logger="postquant"):
        qmodel = postquant.quantize(model, {"method": "rtn", "w_bits": 4})
    assert "2 modules with weights stay float" in caplog.text
    assert "up (ConvTranspose2d)" in caplog.text and "attn (MultiheadAttention)" in caplog.text
    message = caplog.records[-1].getMessage()
    assert "norm (" not in message and "pos (" not in message  # norms and embeddings: no noise
    assert list(quantized_layers(qmodel)) == ["conv", "attn.out_proj"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="postquant"):
        postquant.quantize(model, {"method": "rtn", "w_bits": 4, "ignore": ["up", "attn"]})
    assert "stay float" not in caplog.text


def test_learned_rounding_on_a_causal_lm_runs_without_the_kv_cache(gpt2):
    """Decoder layers get a KV cache by default; learned rounding must not feed it (it would grow every step)."""
    ids = torch.randint(0, 100, (64, 12), generator=torch.Generator().manual_seed(2))
    calib = [{"input_ids": ids[i : i + 32]} for i in (0, 32)]
    learned = {"iters": 30, "progress": False}
    rtn = postquant.quantize(gpt2, {"method": "rtn", "w_bits": 3}, calib=calib)
    qmodel = postquant.quantize(gpt2, {"method": "learned", "w_bits": 3, "learned": learned}, calib=calib)
    ref = _logits(gpt2, ids)

    def err(m: nn.Module) -> float:
        return float((_logits(m, ids) - ref).norm() / ref.norm())

    assert err(qmodel) < err(rtn)
    assert qmodel.config.use_cache and gpt2.config.use_cache  # the user's setting is back
    prompt = ids[:2, :4]
    with torch.no_grad():
        cached = qmodel.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = qmodel.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
