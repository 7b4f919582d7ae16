"""Calling a model on one batch and taking its main output: the one rule every part of postquant uses.

Calibration, learned rounding (whole models and the unit outputs it caches), evaluation, fidelity and the
ONNX verification all call models through `call_model` / `run_model` and take the main tensor of what they
return with `main_output`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from postquant.nn.layer import cached_weights

__all__ = [
    "call_model",
    "eval_mode",
    "main_output",
    "model_placement",
    "move_batch",
    "output_tensors",
    "replace_main_output",
    "run_model",
    "token_mask",
]

# Attribute / key names of the main tensor in Hugging Face and similar output objects, in order of preference.
_OUTPUT_KEYS = ("logits", "last_hidden_state")


def _children(out: Any) -> list[tuple[Any, Any]]:
    """The (key, item) pairs of a mapping, tuple or list output, in order; nothing for anything else."""
    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, tuple | list):
        return list(enumerate(out))
    return []


def _main_path(out: Any) -> tuple[Any, ...] | None:
    """The keys leading from `out` to its main tensor (see `main_output`); None when it holds no tensor."""
    if isinstance(out, Tensor):
        return ()
    for key in _OUTPUT_KEYS:
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return (key,)
    for key, item in _children(out):
        path = _main_path(item)
        if path is not None:
            return (key, *path)
    return None


def main_output(out: Any) -> Tensor:
    """The main tensor of what a model (or a module) returns.

    The rule, in order:

    1. a tensor is its own main output;
    2. an output with a ``logits`` tensor, else a ``last_hidden_state`` tensor (a key of a dict or a Hugging
       Face ``ModelOutput``, or an attribute of another object): that tensor. A Hugging Face model given
       labels returns ``loss`` first; the main output is still its logits;
    3. otherwise the first item of a tuple or list, or the first value of a mapping, that holds a tensor,
       searched by the same rule (items without a tensor, such as None or a key/value cache object, are
       skipped).

    For a tensor, a tuple whose first item is a tensor and a ``ModelOutput`` whose first field is its logits or
    last hidden state (every Hugging Face output without a loss), this is the first tensor output, which is
    output 0 of an ONNX export (`output_tensors`).

    Args:
        out: a tensor, a Hugging Face ``ModelOutput``, a dict, an object with a ``logits`` /
            ``last_hidden_state`` attribute, or a (nested) tuple/list of them.

    Raises:
        TypeError: no tensor found.
    """
    path = _main_path(out)
    if path is None:
        raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")
    for key in path:
        out = _child(out, key)
    return out


def _child(out: Any, key: Any) -> Any:
    """Item `key` of a mapping, tuple or list; attribute `key` of anything else (or a named tuple's field)."""
    if isinstance(out, Mapping) or (isinstance(out, tuple | list) and isinstance(key, int)):
        return out[key]
    return getattr(out, key)


def replace_main_output(out: Any, tensor: Tensor) -> Any:
    """`out` with its main tensor (`main_output`) replaced by `tensor`, e.g. in a forward hook.

    Containers on the way are shallow copies (of the same type); `out` itself is not changed.

    Raises:
        TypeError: `out` holds no tensor.
    """
    path = _main_path(out)
    if path is None:
        raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")
    return _replace(out, path, tensor)


def _replace(out: Any, path: tuple[Any, ...], tensor: Tensor) -> Any:
    if not path:
        return tensor
    key, rest = path[0], path[1:]
    value = _replace(_child(out, key), rest, tensor)
    if isinstance(out, tuple | list):
        if hasattr(out, "_fields"):  # a named tuple
            return out._replace(**{out._fields[key] if isinstance(key, int) else key: value})
        items = list(out)
        items[key] = value
        return type(out)(items)
    new = copy.copy(out)
    if isinstance(out, Mapping):
        new[key] = value  # a Hugging Face ModelOutput sets the attribute too
    else:
        setattr(new, key, value)
    return new


def output_tensors(out: Any) -> list[Tensor]:
    """Every tensor of a model output, in order: tuple and list items, mapping values, depth first.

    This is the order of the outputs of an ONNX export of the model; `main_output` is one of them.
    """
    if isinstance(out, Tensor):
        return [out]
    return [t for _, item in _children(out) for t in output_tensors(item)]


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


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch and return what it returns.

    Dicts are passed as keyword arguments (``model(**batch)``, e.g. tokenizer outputs), tuples and lists as
    positional arguments (``model(*batch)``), anything else as the single argument (``model(batch)``).
    The batch is first moved to the model's device and float dtype (`model_placement`, `move_batch`), so
    calibration and evaluation data may come on any device; the output is on the model's device.

    Args:
        model: the model.
        batch: one batch of model inputs.
    """
    batch = move_batch(batch, *model_placement(model))
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def run_model(model: nn.Module, batch: Any) -> Tensor:
    """Call ``model`` on one batch (`call_model`) and return its main output tensor (`main_output`).

    Args:
        model: the model.
        batch: one batch of model inputs.

    Returns:
        The logits, or ``last_hidden_state`` for Hugging Face encoders.
    """
    return main_output(call_model(model, batch))


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
    """Put ``model`` in eval mode and inference mode, its quantized layers' dequantized weights kept between
    forwards (`postquant.nn.cached_weights`); restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(), cached_weights(model):
            yield model
    finally:
        for m, flag in flags:
            m.training = flag
