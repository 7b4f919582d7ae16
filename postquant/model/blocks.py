"""Reconstruction units: single layers, blocks and runs of consecutive blocks, found without tracing.

A *block* is an item of a ``nn.Sequential`` / ``nn.ModuleList`` whose items are themselves composite modules
holding quantized layers: the BasicBlocks of a CIFAR ResNet stage (``layer1.0``), EfficientNet's
``_blocks.N``, a Hugging Face encoder's ``encoder.layer.N``. Layers outside every block (stem, head, pooler)
are units of their own. Users can name blocks instead with globs on module names (``"layer*.*"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from postquant.choices import UnitKind
from postquant.errors import RecipeError
from postquant.nn import QUANTIZABLE, QuantizedLayer

__all__ = ["Unit", "find_blocks", "make_units"]

IsLayer = Callable[[nn.Module], bool]


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLayer)


def _is_leaf_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedLayer, *QUANTIZABLE))


@dataclass(frozen=True)
class Unit:
    """What one reconstruction step optimises.

    Attributes:
        name: a readable name (``"conv1"``, ``"layer1.0"``, ``"layer1.0+layer1.1"``).
        modules: names of the consecutive modules run in order (output of one = first input of the next).
        layers: names of the quantized layers inside, in registration order.
    """

    name: str
    modules: tuple[str, ...]
    layers: tuple[str, ...]


def _layers_under(model: nn.Module, prefix: str, is_layer: IsLayer) -> list[str]:
    root = model.get_submodule(prefix) if prefix else model
    pre = f"{prefix}." if prefix else ""
    return [pre + n if n else prefix for n, m in root.named_modules() if is_layer(m)]


def _auto_blocks(model: nn.Module, is_layer: IsLayer) -> list[str]:
    """Items of Sequential/ModuleList containers whose items are composite modules with quantized layers."""
    blocks: list[str] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if not isinstance(module, nn.Sequential | nn.ModuleList):
            continue
        items = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module.named_children()
            if any(is_layer(m) for m in child.modules())
        ]
        composite = [
            (n, c)
            for n, c in items
            if not _is_leaf_layer(c) and not isinstance(c, nn.Sequential | nn.ModuleList)
        ]
        if len(composite) >= 2 and len(composite) == len(items):
            blocks.extend(n for n, _ in composite)
            taken.append(name)
    return blocks


def find_blocks(
    model: nn.Module, patterns: list[str] | tuple[str, ...] = (), is_layer: IsLayer = _is_quantized
) -> list[str]:
    """Names of the blocks of `model`, in registration order.

    Args:
        model: the (quantized) model.
        patterns: globs on module names (``"layer*.*"``, ``"encoder.layer.*"``); the outermost matching modules
            that hold a quantized layer are the blocks. Empty: found automatically (module docstring).
        is_layer: what counts as a quantized layer (default: `QuantizedLayer`).

    Raises:
        RecipeError: a pattern matches no module that holds a quantized layer.
    """
    if not patterns:
        return _auto_blocks(model, is_layer)
    blocks: list[str] = []
    for pattern in patterns:
        hits = [
            name
            for name, m in model.named_modules()
            if name and fnmatch.fnmatchcase(name, pattern) and any(is_layer(x) for x in m.modules())
        ]
        if not hits:
            examples = ", ".join(_auto_blocks(model, is_layer)[:4]) or ", ".join(
                _layers_under(model, "", is_layer)[:4]
            )
            raise RecipeError(
                f"learned.block_patterns: pattern {pattern!r} matches no module that holds a quantized layer "
                f"(module names look like: {examples})"
            )
        blocks.extend(hits)
    ordered = [name for name, _ in model.named_modules() if name in set(blocks)]
    # keep the outermost matches only
    return [b for b in ordered if not any(b.startswith(o + ".") for o in ordered if o != b)]


def make_units(
    model: nn.Module,
    kind: UnitKind | str = UnitKind.BLOCK,
    patterns: list[str] | tuple[str, ...] = (),
    blocks_per_unit: int = 1,
    is_layer: IsLayer = _is_quantized,
) -> list[Unit]:
    """The reconstruction units of `model`, in execution (registration) order.

    Args:
        kind: `UnitKind` (or its value): ``layer`` (every quantized layer alone), ``block`` or ``blocks``
            (`blocks_per_unit` consecutive blocks of the same parent container per unit).
        patterns: block globs, see `find_blocks`.
        blocks_per_unit: for ``kind="blocks"``.
    """
    kind = UnitKind(kind)
    layers = _layers_under(model, "", is_layer)
    if kind is UnitKind.LAYER:
        return [Unit(n, (n,), (n,)) for n in layers]
    blocks = find_blocks(model, patterns, is_layer)
    group = blocks_per_unit if kind is UnitKind.BLOCKS else 1
    runs: list[list[str]] = []
    for b in blocks:
        parent = b.rpartition(".")[0]
        if runs and len(runs[-1]) < group and runs[-1][-1].rpartition(".")[0] == parent:
            runs[-1].append(b)
        else:
            runs.append([b])
    owner = {}
    for run in runs:
        for b in run:
            for layer in _layers_under(model, b, is_layer):
                owner[layer] = run
    units: list[Unit] = []
    seen: set[int] = set()
    for layer in layers:
        run = owner.get(layer)
        if run is None:
            units.append(Unit(layer, (layer,), (layer,)))
        elif id(run) not in seen:
            seen.add(id(run))
            inside = tuple(x for b in run for x in _layers_under(model, b, is_layer))
            units.append(Unit("+".join(run), tuple(run), inside))
    return units
