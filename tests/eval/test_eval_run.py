"""run_model and fidelity on tiny models."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from postquant.eval import fidelity, main_output, run_model
from postquant_lab.evaluate import mean_pool


class Adder(nn.Module):
    def forward(self, a, b=None):
        return a if b is None else a + b


@dataclass
class FakeHFOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class FakeEncoder(nn.Module):
    """Token embedding -> linear; returns an HF-like output object."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.embed(input_ids))  # (N, T, 4)
        return FakeHFOutput(h, h[:, 0])


def test_run_model_dispatch():
    x = torch.ones(2, 3)
    assert run_model(Adder(), x) is x
    torch.testing.assert_close(run_model(Adder(), (x, x)), 2 * x)
    torch.testing.assert_close(run_model(Adder(), [x, x]), 2 * x)
    torch.testing.assert_close(run_model(Adder(), {"a": x, "b": x}), 2 * x)


def test_main_output():
    t = torch.zeros(1)
    assert main_output(FakeHFOutput(t, torch.ones(1))) is t
    assert main_output({"logits": t, "loss": torch.ones(1)}) is t
    assert main_output((t, torch.ones(1))) is t
    with pytest.raises(TypeError, match="cannot find the output tensor"):
        main_output("text")


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(h, mask), torch.tensor([[2.0, 3.0]]))


def test_fidelity_identical_and_perturbed():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    cand = copy.deepcopy(ref)
    batches = [torch.randn(32, 8) for _ in range(3)]
    same = fidelity(ref, cand, batches)
    assert same == {"sqnr_db": math.inf, "max_abs_diff": 0.0, "n": 96.0, "top1_agreement": 100.0}

    with torch.no_grad():
        cand[2].weight.add_(0.3 * torch.randn_like(cand[2].weight))
    ref.train()  # fidelity runs in eval mode and restores the flags
    cand.eval()
    got = fidelity(ref, cand, batches)
    assert ref.training and not cand.training
    with torch.no_grad():
        r, c = torch.cat([ref(b) for b in batches]), torch.cat([cand(b) for b in batches])
    assert got["top1_agreement"] == pytest.approx(100.0 * (r.argmax(1) == c.argmax(1)).double().mean().item())
    signal, noise = r.double().square().sum(), (r - c).double().square().sum()
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise))
    assert got["max_abs_diff"] == pytest.approx((r - c).abs().max().item())


def test_fidelity_on_tokens_skips_padding():
    ref = FakeEncoder()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.embed.weight[0] += 1.0  # token 0 is the padding token: only padded positions differ
    batch = {
        "input_ids": torch.tensor([[3, 4, 0], [5, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
    }
    got = fidelity(ref, cand, [batch])
    assert got["sqnr_db"] == math.inf and got["max_abs_diff"] == 0.0 and got["n"] == 2.0
    assert math.isnan(got["top1_agreement"])  # not logits
    batch["input_ids"][1, 1] = 0
    batch["attention_mask"][1, 1] = 1  # now a real token 0 differs
    assert fidelity(ref, cand, [batch])["sqnr_db"] < 100
