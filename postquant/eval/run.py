"""Calling a model on one batch, whatever the batch and output types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["main_output", "run_model", "token_mask"]

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


def run_model(model: nn.Module, batch: Any) -> Tensor:
    """Call ``model`` on one batch and return its main output tensor (see `main_output`).

    Dicts are passed as keyword arguments (``model(**batch)``, e.g. tokenizer outputs), tuples and lists as
    positional arguments (``model(*batch)``), anything else as the single argument (``model(batch)``).

    Args:
        model: the model.
        batch: one batch of model inputs.

    Returns:
        The logits, or ``last_hidden_state`` for Hugging Face encoders.
    """
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, tuple | list):
        out = model(*batch)
    else:
        out = model(batch)
    return main_output(out)


def token_mask(batch: Any, out: Tensor) -> Tensor | None:
    """For (N, T, H) encoder outputs of a tokenized batch: the (N, T) bool mask of its real (unpadded) tokens.

    None when `batch` has no ``attention_mask`` tensor of shape (N, T) or `out` is not (N, T, H).
    """
    if out.dim() == 3 and isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        mask = batch["attention_mask"]
        if mask.shape == out.shape[:2]:
            return mask.bool()
    return None
