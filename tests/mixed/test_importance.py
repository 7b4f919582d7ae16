"""Importance measures: finite non-negative cost tables that fall with bits; Q_b is the real quantizer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import postquant
from postquant.errors import DataError
from postquant.mixed import Importance
from postquant.mixed.importance import (
    gradient_moments,
    importance_table,
    loss_costs,
    output_distance,
    quantized_weight,
)
from postquant.model import fold_batchnorm, quantizable_layers, quantized_layers
from postquant.recipe import Recipe

BITS = [2, 3, 4, 6, 8]


class TinyEncoder(nn.Module):
    """A text-like model: token ids + attention mask -> {"last_hidden_state": (N, T, H), "pooler_output"}."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)
        self.pooler = nn.Linear(16, 16)  # like BERT's pooler: computed, but not part of the main output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.out(torch.relu(self.proj(self.embed(input_ids)))) * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": h, "pooler_output": self.pooler(h[:, 0])}


def _text_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 50, (8, 6), generator=gen)
        mask = torch.ones(8, 6, dtype=torch.long)
        mask[:4, 4:] = 0  # padded sentences
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _folded(tiny_cnn, images):
    model, _ = fold_batchnorm(tiny_cnn, images)
    return model


@pytest.mark.parametrize("importance", list(Importance), ids=lambda i: i.value)
def test_costs_are_finite_non_negative_and_fall_with_bits(tiny_cnn, images, importance):
    model = _folded(tiny_cnn, images)
    layers = list(quantizable_layers(model))
    table = importance_table(model, layers, BITS, Recipe(), importance, list(images.split(8)), 16)
    assert list(table) == layers
    for name, row in table.items():
        assert list(row) == BITS
        assert all(math.isfinite(c) and c >= 0 for c in row.values()), (name, row)
        assert row[2] > row[8], (name, row)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("importance", [Importance.LOSS, Importance.DATAFREE], ids=lambda i: i.value)
def test_costs_are_monotone_on_a_well_sampled_toy(importance):
    # 512 Gaussian inputs through a small MLP: every extra bit must lower the measured damage
    model = _mlp()
    batches = list(torch.randn(512, 16, generator=torch.Generator().manual_seed(2)).split(128))
    table = importance_table(model, ["0", "2", "4"], BITS, Recipe(), importance, batches)
    for row in table.values():
        assert all(row[a] > row[b] for a, b in itertools.pairwise(BITS)), row


@pytest.mark.parametrize("importance", list(Importance), ids=lambda i: i.value)
def test_text_model_with_dict_batches(importance):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    layers = ["proj", "out", "pooler"]
    table = importance_table(model, layers, [2, 8], Recipe(), importance, _text_batches())
    for name in ("proj", "out"):
        assert (
            all(math.isfinite(c) and c >= 0 for c in table[name].values()) and table[name][2] > table[name][8]
        )
    if importance is not Importance.DATAFREE:  # the pooler does not reach the main output: no damage
        assert table["pooler"] == {2: 0.0, 8: 0.0}


def test_masked_positions_do_not_count():
    ref = torch.zeros(2, 3, 4)
    out = ref.clone()
    out[0, 2] = 100.0  # a padded position
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]).unsqueeze(-1)
    assert float(output_distance(out, ref, mask)) == 0.0
    assert float(output_distance(out, ref)) > 0
    logits = torch.randn(5, 10)
    assert float(output_distance(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(output_distance(logits + torch.randn(5, 10), logits)) > 0


def test_loss_and_gradients_leave_the_model_unchanged(tiny_cnn, images):
    model = _folded(tiny_cnn, images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    loss_costs(model, ["conv1", "fc"], [2, 4], Recipe(), [images])
    grad_abs, fisher = gradient_moments(model, ["conv1", "fc"], list(images.split(8)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert grad_abs["fc"].shape == model.fc.weight.shape and float(fisher["conv1"].sum()) > 0


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_q_b_is_what_quantize_installs(tiny_cnn, images, method):
    recipe = Recipe.coerce({"method": method, "w_bits": 3, "overrides": {}})
    qmodel = postquant.quantize(tiny_cnn, recipe, example_inputs=images)
    model = _folded(tiny_cnn, images)
    for name, layer in quantized_layers(qmodel).items():
        w_hat = quantized_weight(model.get_submodule(name).weight.detach(), 3, recipe)
        torch.testing.assert_close(w_hat, layer.weight, rtol=0, atol=0)


def test_data_driven_measures_need_batches(tiny_cnn):
    with pytest.raises(DataError, match=r"importance 'loss' needs calibration batches.*datafree"):
        importance_table(tiny_cnn, ["fc"], BITS, Recipe(), "loss", None)
