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

1. each rank computes its layers' soft weights and sends them to every other rank (point to point, all
   directions at once); every rank now holds every soft weight, as a leaf tensor that collects the gradient
   of its rows' loss;
2. each rank backpropagates its share of the loss to those leaves (and to the replicated parameters:
   biases and activation steps);
3. each rank sends every owner its leaves' gradients (point to point, all directions at once) and each owner
   sums them; the replicated parameters' gradients and the loss terms are summed over all ranks (one
   all-reduce);
4. each owner backpropagates the summed gradients through its soft weights to the rounding variables (the
   regulariser's gradient is already there) and steps them; every rank steps the replicated parameters.

On the block path each rank holds only its shard of the cached rows, and every rank draws the batch one
process draws from all of them (`postquant.reconstruct.cache.Shard.sample`); how many of the drawn rows a
rank holds varies from step to step (4 windows drawn from 2 equal shards: 3 or more on one rank in 62 % of
the steps), and the step waits for the busiest rank. `balanced_rows` moves the surplus rows (their cached
inputs and targets, a small fraction of the soft weights' traffic) from ranks holding more than their share
to ranks holding fewer, so that every rank computes ``total / world`` rows, at their positions in the batch
(QDrop's draws for the whole batch, sliced by position, stay one process's).

This is the step of one process up to the order of float additions: ``dL/dV = (sum over ranks of dL_r/dW) *
dW/dV`` instead of one sum over all rows. The traffic per step is the size of the unit's weights twice
(sent and received), as much as the all-reduce of every variable's gradient it replaces. After the last
step (`share`) each owner broadcasts its layers' variables, so every rank installs the same codes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from postquant.distributed import Ranks, shard_bounds, split_work
from postquant.reconstruct.cache import Record, ShardDraw, concat_rows, rows
from postquant.reconstruct.config import LearnedConfig, Variable
from postquant.reconstruct.params import LayerRounding


def layer_owners(shapes: dict[str, tuple[int, ...]], ranks: Ranks) -> dict[str, int]:
    """The rank that owns each layer's rounding variables, balanced by weight size (`split_work`): it computes
    the layer's SQuant starting codes, soft weights, regulariser and optimizer steps."""
    names = list(shapes)
    owners = split_work([math.prod(shapes[n]) for n in names], ranks.world)
    return dict(zip(names, owners, strict=True))


class WeightShards:
    """The layers of one unit split over the ranks for the weight side of learned rounding (module docstring).

    Args:
        roundings: every layer's rounding variables, built alike on every rank (same names, same order).
        ranks: the process group.
        owners: the rank that owns each layer (`layer_owners`).
        act_params: the unit's trainable activation steps (replicated, like the biases).
    """

    def __init__(
        self,
        roundings: dict[str, LayerRounding],
        ranks: Ranks,
        owners: dict[str, int],
        act_params: list[nn.Parameter],
    ) -> None:
        self.roundings = roundings
        self.ranks = ranks
        self.owner = owners
        self.mine = [n for n in roundings if self.owner[n] == ranks.rank]
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
        flats = {owner: self._flat(owner) for owner in self._owners() if owner != self.ranks.rank}
        if self.mine:
            flats[self.ranks.rank] = torch.cat([self._own[n].detach().reshape(-1) for n in self.mine])
        others = {r: f for r, f in flats.items() if r != self.ranks.rank}
        sends = {
            r: flats[self.ranks.rank] for r in range(self.ranks.world) if r != self.ranks.rank and self.mine
        }
        self.ranks.exchange(sends, others, "exchanging the soft weights of learned rounding")
        self._leaves = {}
        for owner, flat in flats.items():
            names = self._names(owner)
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
        rank = self.ranks.rank
        sends = {
            owner: torch.cat([_grad(self._leaves[n]).reshape(-1) for n in self._names(owner)])
            for owner in self._owners()
            if owner != rank
        }
        recvs = {r: self._flat(rank) for r in range(self.ranks.world) if r != rank and self.mine}
        self.ranks.exchange(sends, recvs, "exchanging the soft weights' gradients of learned rounding")
        if self.mine:  # this rank's gradients plus the others', in rank order
            total_grad = torch.cat([_grad(self._leaves[n]).reshape(-1) for n in self.mine])
            for r in sorted(recvs):
                total_grad += recvs[r]
            parts = total_grad.split([self._like[n].numel() for n in self.mine])
            torch.autograd.backward(
                [self._own[n] for n in self.mine],
                [g.view_as(self._like[n]) for n, g in zip(self.mine, parts, strict=True)],
            )
        self._own, self._leaves = {}, {}
        return losses.sum()

    def _names(self, owner: int) -> list[str]:
        return [n for n in self.roundings if self.owner[n] == owner]

    def _owners(self) -> list[int]:
        """The ranks that own at least one layer."""
        return sorted(set(self.owner.values()))

    def _flat(self, owner: int) -> torch.Tensor:
        """An empty buffer for the flattened soft weights (or gradients) of `owner`'s layers."""
        names = self._names(owner)
        like = self._like[names[0]]
        return torch.empty(sum(self._like[n].numel() for n in names), dtype=like.dtype, device=like.device)

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
    return [main] + ([r.log_scale] if r.log_scale is not None else []) + r.range_params()


# ----------------------------------------------------------------------------- balancing a batch's rows


def balance(owners: list[int], world: int) -> list[int]:
    """The rank that computes each position of a batch whose rows ranks `owners` hold: every rank computes its
    share of the batch (`shard_bounds` sizes: ``total // world``, one more for the first ``total % world``
    ranks), as many of them as possible rows it holds (its first ones); the surplus rows of the others go, in
    position order, to the ranks below their share, in rank order."""
    quota = [stop - start for start, stop in shard_bounds(len(owners), world)]
    compute = list(owners)
    surplus: list[int] = []
    for r in range(world):
        held = [p for p, owner in enumerate(owners) if owner == r]
        surplus.extend(held[quota[r] :])
    surplus.sort()
    moved = iter(surplus)
    for r in range(world):
        kept = min(quota[r], sum(1 for owner in owners if owner == r))
        for _ in range(quota[r] - kept):
            compute[next(moved)] = r
    return compute


_SENT = ("q_input", "f_input", "target", "weight")  # what `_loss` reads of a record on the block path


def balanced_rows(draw: ShardDraw, ranks: Ranks) -> tuple[Record | None, torch.Tensor, torch.Tensor]:
    """This rank's rows of a drawn batch after `balance`: a record holding them, the rows of it to compute
    and their positions in the batch (an empty record (None) when it computes none).

    The ranks send each other the rows that move (their cached inputs, targets and weights), pair by pair in
    one order every rank follows; a step where no row moves costs no message. Every rank calls it with its
    own draw of the same batch.
    """
    owners = draw.owners.tolist()
    compute = balance(owners, ranks.world)
    rank = ranks.rank
    local = dict(zip(draw.positions.tolist(), draw.idx.tolist(), strict=True))  # position -> row held here
    received: list[tuple[list[int], Record]] = []
    for src in range(ranks.world):
        for dst in range(ranks.world):
            moving = [p for p in range(len(owners)) if owners[p] == src and compute[p] == dst != src]
            if not moving or rank not in (src, dst):
                continue
            if rank == src:
                assert draw.record is not None  # a rank sends only rows it holds
                picked = _taken(draw.record, [local[p] for p in moving])
                ranks.send_object(
                    {n: tree_map(_compact, v) for n, v in picked.items()},
                    dst,
                    "sending rows of a learned-rounding batch",
                )
            else:
                part = ranks.recv_object(src, "receiving rows of a learned-rounding batch")
                received.append((moving, Record(len(moving), **part)))
    kept = [p for p in draw.positions.tolist() if compute[p] == rank]
    if not received:
        idx = torch.tensor([local[p] for p in kept], dtype=torch.int64)
        return (draw.record if kept else None), idx, torch.tensor(kept, dtype=torch.int64)
    pieces: list[Record] = []
    positions: list[int] = []
    if kept:
        assert draw.record is not None
        pieces.append(Record(len(kept), **_taken(draw.record, [local[p] for p in kept])))
        positions.extend(kept)
    for moving, record in received:
        pieces.append(record)
        positions.extend(moving)
    merged = Record(
        len(positions),
        **{
            n: concat_rows([getattr(r, n) for r in pieces], [r.n for r in pieces])
            for n in _SENT
            if getattr(pieces[0], n) is not None
        },
    )
    return merged, torch.arange(len(positions)), torch.tensor(positions, dtype=torch.int64)


def _taken(record: Record, idx: list[int]) -> dict[str, Any]:
    """Rows `idx` of the cached values `_loss` reads of `record` (those it holds)."""
    picked = torch.tensor(idx, dtype=torch.int64)
    return {n: rows(getattr(record, n), picked, record.n) for n in _SENT if getattr(record, n) is not None}


def _compact(t: Any) -> Any:
    """A tensor with storage of its own (a view would pickle the whole storage it looks into)."""
    return t.clone() if isinstance(t, torch.Tensor) else t
