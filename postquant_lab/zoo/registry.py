"""`load_model`: one entry point for zoo names, ``module:factory[@weights]`` specs and hub names."""

from __future__ import annotations

import logging
import time

from postquant.errors import unknown_name
from postquant_lab.zoo.builtin import BUILTIN_MODELS
from postquant_lab.zoo.external import (
    HUB_PREFIXES,
    checkpoint_without_architecture,
    is_checkpoint_path,
    load_factory,
    load_hub_model,
)
from postquant_lab.zoo.zoo_model import ZooModel

__all__ = ["list_models", "load_model"]

log = logging.getLogger(__name__)


def list_models() -> list[str]:
    """Names of the built-in zoo models, sorted."""
    return sorted(BUILTIN_MODELS)


def load_model(name: str) -> ZooModel:
    """Load a float model with its data and preprocessing.

    Args:
        name: one of

            * a zoo name (`list_models`): ``resnet20-cifar10``, ``resnet56-cifar10``, ``efficientnet-lite0``,
              ``minilm-l6``;
            * ``module.path:factory`` or ``module.path:factory@/path/to/weights.pt`` (``.pt/.pth/.th/.safetensors``;
              ``factory()`` returns an ``nn.Module`` or a `ZooModel`);
            * ``timm:<arch>``, ``torchvision:<arch>``, ``hf:<hub id or local folder>``.

    Returns:
        The `ZooModel` (model in eval mode, on the CPU).

    Raises:
        UnknownNameError: an unknown zoo name (the message suggests close names) or a bad ``module:factory``.
        CheckpointError: missing, corrupt or untrusted weights; a bare checkpoint path; hub weights unavailable.
    """
    name = name.strip()
    start = time.perf_counter()
    if name in BUILTIN_MODELS:
        zoo = BUILTIN_MODELS[name]()
    elif name.partition(":")[0] in HUB_PREFIXES:
        zoo = load_hub_model(name)
    elif ":" in name:
        zoo = load_factory(name)
    elif is_checkpoint_path(name):
        raise checkpoint_without_architecture(name)
    else:
        raise unknown_name("model", name, list_models())
    log.info("loaded model %s in %.1f s", zoo.name, time.perf_counter() - start)
    return zoo
