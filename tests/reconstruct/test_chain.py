"""Chained caching: a unit's inputs carried from the previous unit's outputs give exactly the codes that
rerunning the model prefixes gives, and the prefix is rerun only where the chain does not hold."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import postquant
from postquant.nn import QuantizedLayer
from postquant.reconstruct.cache import _same
from postquant.reconstruct.capture import Captured
from tests.conftest import TinyResNet

pytestmark = pytest.mark.usefixtures("one_thread")


class MaskedBlock(nn.Module):
    """A residual MLP block called HF-style: hidden states first, a keyword mask (and a keyword flag)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x))) * mask[..., None] * (1.0 + 0.1 * depth)


class MaskedStack(nn.Module):
    """Three blocks fed one into the next; `depth_arg` passes each block a different keyword (no chain)."""

    def __init__(self, depth_arg: bool = False) -> None:
        super().__init__()
        self.layer = nn.ModuleList(MaskedBlock() for _ in range(3))
        self.head = nn.Linear(8, 3)
        self.depth_arg = depth_arg

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.layer):
            x = blk(x, mask=mask, depth=i) if self.depth_arg else blk(x, mask=mask)
        return self.head(x)


def masked_batches(n_batches: int = 3, size: int = 16, ragged: bool = False) -> list[dict[str, torch.Tensor]]:
    """Token batches; `ragged`: each batch has its own sequence length (the cache cannot merge them)."""
    g = torch.Generator().manual_seed(3)
    lengths = [5 + (i if ragged else 0) for i in range(n_batches)]
    return [
        {"x": torch.randn(size, t, 8, generator=g), "mask": (torch.rand(size, t, generator=g) > 0.2).float()}
        for t in lengths
    ]


def codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def without_chaining(recipe: dict) -> dict:
    """`recipe` with every unit cached from model prefixes (``learned.chain_inputs: false``)."""
    return {**recipe, "learned": {**recipe["learned"], "chain_inputs": False}}


def quantize_both_ways(model_fn, recipe: dict, calib, caplog) -> tuple[dict, dict, str]:
    """Codes with chained caching, codes with every unit cached from model prefixes, and the chained log."""
    with caplog.at_level(logging.INFO, logger="postquant.reconstruct.engine"):
        chained = codes(postquant.quantize(model_fn(), recipe, calib=calib))
    log = caplog.text
    prefixes = codes(postquant.quantize(model_fn(), without_chaining(recipe), calib=calib))
    return chained, prefixes, log


def recipe(a_bits: int | None, **learned) -> dict:
    fields = {"iters": 30, "progress": False, "first_last_w_bits": None, "batch_size": 16, **learned}
    return {"method": "qdrop", "w_bits": 3, "a_bits": a_bits, "learned": fields}


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet().eval()


@pytest.mark.parametrize("a_bits", [None, 4])
def test_chained_caching_gives_the_codes_of_prefix_caching_on_a_resnet(caplog, a_bits):
    calib = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    chained, prefixes, log = quantize_both_ways(tiny_resnet, recipe(a_bits), calib, caplog)
    assert chained.keys() == prefixes.keys()
    for name in chained:
        assert torch.equal(chained[name], prefixes[name]), name
    # conv1 -> (functional ReLU) -> stage.0 does not chain; stage.0 -> stage.1 does; stage.1 -> (mean) -> fc not.
    assert "1 of 4 units cached from the previous unit's outputs" in log


@pytest.mark.parametrize(("drop_prob", "ragged"), [(0.0, False), (0.5, False), (0.5, True)])
def test_chained_caching_carries_keyword_arguments(caplog, drop_prob, ragged):
    torch.manual_seed(0)
    chained, prefixes, log = quantize_both_ways(
        MaskedStack, recipe(None, drop_prob=drop_prob), masked_batches(ragged=ragged), caplog
    )
    for name in chained:
        assert torch.equal(chained[name], prefixes[name]), name
    # layer.0 -> layer.1 -> layer.2 chain (same mask); layer.2 -> head does not (the head takes no mask).
    assert "2 of 4 units cached from the previous unit's outputs" in log


def test_a_different_keyword_per_unit_falls_back_to_prefixes(caplog):
    torch.manual_seed(0)
    chained, prefixes, log = quantize_both_ways(
        lambda: MaskedStack(depth_arg=True), recipe(None), masked_batches(), caplog
    )
    for name in chained:
        assert torch.equal(chained[name], prefixes[name]), name
    # Each block gets its own `depth`, so the carried keywords are wrong: nothing chains.
    assert "cached from the previous unit's outputs" not in log


def test_the_report_names_the_chained_units_and_chain_inputs_false_turns_chaining_off():
    """A chained unit takes batches 1.. from the unit before (the model prefixes run on batch 0 only, to check
    the chain); the learned-rounding report names those units."""
    batches = masked_batches(n_batches=6)
    torch.manual_seed(0)
    q = postquant.quantize(MaskedStack(), recipe(None, iters=2), calib=batches)
    assert postquant.result(q).learned.chained_units == ["layer.1", "layer.2"]
    torch.manual_seed(0)
    q = postquant.quantize(MaskedStack(), without_chaining(recipe(None, iters=2)), calib=batches)
    assert postquant.result(q).learned.chained_units == []


def test_same_compares_structure_and_values():
    t = torch.randn(4, 3)
    assert _same(
        Captured((t,), {"m": t, "flag": True}), Captured((t.clone(),), {"m": t.clone(), "flag": True})
    )
    assert _same(t, t + 1e-9 * t.abs().max())  # float rounding of another kernel path
    assert not _same(t, t + 1e-3)
    assert not _same(Captured((t,), {"flag": True}), Captured((t,), {"flag": False}))
    assert not _same(Captured((t,), {}), Captured((t, t), {}))
    assert not _same(t, t.double())
    assert not _same(t, t[:2])
