"""run_model and fidelity on tiny models."""

from __future__ import annotations

import copy
import math
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from postquant.eval import fidelity, main_output, run_model
from postquant.eval.run import output_tensors, replace_main_output
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


T, U, V = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2,), 2.0)  # main, other, loss-like
Pair = namedtuple("Pair", ["out", "aux"])


def _hf_outputs() -> list:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

    return [
        # a Hugging Face encoder: last_hidden_state first (all three former rules)
        pytest.param(BaseModelOutputWithPooling(last_hidden_state=T, pooler_output=U), 0, id="hf-encoder"),
        # a classifier without labels: logits is the first (and only) field
        pytest.param(SequenceClassifierOutput(logits=T), 0, id="hf-logits"),
        # with labels the loss comes first; the main output is still the logits (eval's rule)
        pytest.param(SequenceClassifierOutput(loss=V, logits=T), 1, id="hf-loss-first"),
        pytest.param(transformers.utils.ModelOutput(hidden=T, other=U), 0, id="modeloutput-first-field"),
    ]


# (output, index of the main output among output_tensors): every case one of the three former rules
# (eval/run.py main_output, reconstruct/cache.py first_tensor, io/onnx_export.py _first_tensor) handled
CASES = [
    pytest.param(T, 0, id="tensor"),
    pytest.param((T, U), 0, id="tuple"),
    pytest.param([T, U], 0, id="list"),
    pytest.param(Pair(T, U), 0, id="namedtuple"),
    pytest.param({"logits": T, "loss": V}, 0, id="dict-logits"),
    pytest.param({"loss": V, "logits": T}, 1, id="dict-logits-second"),
    pytest.param({"last_hidden_state": T}, 0, id="dict-hidden"),
    pytest.param({"features": T, "other": U}, 0, id="dict-first-value"),
    pytest.param((None, T, U), 0, id="tuple-skips-none"),  # the ONNX rule: the first tensor item
    pytest.param(((T, U), V), 0, id="nested-tuple"),  # eval's rule: the first item's main output
    pytest.param(({"logits": T}, U), 0, id="tuple-of-dict"),
]


def _check_main(out, index: int) -> None:
    assert main_output(out) is T
    assert [i for i, t in enumerate(output_tensors(out)) if t is T] == [index]  # the ONNX output compared
    z = torch.full_like(T, 7.0)
    replaced = replace_main_output(out, z)
    assert main_output(replaced) is z
    assert [id(t) for t in output_tensors(replaced) if t is not z] == [
        id(t) for t in output_tensors(out) if t is not T
    ]  # the other outputs are kept


@pytest.mark.parametrize(("out", "index"), CASES)
def test_main_output_of_every_output_type(out, index):
    _check_main(out, index)


def test_main_output_of_hugging_face_outputs():
    for param in _hf_outputs():
        out, index = param.values
        _check_main(out, index)


def test_main_output_of_an_object_with_an_output_attribute():
    out = FakeHFOutput(T, U)  # a dataclass, not a mapping: found by attribute
    assert main_output(out) is T
    assert output_tensors(out) == []  # not an exportable output
    z = torch.ones(1)
    replaced = replace_main_output(out, z)
    assert replaced.last_hidden_state is z and replaced.pooler_output is U and out.last_hidden_state is T


@pytest.mark.parametrize("out", ["text", (), {}, (None, 1), {"logits": None}], ids=repr)
def test_main_output_without_a_tensor_is_a_type_error(out):
    with pytest.raises(TypeError, match="cannot find the output tensor"):
        main_output(out)
    with pytest.raises(TypeError, match="cannot find the output tensor"):
        replace_main_output(out, T)


def _outputs(leaf: st.SearchStrategy) -> st.SearchStrategy:
    names = st.sampled_from(["a", "b", "hidden", "out"])  # never logits / last_hidden_state
    return st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, max_size=3).map(tuple)
            | st.lists(inner, max_size=3)
            | st.dictionaries(names, inner, max_size=3)
        ),
        max_leaves=8,
    )


@settings(max_examples=200, deadline=None)
@given(
    _outputs(
        st.one_of(
            st.none(), st.integers(0, 3), st.builds(lambda k: torch.full((1,), float(k)), st.integers())
        )
    )
)
def test_without_named_outputs_the_main_output_is_the_first_tensor(out):
    """Property: with no logits/last_hidden_state key, the main output is the first tensor in ONNX output
    order, and replacing it changes that tensor only."""
    tensors = output_tensors(out)
    if not tensors:
        with pytest.raises(TypeError):
            main_output(out)
        return
    assert main_output(out) is tensors[0]
    z = torch.zeros(1)
    after = output_tensors(replace_main_output(out, z))
    assert after[0] is z and len(after) == len(tensors)
    assert all(a is b for a, b in zip(after[1:], tensors[1:], strict=True))


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
