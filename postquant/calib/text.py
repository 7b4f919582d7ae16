"""Token windows from plain text, for causal language models: calibration and perplexity evaluation.

The tokenizer is the caller's (any object with ``encode(text) -> list[int]``, e.g. a Hugging Face tokenizer);
postquant does not import transformers here. Calibration takes `n` windows of `seqlen` tokens at random,
seeded, start positions (GPTQ's C4 recipe); evaluation takes non-overlapping windows from the start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from postquant.errors import DataError

__all__ = ["Tokenizer", "check_seqlen", "eval_windows", "random_windows", "tokenize_file"]

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What postquant needs from a tokenizer: text to token ids."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]: ...


def tokenize_file(path: str | Path, tokenizer: Tokenizer) -> torch.Tensor:
    """All tokens of a UTF-8 text file, as a 1-D int64 tensor (no special tokens added).

    Raises:
        DataError: the file is missing or holds no tokens.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file {path} does not exist; pass an existing UTF-8 text file")
    text = path.read_text(encoding="utf-8")
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # a tokenizer without that keyword
        ids = tokenizer.encode(text)
    if not ids:
        raise DataError(f"text file {path} holds no tokens; pass a file with text in it")
    return torch.tensor(ids, dtype=torch.long)


def _need_one_window(tokens: torch.Tensor, seqlen: int, what: str) -> None:
    if seqlen < 2:
        raise DataError(f"seqlen {seqlen} is too short: a window needs at least 2 tokens")
    if tokens.numel() < seqlen:
        raise DataError(
            f"the {what} text has {tokens.numel()} tokens, fewer than one window of {seqlen}: pass a longer "
            f"file or a smaller seqlen (at most {tokens.numel()})"
        )


def random_windows(tokens: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n` windows of `seqlen` consecutive tokens at uniformly drawn start positions (seeded): (n, seqlen).

    Raises:
        DataError: fewer tokens than one window, or `n` < 1.
    """
    _need_one_window(tokens, seqlen, "calibration")
    if n < 1:
        raise DataError(f"calibration needs at least one window, got n={n}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])  # (n, seqlen)


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start (the tail shorter than a window is dropped),
    at most `limit` of them: (windows, seqlen).

    Raises:
        DataError: fewer tokens than one window.
    """
    _need_one_window(tokens, seqlen, "evaluation")
    count = tokens.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    return tokens[: count * seqlen].view(count, seqlen)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """Raise a `DataError` when `seqlen` exceeds the model's context (``config.max_position_embeddings``,
    or GPT-2's ``n_positions``); models that do not say are not checked."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and seqlen > context:
        raise DataError(
            f"seqlen {seqlen} is beyond the context of {type(model).__name__} ({context} positions): pass "
            f"--seqlen {context} or less"
        )
