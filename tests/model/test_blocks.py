"""Reconstruction units are found automatically on the real architectures (no weights, no data needed)."""

from __future__ import annotations

import pytest
import torch

import postquant
from postquant.model.blocks import make_units
from postquant_lab.zoo.resnet_cifar import resnet20


def rtn(model: torch.nn.Module) -> torch.nn.Module:
    return postquant.quantize(model, {"method": "rtn", "w_bits": 4})


def test_cifar_resnet_blocks_are_the_basic_blocks():
    torch.manual_seed(0)
    units = make_units(rtn(resnet20().eval()), "block")
    names = [u.name for u in units]
    assert names[0] == "conv1" and names[-1] == "linear"
    assert names[1:-1] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert units[1].layers == ("layer1.0.conv1", "layer1.0.conv2")
    pairs = [u.name for u in make_units(rtn(resnet20().eval()), "blocks", blocks_per_unit=2)]
    assert pairs[1:3] == ["layer1.0+layer1.1", "layer1.2"]  # runs never cross a stage


def test_efficientnet_lite_blocks_are_the_mbconv_blocks():
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install 'postquant[zoo]'")
    model = lite.EfficientNet.from_name("efficientnet-lite0").eval()
    units = make_units(rtn(model), "block")
    blocks = [u for u in units if u.name.startswith("_blocks.")]
    assert [u.name for u in blocks] == [f"_blocks.{i}" for i in range(16)]
    assert blocks[1].layers == (
        "_blocks.1._expand_conv",
        "_blocks.1._depthwise_conv",
        "_blocks.1._project_conv",
    )
    assert {u.name for u in units} - {u.name for u in blocks} == {"_conv_stem", "_conv_head", "_fc"}


def test_hugging_face_encoder_blocks_are_the_transformer_layers():
    transformers = pytest.importorskip("transformers", reason="pip install 'postquant[transformers]'")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    q = postquant.quantize(
        transformers.BertModel(config).eval(), {"method": "rtn", "w_bits": 4}, example_inputs=ids
    )
    units = make_units(q, "block")
    assert [u.name for u in units] == [
        "encoder.layer.0",
        "encoder.layer.1",
        "encoder.layer.2",
        "pooler.dense",
    ]
    assert len(units[0].layers) == 6  # q, k, v, attention output, intermediate, output
