"""Loading checkpoints of the zoo's named models: the float model is built from the name the manifest records."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from postquant.errors import CheckpointError
from postquant.io.checkpoint import load as load_with_model
from postquant.io.checkpoint import saved_model_name
from postquant_lab.zoo import ZooModel, load_model
from postquant_lab.zoo.builtin import BUILTIN_MODELS

__all__ = ["load", "zoo_model_for"]

log = logging.getLogger(__name__)


def zoo_model_for(name: str | None, *, trust_code: bool = False) -> ZooModel:
    """The `ZooModel` a checkpoint names, built only when that runs no code the file names.

    A built-in zoo name is built as usual; any other name (``module:factory``, hub names) imports and runs
    code chosen by whoever wrote the file, so it is built only with ``trust_code=True``.

    Raises:
        CheckpointError: no name, or a name that is not a built-in zoo model without ``trust_code``.
    """
    if not name:
        raise CheckpointError(
            "this checkpoint does not name its model: pass the float model, load(directory, model=...), or save "
            "with save(qmodel, directory, model_name='<zoo name>')"
        )
    if name.strip() not in BUILTIN_MODELS and not trust_code:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise CheckpointError(
            f"the checkpoint names its model {shown!r}, which is not a built-in zoo model: building it would "
            "import and run code named by the file. Pass the float model, load(directory, model=...), or, if "
            "you trust where the checkpoint came from, trust_code=True (command line: --trust-code)"
        )
    log.info("building the float model %s from the zoo", name)
    return load_model(name)


def load(directory: str | Path, model: nn.Module | None = None, *, trust_code: bool = False) -> nn.Module:
    """`postquant.load` for checkpoints of named models: without `model`, the zoo builds the one the
    manifest names (``module:factory`` and hub names only with ``trust_code=True``: that runs their code)."""
    if model is None:
        model = zoo_model_for(saved_model_name(directory), trust_code=trust_code).model
    return load_with_model(directory, model)
