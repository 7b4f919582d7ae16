"""The one public verb: ``quantize(model, recipe, calib=None, example_inputs=None)``.

The work is a pipeline of stages over one plan (`postquant.pipeline`); `result(qmodel)` returns what it
decided and measured.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from postquant.errors import UnsupportedModelError
from postquant.model import quantized_layers
from postquant.pipeline import result, run_pipeline
from postquant.recipe import Recipe

__all__ = ["quantize"]

log = logging.getLogger(__name__)


def quantize(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    calib: Any = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Quantize a trained float model after training; the original is not modified.

    Args:
        model: any ``nn.Module`` built from Conv1d/Conv2d/Linear layers (subclasses count). Hugging Face's
            ``Conv1D`` (GPT-2) and ``nn.MultiheadAttention`` are first rebuilt from equivalent Linears
            (`postquant.model.convert`). Modules with weights of other types stay float, with a warning that
            names them.
        recipe: a `Recipe`, a dict of its fields, or the path of a YAML recipe.
        calib: calibration data (a DataLoader, an iterable of batches, a tensor, or a callable
            ``forward_loop(model)``); needed for activation ranges unless a data-free rule is chosen.
        example_inputs: one batch the model accepts; data-free methods use it for input shapes and
            BatchNorm folding uses it to verify the fold.

    Returns:
        An ordinary ``nn.Module`` (a copy of `model`) whose layers are `QuantizedLayer`s, in eval mode;
        ``postquant.result(qmodel)`` holds the effective recipe, the plan, stage timings, the mixed
        allocation and learned-rounding statistics.

    Quantization always runs the model in eval mode (BatchNorm uses its running statistics, dropout is off):
    a model passed in train mode is switched to eval mode for the call and its modes are restored after it,
    so its parameters, buffers and ``training`` flags are the same afterwards.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"quantize takes the float model as a torch.nn.Module, not a {type(model).__name__}; to quantize a "
            "named model, build it first (postquant_lab.zoo.load_model(name).model)"
        )
    if quantized_layers(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is already quantized ({len(quantized_layers(model))} QuantizedLayers): "
            "quantize the float model it came from instead"
        )
    recipe = Recipe.coerce(recipe)
    with _eval_mode(model):
        qmodel = run_pipeline(model, recipe, calib, example_inputs)
    done = result(qmodel).recipe
    log.info(
        "quantized %d layers (%s, W%s A%s) in %.3f s",
        len(quantized_layers(qmodel)),
        done.method.value,
        done.w_bits,
        done.a_bits,
        time.perf_counter() - start,
    )
    return qmodel


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode inside the block, then give every module back its own ``training`` flag."""
    modes = [(m, m.training) for m in model.modules()]
    if any(training for _, training in modes):
        log.info(
            "%s is in train mode: quantizing it in eval mode (BatchNorm running statistics are used, not "
            "updated); its modes are restored afterwards and the quantized model is in eval mode",
            type(model).__name__,
        )
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
