"""`fidelity`: how closely a quantized model follows its float reference on the same inputs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn

from postquant.eval.metrics import sqnr_from_sums
from postquant.eval.run import eval_mode, run_model, token_mask

__all__ = ["fidelity"]


def fidelity(reference: nn.Module, candidate: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Compare two models output by output on the same batches.

    For tokenized batches with an ``attention_mask`` and (N, T, H) outputs (``last_hidden_state``), padding
    positions are left out.

    Args:
        reference: the float model.
        candidate: e.g. its quantized copy.
        batches: model inputs (tensors, tuples or tokenizer dicts), e.g. ``zoo.calib_batches(...)``.

    Returns:
        ``sqnr_db`` (SQNR of all outputs together, dB), ``max_abs_diff``, ``n`` (samples), and for 2-D outputs
        (logits) ``top1_agreement``: percent of samples where both models pick the same class.
    """
    signal = noise = 0.0
    max_abs = 0.0
    agree = samples = 0
    all_2d = True
    with eval_mode(reference), eval_mode(candidate):
        for batch in batches:
            ref, cand = run_model(reference, batch).double(), run_model(candidate, batch).double()
            if ref.shape != cand.shape:
                raise ValueError(
                    f"output shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}"
                )
            mask = token_mask(batch, ref)
            if mask is not None:
                ref, cand = ref[mask], cand[mask]  # (tokens, H)
            diff = ref - cand
            signal += float(ref.square().sum())
            noise += float(diff.square().sum())
            if diff.numel():
                max_abs = max(max_abs, float(diff.abs().max()))
            samples += int(mask.shape[0]) if mask is not None else int(ref.shape[0]) if ref.dim() else 1
            if ref.dim() == 2 and mask is None:
                agree += int((ref.argmax(dim=1) == cand.argmax(dim=1)).sum())
            else:
                all_2d = False
    if samples == 0:
        raise ValueError("fidelity needs at least one batch")
    result = {"sqnr_db": sqnr_from_sums(signal, noise), "max_abs_diff": max_abs, "n": float(samples)}
    result["top1_agreement"] = 100.0 * agree / samples if all_2d else math.nan
    return result
