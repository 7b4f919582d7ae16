"""Calling a model on one batch, whatever the batch and output types, on the device the model lives on."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["eval_mode", "main_output", "model_placement", "move_batch", "run_model", "token_mask"]

# Attribute / key names of the main tensor in Hugging Face and similar output objects, in order of preference.
_OUTPUT_KEYS = ("logits", "last_hidden_state")


def main_output(out: Any) -> Tensor:
    """The main tensor of a model output: itself, ``logits`` / ``last_hidden_state``, or the first item.

    Args:
        out: a tensor, a Hugging Face ``ModelOutput``, a dict, or a tuple/list whose first item is the output.

    Raises:
        TypeError: no tensor found.
    """
    if isinstance(out, Tensor):
        return out
    for key in _OUTPUT_KEYS:
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, Mapping) and out:
        return main_output(next(iter(out.values())))
    if isinstance(out, tuple | list) and out:
        return main_output(out[0])
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Where `model` computes: the device of its first parameter (else buffer; else the CPU), and the float
    dtype its floating parameters share (None when they have several dtypes, or none)."""
    params = list(model.parameters())
    first = next(iter(params), None)
    if first is None:
        first = next(model.buffers(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    return device, (dtypes.pop() if len(dtypes) == 1 else None)


def move_batch(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """`batch` with every tensor on `device` and every floating tensor in `dtype` (if given).

    Nested tuples, lists and dicts are walked (`torch.utils._pytree`); a mapping that is not a dict (a
    tokenizer's ``BatchEncoding``) becomes a dict. Integer tensors (token ids, masks) keep their dtype, and
    tensors already in place are returned as they are (no copy).
    """

    def other_mapping(x: Any) -> bool:  # a mapping pytree does not know (it would be a leaf)
        return isinstance(x, Mapping) and not isinstance(x, dict)

    def move(t: Any) -> Any:
        if other_mapping(t):
            return move_batch(dict(t), device, dtype)
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return tree_map(move, batch, is_leaf=other_mapping)


def run_model(model: nn.Module, batch: Any) -> Tensor:
    """Call ``model`` on one batch and return its main output tensor (see `main_output`).

    Dicts are passed as keyword arguments (``model(**batch)``, e.g. tokenizer outputs), tuples and lists as
    positional arguments (``model(*batch)``), anything else as the single argument (``model(batch)``).
    The batch is first moved to the model's device and float dtype (`model_placement`, `move_batch`), so
    calibration and evaluation data may come on any device; the output is on the model's device.

    Args:
        model: the model.
        batch: one batch of model inputs.

    Returns:
        The logits, or ``last_hidden_state`` for Hugging Face encoders.
    """
    batch = move_batch(batch, *model_placement(model))
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, tuple | list):
        out = model(*batch)
    else:
        out = model(batch)
    return main_output(out)


def token_mask(batch: Any, out: Tensor) -> Tensor | None:
    """For (N, T, H) encoder outputs of a tokenized batch: the (N, T) bool mask of its real (unpadded) tokens.

    None when `batch` has no ``attention_mask`` tensor of shape (N, T) or `out` is not (N, T, H). The mask is
    on `out`'s device.
    """
    if out.dim() == 3 and isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        mask = batch["attention_mask"]
        if mask.shape == out.shape[:2]:
            return mask.to(out.device).bool()
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and inference mode; restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        for m, flag in flags:
            m.training = flag
