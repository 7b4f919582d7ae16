"""BatchNorm folding into the preceding convolution or linear layer."""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

import torch
from torch import nn

from postquant.errors import DataError
from postquant.eval.run import run_model
from postquant.model.walk import set_module, walk_children
from postquant.nn.layer import upcast_half

log = logging.getLogger(__name__)


def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold an eval-mode BatchNorm that follows `layer` into its weight and bias, in place.

    ``y = gamma * (W x + b - mu) / sqrt(var + eps) + beta`` becomes ``W' x + b'`` with
    ``W' = W * gamma / sigma`` per output channel and ``b' = (b - mu) * gamma / sigma + beta``.
    """
    with torch.no_grad():  # half precision computed in float32, stored in the layer's dtype
        sigma = torch.sqrt(upcast_half(bn.running_var) + bn.eps)
        gamma = upcast_half(bn.weight) if bn.affine else torch.ones_like(sigma)
        beta = upcast_half(bn.bias) if bn.affine else torch.zeros_like(sigma)
        factor = gamma / sigma  # (OC,)
        w = layer.weight
        w.copy_(upcast_half(w) * factor.reshape(-1, *([1] * (w.dim() - 1))))
        bias = upcast_half(layer.bias) if layer.bias is not None else torch.zeros_like(sigma)
        new_bias = (bias - upcast_half(bn.running_mean)) * factor + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(w.dtype))
        else:
            layer.bias.copy_(new_bias)


def _candidate_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names where a BN directly follows a conv/linear among the same parent's children."""
    pairs = []
    for prefix, _, children in walk_children(model):
        for (name_a, a), (name_b, b) in itertools.pairwise(children):
            if (
                isinstance(a, nn.Conv1d | nn.Conv2d | nn.Linear)
                and isinstance(b, nn.BatchNorm1d | nn.BatchNorm2d)
                and b.track_running_stats
                and b.num_features
                == (a.out_channels if isinstance(a, nn.Conv1d | nn.Conv2d) else a.out_features)
            ):
                pre = f"{prefix}." if prefix else ""
                pairs.append((pre + name_a, pre + name_b))
    return pairs


def fold_batchnorm(
    model: nn.Module, example_inputs: Any = None, rtol: float = 1e-3
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every BatchNorm that directly follows a conv/linear layer.

    Pairs are found by registration order (no graph tracing). The folding happens on a copy; when
    `example_inputs` is given, the copy's output is compared with the original's, and if they differ (a BN
    was not really applied to that layer's output) the original is returned unfolded with a warning.

    Raises:
        DataError: the float model's output on `example_inputs` is not finite (NaN inputs, say).

    Returns:
        (model, pairs): the folded copy (or `model` itself) and the folded (layer, bn) names.
    """
    pairs = _candidate_pairs(model)
    if not pairs:
        return model, []
    folded = copy.deepcopy(model)
    for layer_name, bn_name in pairs:
        fold_bn_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        set_module(folded, bn_name, nn.Identity())
    if example_inputs is not None:
        with torch.inference_mode():
            ref, out = run_model(model, example_inputs), run_model(folded, example_inputs)
        if not bool(torch.isfinite(ref).all()):
            raise DataError(
                "the float model's output on the example inputs holds NaN or Inf, so BatchNorm folding cannot "
                "be verified; check the example inputs (or the first calibration batch) for NaN/Inf values"
            )
        err = ((ref - out).double().norm() / ref.double().norm().clamp(min=1e-12)).item()
        rtol = max(rtol, 4 * torch.finfo(ref.dtype).eps)  # a half-precision model rounds to ~0.4 % (bfloat16)
        if not err <= rtol:
            log.warning(
                "BatchNorm folding changed the output (relative error %.3g); model left unfolded", err
            )
            return model, []
    log.info("folded %d BatchNorm layers", len(pairs))
    return folded, pairs
