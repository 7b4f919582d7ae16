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
from postquant.model.convert import is_conv1d, replace_layers
from postquant.nn import QuantizedLayer

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
        replace_layers(model)
    with pytest.raises(UnsupportedModelError, match="'0'"):
        postquant.quantize(model, {"method": "rtn", "w_bits": 4})


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)  # no Linear form
        self.pos = nn.Parameter(torch.zeros(1, 48, 16))  # not a weight: no warning

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.up(self.conv(x))).flatten(1, 2) + self.pos
        return self.attn(y, y, y, need_weights=False)[0]


def test_weight_modules_without_a_quantizer_are_named(caplog):
    model = Upsampler().eval()
    with caplog.at_level(logging.WARNING, logger="postquant"):
        qmodel = postquant.quantize(model, {"method": "rtn", "w_bits": 4})
    message = caplog.records[-1].getMessage()
    assert message.startswith("3 modules with weights stay float")
    assert "up (ConvTranspose2d)" in message and "attn (MultiheadAttention)" in message
    assert "attn.out_proj" in message  # read as a tensor by the attention: a quantized layer would not run
    assert "norm (" not in message and "pos (" not in message  # norms and embeddings: no noise
    assert list(quantized_layers(qmodel)) == ["conv"]
    with torch.no_grad():
        qmodel(torch.randn(2, 3, 8, 8))  # runs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="postquant"):
        postquant.quantize(model, {"method": "rtn", "w_bits": 4, "ignore": ["up", "attn*"]})
    assert "stay float" not in caplog.text


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_pytorch_transformer_is_quantized_through_its_attention(batch_first):
    """nn.MultiheadAttention and the fused paths of nn.TransformerEncoder(Layer) read weights as tensors; the
    attention is rebuilt from Linear layers, so every projection is quantized and actually runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(4, 10, 32)
    x = x if batch_first else x.transpose(0, 1)
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[1, 7:] = True
    qmodel = postquant.quantize(model, {"method": "rtn", "w_bits": 4, "a_bits": 8}, calib=[x])
    names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "linear1",
        "linear2",
    )
    expected = sorted(f"layers.{i}.{name}" for i in (0, 1) for name in names)
    assert sorted(quantized_layers(qmodel)) == expected
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)  # the original is untouched

    calls = []
    for layer in qmodel.modules():
        if isinstance(layer, QuantizedLayer):
            layer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():  # inference: where PyTorch's fused paths would bypass the layers
        ref, out = model(x), qmodel(x)
        assert 0 < float((out - ref).norm() / ref.norm()) < 0.2
        ref, out = model(x, src_key_padding_mask=pad), qmodel(x, src_key_padding_mask=pad)
        keep = ~pad if batch_first else ~pad.t()  # padded positions are undefined
        assert 0 < float((out - ref)[keep].norm() / ref[keep].norm()) < 0.2
    assert len(calls) == 2 * len(expected)  # every quantized layer ran, in both calls
