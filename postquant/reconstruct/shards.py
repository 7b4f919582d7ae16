"""Learned rounding over several ranks: the data side of each step split by rows, the weight side by layers.

A step of learned rounding has two sides. The data side is the unit's forward and backward pass on the step's
batch: data parallel, each rank runs its rows and the loss gradients are summed (`postquant.reconstruct.loop`).
The weight side is everything done per rounding variable: the soft weights ``dequantize(floor + h(V))``, the
regulariser, their backward pass and the optimizer step. It does not depend on the batch, and on a large
unit it costs as much as the data side (a SmolLM2-135M decoder layer: 3.5 M variables, about half of a step
of 4 windows of 128 tokens), so replicating it on every rank caps the speed-up of 2 ranks far below 2x.

`WeightShards` splits it by layers: each layer's rounding variables (and learned weight steps) belong to one
rank (`postquant.distributed.split_work`, balanced by size), which alone computes the layer's soft weight,
regulariser and optimizer step. A step then runs:

1. each rank computes its layers' soft weights and broadcasts them; every rank now holds every soft weight,
   as a leaf tensor that collects the gradient of its rows' loss;
2. each rank backpropagates its share of the loss to those leaves (and to the replicated parameters:
   biases and activation steps);
3. the leaves' gradients are summed onto their owners (one reduce per owner), the replicated parameters'
   gradients and the loss terms over all ranks (one all-reduce);
4. each owner backpropagates the summed gradients through its soft weights to the rounding variables (the
   regulariser's gradient is already there) and steps them; every rank steps the replicated parameters.

This is the step of one process up to the order of float additions: ``dL/dV = (sum over ranks of dL_r/dW) *
dW/dV`` instead of one sum over all rows. The traffic per step is the size of the unit's weights twice
(broadcast and reduce), as much as the all-reduce of every variable's gradient it replaces. After the last
step (`share`) each owner broadcasts its layers' variables, so every rank installs the same codes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from postquant.distributed import Ranks, split_work
from postquant.reconstruct.config import LearnedConfig, Variable
from postquant.reconstruct.params import LayerRounding


class WeightShards:
    """The layers of one unit split over the ranks for the weight side of learned rounding (module docstring).

    Args:
        roundings: every layer's rounding variables, built alike on every rank (same names, same order).
        ranks: the process group.
        act_params: the unit's trainable activation steps (replicated, like the biases).
    """

    def __init__(
        self, roundings: dict[str, LayerRounding], ranks: Ranks, act_params: list[nn.Parameter]
    ) -> None:
        self.roundings = roundings
        self.ranks = ranks
        names = list(roundings)
        owners = split_work([int(roundings[n].floor.numel()) for n in names], ranks.world)
        self.owner = dict(zip(names, owners, strict=True))
        self.mine = [n for n in names if self.owner[n] == ranks.rank]
        # trained on every rank from gradients summed over the ranks: the biases and the activation steps
        self.replicated = [r.bias for r in roundings.values() if r.bias is not None] + list(act_params)
        with torch.no_grad():  # shapes and dtypes of the soft weights, the same on every rank
            self._like = {n: r.weight() for n, r in roundings.items()}
        self._own: dict[str, torch.Tensor] = {}
        self._leaves: dict[str, torch.Tensor] = {}

    def groups(self, cfg: LearnedConfig) -> list[dict[str, Any]]:
        """Optimizer groups of this rank: its layers' variables and steps, and every layer's bias (replicated,
        stepped alike on every rank from the summed gradients)."""
        out: list[dict[str, Any]] = []
        for name, r in self.roundings.items():
            if name in self.mine:
                out.extend(r.groups(cfg))
            elif r.bias is not None:
                out.append({"params": [r.bias], "lr": cfg.scale_lr})
        return out

    def overrides(self) -> dict[str, torch.Tensor]:
        """Every layer's soft weight for this step (``{name}.weight``, a leaf; its bias ``{name}.inner.bias``):
        this rank's layers computed here, the others received from their owners. Every rank calls it once per
        step, before its loss (it is a collective)."""
        self._own = {n: self.roundings[n].weight() for n in self.mine}
        self._leaves = {}
        for owner in range(self.ranks.world):
            names = [n for n in self.roundings if self.owner[n] == owner]
            if not names:
                continue
            if owner == self.ranks.rank:
                flat = torch.cat([self._own[n].detach().reshape(-1) for n in names])
            else:
                flat = torch.empty(
                    sum(self._like[n].numel() for n in names),
                    dtype=self._like[names[0]].dtype,
                    device=self._like[names[0]].device,
                )
            self.ranks.broadcast_(flat, owner, "sending the soft weights of learned rounding")
            for n, part in zip(names, flat.split([self._like[n].numel() for n in names]), strict=True):
                self._leaves[n] = part.view_as(self._like[n]).requires_grad_()
        ov: dict[str, torch.Tensor] = {}
        for name, r in self.roundings.items():
            ov[f"{name}.weight"] = self._leaves[name]
            if r.bias is not None:
                ov[f"{name}.inner.bias"] = r.bias
        return ov

    def regulariser(self, beta: float) -> torch.Tensor:
        """The rounding regulariser of this rank's layers (the ranks' terms add up to the unit's)."""
        zero = next(iter(self._like.values())).new_zeros(())
        return sum((self.roundings[n].regulariser(beta) for n in self.mine), zero)

    def reduce(self, rec: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        """Backward this rank's ``rec + reg``, sum the gradients over the ranks onto their owners and the loss
        terms everywhere, backpropagate the summed weight gradients into this rank's variables; returns the
        step's total loss, the same on every rank."""
        total = rec + reg
        if total.requires_grad:
            total.backward()
        for p in self.replicated:
            if p.grad is None:  # a parameter this rank's rows do not reach
                p.grad = torch.zeros_like(p)
        losses = torch.stack([rec.detach().float(), reg.detach().float()]).to(self.ranks.device)
        self.ranks.all_reduce_sum_([*(p.grad for p in self.replicated), losses], "summing the step's loss")
        summed: dict[str, torch.Tensor] = {}
        for owner in range(self.ranks.world):
            names = [n for n in self.roundings if self.owner[n] == owner]
            if not names:
                continue
            flat = torch.cat([_grad(self._leaves[n]).reshape(-1) for n in names])
            self.ranks.reduce_sum_(flat, owner, "summing the soft weights' gradients of learned rounding")
            if owner == self.ranks.rank:
                parts = flat.split([self._like[n].numel() for n in names])
                summed = {n: g.view_as(self._like[n]) for n, g in zip(names, parts, strict=True)}
        if self.mine:
            torch.autograd.backward([self._own[n] for n in self.mine], [summed[n] for n in self.mine])
        self._own, self._leaves = {}, {}
        return losses.sum()

    @torch.no_grad()
    def share(self) -> None:
        """Every layer's trained variables (and learned weight steps) from its owner, on every rank."""
        for name, r in self.roundings.items():
            for p in _variables(r):
                self.ranks.broadcast_(p.data, self.owner[name], "sending the learned rounding variables")


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _variables(r: LayerRounding) -> list[torch.Tensor]:
    """The tensors of a layer that only its owner trains."""
    main = r.offset if r.variable is Variable.STE else r.v
    return [main] + ([r.log_scale] if r.log_scale is not None else [])
