"""Perplexity of a causal language model on token windows: ``exp`` of the mean next-token cross-entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from postquant.eval.run import main_output, model_placement
from postquant.nn.layer import cached_weights

__all__ = ["Perplexity", "perplexity"]


@dataclass(frozen=True)
class Perplexity:
    """``value = exp(nll)``; `tokens`: the predicted tokens it averages over (windows x (seqlen - 1))."""

    value: float
    nll: float
    tokens: int
    windows: int


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Perplexity:
    """Perplexity of `model` on `windows` (windows, seqlen) of token ids, each window scored on its own.

    Every window predicts its tokens 2..seqlen from the ones before (no context across windows), as
    GPTQ's and AutoRound's WikiText evaluation; the model runs without its key/value cache.

    Args:
        model: a causal LM called as ``model(input_ids)`` whose output (or ``.logits``) is (B, L, vocab).
        windows: int64 token ids, (windows, seqlen).
        batch_size: windows per forward pass.
    """
    device = model_placement(model)[0]
    total, count = 0.0, 0
    with cached_weights(model):  # quantized layers dequantize once, not per window batch
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)  # (B, L)
            kwargs = (
                {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) else {}
            )
            logits = main_output(model(ids, **kwargs)).float()  # (B, L, V)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += ids[:, 1:].numel()
    nll = total / max(count, 1)
    return Perplexity(math.exp(nll), nll, count, int(windows.shape[0]))
