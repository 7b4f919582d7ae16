"""Hugging Face models: calibration passes run without the key/value cache.

A causal LM (GPT-2, Llama, ...) called with ``use_cache`` on builds a cache object and hands it to every
decoder layer, which appends to it on each call. Learned rounding captures a layer's keyword arguments once
and calls the layer hundreds of times with them: the cache would grow, attention would see stale keys, and
backward would reach into earlier steps' graphs. So every calibration pass runs with ``config.use_cache``
off, and the quantized model gets the user's setting back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["no_kv_cache"]


@contextmanager
def no_kv_cache(*models: nn.Module) -> Iterator[None]:
    """Switch ``config.use_cache`` off on each model that has it (and on its sub-models' configs), then back."""
    saved = []
    for model in models:
        for module in model.modules():
            config = getattr(module, "config", None)
            if getattr(config, "use_cache", None) and all(config is not c for c, _ in saved):
                saved.append((config, config.use_cache))
                config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value
