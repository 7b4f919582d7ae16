"""Layers that compute a Linear in another layout, rewritten as `nn.Linear` so that every method handles them.

Hugging Face's ``Conv1D`` (GPT-2 and its relatives) computes ``x @ W + b`` with ``W`` of shape (in, out): the
transpose of a Linear's weight. Quantizing it per output channel needs the (out, in) layout that every grid,
rounding method and exporter here assumes, so it is replaced by the equivalent `nn.Linear` (same name, same
function, checked on a random input) before anything else happens.

Also: which modules with weights a plan leaves in float because no quantizer handles their type.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from postquant.errors import UnsupportedModelError
from postquant.model.walk import matches, set_module

log = logging.getLogger(__name__)

__all__ = ["float_weight_modules", "is_conv1d", "replace_conv1d", "with_linear_layers"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a Hugging Face ``Conv1D`` (``y = x @ W + b``, ``W`` of shape (in, ``nf``))."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def _as_linear(name: str, module: nn.Module) -> nn.Linear:
    weight = module.weight.detach()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, dtype=weight.dtype)
    linear = linear.to(weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias.detach())
        x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
        x = x.to(weight.device)
        want, got = module(x), linear(x)
    if want.shape != got.shape or not torch.allclose(
        want, got, rtol=1e-4, atol=1e-5 * float(want.abs().max())
    ):
        raise UnsupportedModelError(
            f"layer {name!r} ({type(module).__name__}) does not compute x @ weight + bias as Hugging Face's "
            "Conv1D does; exclude it with ignore=[...] or replace it by nn.Linear"
        )
    linear.train(module.training)
    return linear


def replace_conv1d(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` of `model` (in place) by the equivalent `nn.Linear`; return their names.

    Raises:
        UnsupportedModelError: a module named Conv1D computes something else.
    """
    names = [name for name, module in model.named_modules() if is_conv1d(module)]
    for name in names:
        set_module(model, name, _as_linear(name, model.get_submodule(name)))
    return names


def with_linear_layers(model: nn.Module) -> nn.Module:
    """`model` itself, or a copy of it with every ``Conv1D`` replaced by `nn.Linear` (the original is kept)."""
    if not any(is_conv1d(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    names = replace_conv1d(model)
    log.info("%d Conv1D layers (x @ W + b) quantized as the equivalent nn.Linear", len(names))
    return model


def float_weight_modules(model: nn.Module, planned: list[str], ignore: list[str]) -> dict[str, str]:
    """Modules that own a matrix or kernel weight (a parameter of 2+ dimensions with "weight" in its name,
    e.g. ``nn.MultiheadAttention.in_proj_weight``) that no plan entry covers and `ignore` does not name:
    name -> type. Embeddings are left out (lookups, kept in float on purpose)."""
    left = {}
    for name, module in model.named_modules():
        if name in planned or isinstance(module, nn.Embedding | nn.EmbeddingBag):
            continue
        owned = module._parameters.items()
        if not any(p is not None and p.dim() >= 2 and "weight" in key for key, p in owned):
            continue
        if not any(matches(name, module, p) for p in ignore):
            left[name] = type(module).__name__
    return left
