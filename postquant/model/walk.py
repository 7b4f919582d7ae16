"""Finding quantizable layers by fully-qualified name, with ignore patterns."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator

from torch import nn

from postquant.nn import QUANTIZABLE, DynamicActQuantizer, QuantizedEmbedding, QuantizedLayer


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether a layer matches a pattern.

    A pattern is a glob on the fully-qualified name (``"layer1.*"``, ``"fc"``), a type name
    (``"Linear"``, ``"type:Conv2d"``; subclasses count), or ``"re:<regex>"`` matched against the name.
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if pattern.startswith("type:"):
        pattern = pattern[5:]
        return any(cls.__name__ == pattern for cls in type(module).__mro__)
    if fnmatch.fnmatchcase(name, pattern):
        return True
    return any(cls.__name__ == pattern for cls in type(module).__mro__ if cls is not nn.Module)


def quantizable_layers(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Conv1d/Conv2d/Linear layers (subclasses included) by name, in registration order, minus `ignore`.

    The ``out_proj`` of an ``nn.MultiheadAttention`` is not one: the attention reads its weight and bias as
    tensors instead of calling it, so a quantized layer there would never run (the attention stays float and
    `quantize` names it in a warning).
    """
    ignore = list(ignore)
    attention = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE)
        and not (attention and name.startswith(attention))
        and not any(matches(name, m, p) for p in ignore)
    }


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The `QuantizedLayer`s of a quantized model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def dynamic_input_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The `QuantizedLayer`s whose inputs are quantized per token at run time (`DynamicActQuantizer`), by name."""
    return {n: m for n, m in quantized_layers(model).items() if isinstance(m.act_quant, DynamicActQuantizer)}


def quantized_embeddings(model: nn.Module) -> dict[str, QuantizedEmbedding]:
    """The `QuantizedEmbedding`s of a quantized model (recipe ``embeddings``), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` (works inside ModuleList/Sequential too)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name `module` is registered under in `model` (more than one when one module is shared)."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Replace the module at dotted `name` by `new` at every place it is registered; return those names.

    One module registered twice (``self.b = self.a``) is one layer: replacing it at one name only would leave
    its other uses running the old module.
    """
    names = module_names(model, model.get_submodule(name)) or [name]
    for where in names:
        set_module(model, where, new)
    return names


def walk_children(module: nn.Module) -> Iterator[tuple[str, nn.Module, list[tuple[str, nn.Module]]]]:
    """Yield (prefix, parent, its direct children) for every module, depth first."""
    for prefix, parent in module.named_modules():
        yield prefix, parent, list(parent.named_children())
