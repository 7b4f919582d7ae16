"""Metrics as pure functions: top-k accuracy, Spearman / Pearson correlation, SQNR."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from postquant.errors import DataError

__all__ = [
    "average_ranks",
    "pearson",
    "spearman",
    "sqnr_db",
    "sqnr_from_sums",
    "topk_accuracy",
    "topk_correct",
]


def _as_1d(x: Any) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    return arr.reshape(-1)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # first element of each run of ties
    group = np.cumsum(starts) - 1  # (n,) run id of each sorted element
    bounds = np.r_[np.flatnonzero(starts), len(x)]  # run i covers sorted positions bounds[i]..bounds[i+1]-1
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0  # average of 1-based ranks in each run
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two 1-D sequences; NaN when one is constant, has fewer than 2 items or holds NaN."""
    x, y = _as_1d(a), _as_1d(b)
    if x.shape != y.shape:
        raise ValueError(f"pearson needs two sequences of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    if denom == 0.0:
        return math.nan
    return float(np.clip(float(x @ y) / denom, -1.0, 1.0))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks), in -1..1.

    Args:
        a, b: 1-D sequences (lists, numpy arrays or tensors) of equal length.

    Returns:
        The correlation; NaN when either is constant, shorter than 2, or holds NaN.
    """
    x, y = _as_1d(a), _as_1d(b)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs two sequences of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    return pearson(average_ranks(x), average_ranks(y))


def topk_correct(logits: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Count samples whose label is among the top k logits, for each k.

    Ties count against the model: the label is in the top k when fewer than k *other* classes have a logit
    greater than or equal to it, so a model with constant logits scores 0, not 100. Rows with a NaN are wrong.

    Args:
        logits: (N, C) scores.
        labels: (N,) class indices.
        ks: the k values (k > C counts as C).

    Returns:
        ``{k: number correct}``.
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, device=logits.device).long()
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"topk needs (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= logits.shape[1]:
            raise DataError(
                f"labels must be class indices in [0, {logits.shape[1]}) for a model with {logits.shape[1]} "
                f"outputs, got labels from {lo} to {hi}; check the label file and that the model's classes match"
            )
    true = logits.gather(1, labels[:, None])  # (N, 1)
    others_at_least = (logits >= true).sum(dim=1) - 1  # (N,) classes other than the label scoring >= it
    valid = ~torch.isnan(logits).any(dim=1)
    return {k: int(((others_at_least < k) & valid).sum()) for k in ks}


def topk_accuracy(logits: Any, labels: Any, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent (0..100) for each k, e.g. ``{"top1": 81.0, "top5": 98.9}``.

    Args:
        logits: (N, C) scores (tensor or array).
        labels: (N,) class indices.
        ks: the k values.
    """
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    n = logits.shape[0] if logits.dim() else 0
    counts = topk_correct(logits, labels, ks)
    return {f"top{k}": (100.0 * c / n if n else math.nan) for k, c in counts.items()}


def sqnr_db(reference: Tensor, candidate: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - cand)^2)`` in dB, in float64.

    Returns ``inf`` when the tensors are equal and ``-inf`` when the reference is zero but the candidate is not.

    Raises:
        ValueError: shapes differ.
    """
    ref, cand = torch.as_tensor(reference), torch.as_tensor(candidate)
    if ref.shape != cand.shape:
        raise ValueError(
            f"sqnr_db needs tensors of the same shape, got {tuple(ref.shape)} and {tuple(cand.shape)}"
        )
    ref, cand = ref.detach().double(), cand.detach().double()
    return sqnr_from_sums(float(ref.square().sum()), float((ref - cand).square().sum()))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from accumulated ``sum ref^2`` and ``sum (ref - cand)^2``."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
