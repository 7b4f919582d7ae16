"""Layers that compute Linears in another form, rebuilt from `nn.Linear` so that every method handles them.

- Hugging Face's ``Conv1D`` (GPT-2 and its relatives) computes ``x @ W + b`` with ``W`` of shape (in, out),
  the transpose of a Linear's weight. Quantizing per output channel needs the (out, in) layout that every
  grid, rounding method and exporter here assumes: it becomes the equivalent `nn.Linear`.
- ``nn.MultiheadAttention`` packs q/k/v into one parameter and reads ``out_proj.weight`` as a tensor: it
  becomes a `postquant.nn.attention.LinearAttention` (four Linears, the same call signature).

Each replacement keeps the module's name and is checked against the original on a random input. Also: which
modules with weights a plan leaves in float because no quantizer handles their type.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from postquant.errors import UnsupportedModelError
from postquant.model.walk import matches, set_module
from postquant.nn.attention import LinearAttention, convertible

log = logging.getLogger(__name__)

__all__ = ["float_weight_modules", "is_conv1d", "replace_layers", "with_linear_layers"]


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


def _replaceable(module: nn.Module) -> bool:
    return is_conv1d(module) or (isinstance(module, nn.MultiheadAttention) and convertible(module) is None)


def _same(want: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> bool:
    return all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
        for a, b in zip(want, got, strict=True)
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
        if not _same([module(x)], [linear(x)]):
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) does not compute x @ weight + bias as Hugging Face's "
                "Conv1D does; exclude it with ignore=[...] or replace it by nn.Linear"
            )
    linear.train(module.training)
    return linear


def _as_attention(name: str, mha: nn.MultiheadAttention) -> LinearAttention:
    attention = LinearAttention(mha)
    weight = mha.out_proj.weight
    gen = torch.Generator().manual_seed(0)

    def sample(length: int, dim: int) -> torch.Tensor:
        shape = (2, length, dim) if mha.batch_first else (length, 2, dim)
        return torch.randn(shape, generator=gen, dtype=weight.dtype).to(weight.device)

    inputs = (sample(5, mha.embed_dim), sample(4, mha.kdim), sample(4, mha.vdim))
    padding = torch.tensor([[False] * 4, [False] * 3 + [True]], device=weight.device)
    training = mha.training
    mha.eval()
    attention.eval()
    with torch.no_grad():
        same = _same(mha(*inputs, key_padding_mask=padding), attention(*inputs, key_padding_mask=padding))
    mha.train(training)
    attention.train(training)
    if not same:
        raise UnsupportedModelError(
            f"the attention {name!r} could not be rebuilt from Linear layers exactly; exclude it with ignore=[...]"
        )
    return attention


def replace_layers(model: nn.Module) -> list[str]:
    """Replace (in place) every ``Conv1D`` by `nn.Linear` and every convertible ``nn.MultiheadAttention`` by a
    `LinearAttention`; return the names replaced.

    Raises:
        UnsupportedModelError: a replacement does not compute what the original does.
    """
    modules = dict(model.named_modules())
    names = [name for name, module in modules.items() if _replaceable(module)]
    for name in names:
        module = modules[name]
        new = _as_linear(name, module) if is_conv1d(module) else _as_attention(name, module)
        set_module(model, name, new)
    for module in modules.values():
        if names and isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # that path reads the attention's packed weights
    return names


def with_linear_layers(model: nn.Module) -> nn.Module:
    """`model` itself, or a copy of it with `replace_layers` applied (the original is kept)."""
    if not any(_replaceable(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    names = replace_layers(model)
    log.info(
        "%d layers rebuilt from nn.Linear (Conv1D, MultiheadAttention): %s", len(names), ", ".join(names)
    )
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
