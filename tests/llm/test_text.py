"""Token windows from text, perplexity, and the causal-LM zoo entry's errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from postquant.calib.text import check_seqlen, eval_windows, random_windows, tokenize_file
from postquant.errors import CheckpointError, DataError
from postquant.eval.perplexity import perplexity


class CharTokenizer:
    """One token per character (code point modulo 50)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 50 for c in text]


@given(st.integers(20, 300), st.integers(2, 20), st.integers(0, 5))
@settings(max_examples=30, deadline=None)
def test_eval_windows_are_the_text_in_order(n: int, seqlen: int, extra: int) -> None:
    tokens = torch.arange(n)
    windows = eval_windows(tokens, seqlen, None)
    assert windows.shape == (n // seqlen, seqlen)
    torch.testing.assert_close(windows.flatten(), tokens[: windows.numel()], rtol=0, atol=0)
    assert eval_windows(tokens, seqlen, extra + 1).shape[0] == min(extra + 1, n // seqlen)


def test_random_windows_are_seeded_slices() -> None:
    tokens = torch.arange(1000)
    a = random_windows(tokens, 8, 32, seed=3)
    assert torch.equal(a, random_windows(tokens, 8, 32, seed=3))
    assert not torch.equal(a, random_windows(tokens, 8, 32, seed=4))
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(8, 32))  # consecutive tokens


def test_short_text_and_long_seqlen_are_clear_errors(tmp_path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("just a few words")
    tokens = tokenize_file(path, CharTokenizer())
    with pytest.raises(DataError, match="fewer than one window of 512"):
        random_windows(tokens, 4, 512)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(tokens, 512)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_file(tmp_path / "missing.txt", CharTokenizer())

    class WithContext(nn.Module):
        config = type("Config", (), {"max_position_embeddings": 128})()

    with pytest.raises(DataError, match=r"beyond the context .*128"):
        check_seqlen(WithContext(), 256)
    check_seqlen(WithContext(), 128)


class Uniform(nn.Module):
    """Logits all zero: every token has probability 1/vocab, so the perplexity is the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab) + self.p


def test_perplexity_of_a_uniform_model_is_the_vocabulary() -> None:
    windows = torch.randint(0, 37, (5, 9))
    result = perplexity(Uniform(37), windows, batch_size=2)
    assert result.tokens == 5 * 8 and result.windows == 5
    assert math.isclose(result.value, 37, rel_tol=1e-5)


def test_a_tokenizer_less_checkpoint_is_refused() -> None:
    from postquant_lab.zoo.causal_lm import causal_lm

    with pytest.raises(CheckpointError, match="no tokenizer"):
        causal_lm(nn.Linear(2, 2), None, "x")


def test_a_causal_lm_zoo_model_gives_windows_and_perplexity(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from postquant_lab.evaluate import evaluate
    from postquant_lab.zoo.causal_lm import causal_lm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    zoo = causal_lm(transformers.LlamaForCausalLM(config), CharTokenizer(), "tiny")
    zoo.seqlen, zoo.calib_seqlen = 32, 16
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 10)
    batches = zoo.calib_batches(text, limit=6, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 16), (2, 16)]
    result = evaluate(zoo.model, zoo, text, limit=3)
    assert result.metric == "perplexity" and result.n == 3 * 31
    windows = zoo.text_windows(text, evaluation=True, n=3)  # the same windows, scored here by hand
    with torch.no_grad():
        logits = zoo.model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), windows[:, 1:].reshape(-1))
    assert math.isclose(result.value, math.exp(float(nll)), rel_tol=1e-4)
    zoo.seqlen = 128
    with pytest.raises(DataError, match="beyond the context"):
        evaluate(zoo.model, zoo, text)
