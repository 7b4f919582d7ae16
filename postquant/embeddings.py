"""Embedding tables to codes (recipe ``embeddings``): a uniform grid per row or group, nearest rounding.

Weight-only and data-free whatever the recipe's method: the rounding methods that use data or learn (SQuant,
GPTQ, learned rounding) choose the codes of Conv/Linear layers; a table's rows are rounded to nearest
(docs/algorithms.md 2.1) on the grid `EmbeddingConfig.grid` fits to each row or group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from postquant.errors import NonFiniteWeightError, RecipeError, UnsupportedModelError
from postquant.model import matches, module_names, replace_module
from postquant.nn import QuantizedEmbedding
from postquant.nn.layer import upcast_half
from postquant.recipe import EmbeddingConfig

__all__ = ["check_untied", "embedding_tables", "quantize_embeddings"]

log = logging.getLogger(__name__)


def embedding_tables(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Embedding]:
    """The ``nn.Embedding`` modules (subclasses that keep its forward) by name, minus `ignore` patterns.

    Subclasses with a forward of their own (a scaled lookup...) stay float, with a warning naming them.
    """
    ignore = list(ignore)
    tables, own = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Embedding) or any(matches(name, m, p) for p in ignore):
            continue
        if type(m).forward is not nn.Embedding.forward:
            own.append(f"{name} ({type(m).__name__})")
            continue
        tables[name] = m
    if own:
        log.warning("%d embeddings with a forward of their own stay float: %s", len(own), ", ".join(own))
    return tables


def check_untied(model: nn.Module, tables: dict[str, nn.Embedding]) -> None:
    """Refuse tables whose weight is also another module's parameter (tied weights, e.g. an ``lm_head``).

    Quantizing the table alone would untie them silently: the other module would keep the float weight.

    Raises:
        UnsupportedModelError: naming the table and the parameter that shares its storage.
    """
    params = [
        (f"{mname}.{pname}" if mname else pname, m, p)
        for mname, m in model.named_modules(remove_duplicate=False)
        for pname, p in m._parameters.items()
        if p is not None and p.numel()
    ]
    for name, table in tables.items():
        storage = table.weight.untyped_storage().data_ptr()
        tied = [
            key
            for key, m, p in params
            if m is not table
            and p.untyped_storage().data_ptr() == storage
            and p.device == table.weight.device
        ]
        if tied:
            raise UnsupportedModelError(
                f"embedding {name!r} shares its weight with {', '.join(tied)} (tied weights): quantizing the "
                f"table alone would untie them. Keep it float with ignore=[{name!r}] (the recipe's "
                "embeddings then skip it), or untie the model before quantizing (give "
                f"{tied[0]} its own copy, e.g. nn.Parameter(weight.clone()))"
            )


def quantize_embeddings(
    model: nn.Module, names: Iterable[str], config: EmbeddingConfig
) -> dict[str, QuantizedEmbedding]:
    """Replace the embeddings `names` of `model` (in place) by `QuantizedEmbedding`s with nearest codes.

    Args:
        model: the working model (its tables are read, then replaced at every place they are registered).
        names: the tables to quantize (`embedding_tables`; checked untied by `check_untied`).
        config: bits, per-row or per-group steps, symmetry and range rule (`EmbeddingConfig`).

    Raises:
        RecipeError: `config.group_size` does not divide a table's width (the message names the table).
        NonFiniteWeightError: a table holds NaN or Inf.
    """
    done = {}
    for name in names:
        table = model.get_submodule(name)
        w = upcast_half(table.weight.detach())  # (V, D); grids and codes of half-precision tables in float32
        try:
            grid = config.grid(w)
        except (RecipeError, NonFiniteWeightError) as exc:
            raise type(exc)(f"embedding {name!r} (table {tuple(w.shape)}): {exc}") from exc
        codes = grid.nearest(w)  # (V, D) int32, round half to even
        qtable = QuantizedEmbedding(table, grid, codes)
        where = module_names(model, table)
        replace_module(model, name, qtable)
        done[name] = qtable
        log.debug("embedding %s %s: %d-bit codes (%s)", name, tuple(w.shape), config.bits, ", ".join(where))
    if done:
        log.info(
            "%d embedding tables quantized to %d bits (%s): %s",
            len(done),
            config.bits,
            "per row" if config.group_size is None else f"groups of {config.group_size}",
            ", ".join(done),
        )
    return done
