"""Calibration data: whatever the user has (a DataLoader, an iterable of batches, a tensor, a callable),
turned into a bounded list of model inputs.

Batches stay where they come from (CPU or an accelerator); they are moved to the model's device (and float
dtype) where a model consumes them, by `move_batch` inside `run_model`, one batch at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from postquant.errors import DataError
from postquant.eval.run import model_placement, move_batch, run_model

log = logging.getLogger(__name__)

Batch = Any  # a Tensor, a tuple/list of positional tensors, or a dict (mapping) of keyword tensors
ForwardLoop = Callable[[nn.Module], None]

__all__ = [
    "Batch",
    "ForwardLoop",
    "as_calibration",
    "batch_size_of",
    "collect_batches",
    "forward_all",
    "model_placement",
    "move_batch",
    "run_model",
    "spread_batches",
]


def batch_size_of(batch: Batch) -> int:
    """Number of samples in a batch (size of the first tensor's first dimension)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        if isinstance(item, torch.Tensor):
            return item.shape[0]
    raise DataError("a calibration batch holds no tensor")


def _strip_labels(batch: Batch) -> Batch:
    """A DataLoader over a labelled dataset yields (inputs, labels): keep the inputs."""
    if (
        isinstance(batch, tuple | list)
        and len(batch) == 2
        and isinstance(batch[1], torch.Tensor)
        and batch[1].dim() == 1
        and not batch[1].is_floating_point()
        and isinstance(batch[0], torch.Tensor)
        and batch[0].shape[0] == batch[1].shape[0]
    ):
        return batch[0]
    return batch


def _check_batch(batch: Batch, index: int) -> None:
    tensors = (
        [batch]
        if isinstance(batch, torch.Tensor)
        else list(batch.values())
        if isinstance(batch, Mapping)
        else list(batch)
        if isinstance(batch, tuple | list)
        else None
    )
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(
            f"calibration batch {index} is a {type(batch).__name__}; expected a Tensor, a tuple of tensors "
            "or a dict of tensors (e.g. a DataLoader's batches)"
        )
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"calibration batch {index} holds NaN or Inf values")


def collect_batches(calib: Any, limit: int | None = None) -> list[Batch]:
    """Turn `calib` into a list of batches holding at most `limit` samples in total.

    Args:
        calib: a Tensor (one batch, split into chunks of 32), a DataLoader or any iterable of batches
            (labels in ``(inputs, labels)`` pairs are dropped).
        limit: the maximum number of samples (None: all).
    """
    if calib is None:
        raise DataError("no calibration data: pass calib=... (a DataLoader, batches or a tensor)")
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or calib.shape[0] == 0:
            raise DataError("the calibration tensor is empty")
        calib = list(torch.split(calib, 32))
    if isinstance(calib, Mapping):  # one tokenized batch (a dict or a tokenizer's BatchEncoding)
        calib = [calib]
    try:
        iterator = iter(calib)
    except TypeError as exc:
        raise DataError(f"calibration data of type {type(calib).__name__} is not iterable") from exc
    batches: list[Batch] = []
    seen = 0
    for i, batch in enumerate(iterator):
        batch = _strip_labels(batch)
        _check_batch(batch, i)
        n = batch_size_of(batch)
        if limit is not None and seen + n > limit:
            batch = _take(batch, limit - seen)
            n = limit - seen
        if n > 0:
            batches.append(batch)
            seen += n
        if limit is not None and seen >= limit:
            break
    if not batches:
        raise DataError("the calibration data is empty: it yielded no samples")
    log.debug("collected %d calibration samples in %d batches", seen, len(batches))
    return batches


def spread_batches(batches: list[Batch], max_samples: int) -> list[Batch]:
    """At most `max_samples` samples of `batches`: whole batches spread evenly over the list (a calibration
    set in class order still gives every part of it), the last one cut to fit; all of them if they fit."""
    sizes = [batch_size_of(b) for b in batches]
    if sum(sizes) <= max_samples:
        return list(batches)
    n = len(batches)
    for m in range(1, n + 1):
        picked = sorted({i * n // m for i in range(m)})
        if sum(sizes[i] for i in picked) >= max_samples:
            break
    out, seen = [], 0
    for i in picked:
        take = min(sizes[i], max_samples - seen)
        if take <= 0:
            break
        out.append(batches[i] if take == sizes[i] else _take(batches[i], take))
        seen += take
    return out


def _take(batch: Batch, n: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(t[:n] for t in batch)


def as_calibration(calib: Any, limit: int | None = None) -> list[Batch] | ForwardLoop:
    """Calibration data as a list of batches, or the user's `forward_loop(model)` callable unchanged."""
    if callable(calib) and not isinstance(calib, nn.Module | torch.Tensor) and not hasattr(calib, "__iter__"):
        return calib
    return collect_batches(calib, limit)


@torch.no_grad()
def forward_all(model: nn.Module, calib: list[Batch] | ForwardLoop) -> None:
    """Run `model` over all calibration data (the batches, or the user's forward loop)."""
    if callable(calib) and not isinstance(calib, list):
        calib(model)
        return
    for batch in calib:
        run_model(model, batch)
