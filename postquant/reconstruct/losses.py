"""The losses of learned rounding: the unit reconstruction error, its Fisher weights, the final-output distance.

* ``mse``: BRECQ's ``lp_loss`` with p=2 between the unit's output and the float unit's (`unit_distance`);
* ``fisher``: the same, weighted per element by ``(|dL/dz| + 1)^2`` (`fisher_weights`);
* ``output``: KL or MSE between the quantized and float models' final outputs (`final_distance`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from postquant.calib.data import Batch
from postquant.eval.run import main_output, replace_main_output, run_model
from postquant.model.blocks import Unit
from postquant.reconstruct.config import OutputMetric

__all__ = ["final_distance", "fisher_weights", "unit_distance"]


def unit_distance(
    out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BRECQ's ``lp_loss`` (p=2): squared error summed over features (channels), mean over the rest."""
    err = (out - target).pow(2)
    if weight is not None:
        err = err * weight
    dim = 1 if err.dim() == 4 else -1
    return err.sum(dim=dim).mean()


def final_distance(
    out: torch.Tensor,
    target: torch.Tensor,
    metric: OutputMetric,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """KL(target || out) on logits, or MSE, between final outputs (per-sample sum, then batch mean/sum).

    Args:
        out: the quantized model's final output, (N, ...).
        target: the float model's, same shape.
        metric: `OutputMetric.AUTO` is KL for (N, C) outputs (class logits), MSE otherwise.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
    """
    metric = OutputMetric(metric)
    if metric is OutputMetric.AUTO:
        metric = OutputMetric.KL if out.dim() == 2 else OutputMetric.MSE
    if metric is OutputMetric.KL:
        per = F.kl_div(
            F.log_softmax(out, dim=-1), F.log_softmax(target, dim=-1), log_target=True, reduction="none"
        )
    else:
        per = (out - target).pow(2)
    per = per.reshape(per.shape[0], -1).sum(dim=1)  # (N,)
    return per.sum() if reduction == "sum" else per.mean()


def fisher_weights(
    qmodel: nn.Module, unit: Unit, batch: Batch, final_target: torch.Tensor, metric: OutputMetric
) -> torch.Tensor:
    """BRECQ's Fisher diagonal at the unit output: ``(|dL/dz| + 1)^2`` per element.

    ``L`` is the distance between the quantized model's final output and the float model's (KL for class
    logits: the model's own prediction stands in for labels), summed over the batch so that the gradient of
    each sample does not shrink with the batch size (Li et al., BRECQ, ICLR 2021, Sec. 3.2 and its code).
    """
    last = qmodel.get_submodule(unit.modules[-1])
    holder: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        z = main_output(output).detach().requires_grad_(True)
        holder["z"] = z
        return replace_main_output(output, z)

    handle = last.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = run_model(qmodel, batch)
            loss = final_distance(out, final_target, metric, reduction="sum")
            # A unit the final output ignores (e.g. a Hugging Face pooler beside last_hidden_state) gets no
            # gradient: its weights are all 1, i.e. the plain MSE of its own output.
            (grad,) = torch.autograd.grad(loss, holder["z"], allow_unused=True)
    finally:
        handle.remove()
    if grad is None:
        return torch.ones_like(holder["z"]).detach()
    return (grad.abs() + 1.0).pow(2).detach()
