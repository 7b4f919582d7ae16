"""The calibration cache of learned rounding: what each unit sees, held on the model's device or spilled.

What a record holds comes from `postquant.reconstruct.capture` (the unit's inputs in the quantized model, its
inputs and output in the float model) and what the loss needs (`postquant.reconstruct.losses`).

Where the cache lives: on the model's device (that of its parameters) while it fits ``max_bytes``
(``learned.max_cache_mb``); on an accelerator, the batches beyond that bound spill to CPU memory (pinned when
CUDA is available, so copies back overlap), up to ``max_bytes`` more, and are moved back to the device one
sampled batch at a time (`rows`, `to_device`). The bound applies per device: at most ``max_bytes`` on the
accelerator and ``max_bytes`` on the CPU. For a model on the CPU both are the same memory, so the cache holds
at most ``max_bytes``. When the calibration set does not fit, the first batches that fit are used and the
rest is skipped (logged).

Cached unit inputs are nested structures (`Captured` arguments), walked with `torch.utils._pytree`: the
containers it knows (tuples, lists, dicts, named tuples, `Captured`, Hugging Face outputs) are walked, any
other object (a key/value cache object, a flag) is one value. Tensors with the batch as first dimension are
split and sampled; anything else, such as a shared mask or a flag, is passed as it was. BRECQ and QDrop reconstruct from the
quantized model's inputs; QDrop mixes them element-wise with the float model's inputs (Wei et al., ICLR
2022, Sec. 4).

Chaining: when unit k+1 is fed by unit k's output (a chain of blocks), its inputs are unit k's outputs on the
cached data (`carry_outputs`), so caching costs one unit, not a model prefix, per batch: O(units), not
O(units^2), forward work. Whether the chain holds is checked on the first batch against a real capture (inputs
of both models and the float unit's output); where it does not (an op between units, such as a functional
ReLU or a pooling), the unit is cached from model prefixes as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from postquant.calib.data import Batch, batch_size_of, model_placement, run_model
from postquant.model.blocks import Unit
from postquant.nn import QuantizedLayer
from postquant.reconstruct.capture import Captured, run_captured, unit_forward
from postquant.reconstruct.config import Loss, OutputMetric
from postquant.reconstruct.losses import fisher_weights
from postquant.reconstruct.params import ste_act_quantizers

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ walking cached structures


def to_device(obj: Any, device: torch.device, pin: bool = False) -> Any:
    """Every tensor of `obj` (nested tuples, lists, dicts, `Captured`) on `device`; tensors already there are
    kept (no copy). `pin`: tensors copied to the CPU go to pinned memory (fast copies back to CUDA)."""

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        t = t.to(device, non_blocking=t.is_pinned())
        return t.pin_memory() if pin and device.type == "cpu" else t

    return tree_map(move, obj)


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors in a nested structure."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def rows(obj: Any, idx: torch.Tensor | slice, n: int) -> Any:
    """Select rows `idx` of every tensor whose first dimension is the batch size `n`; keep the rest."""

    def select(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not (t.dim() and t.shape[0] == n):
            return t
        return t[idx.to(t.device) if isinstance(idx, torch.Tensor) else idx]

    return tree_map(select, obj)


def _per_sample(items: list[Any], sizes: list[int]) -> bool:
    """Whether the same leaf of every batch is concatenated (per-sample tensors: True) or kept (one shared
    value: False); a ValueError when it is neither. Only shapes and dtypes are read for per-sample tensors."""
    head = items[0]
    if isinstance(head, torch.Tensor):
        if all(
            isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == s
            for t, s in zip(items, sizes, strict=True)
        ):
            if any(t.shape[1:] != head.shape[1:] or t.dtype != head.dtype for t in items):
                raise ValueError("shapes differ")
            return True
        if all(isinstance(t, torch.Tensor) and t.shape == head.shape and torch.equal(t, head) for t in items):
            return False
        raise ValueError("a tensor is neither per-sample nor shared")
    if any(isinstance(i, torch.Tensor) or i != head for i in items):
        raise ValueError("non-tensor values differ")
    return False


def _cat_leaves(items: list[Any], sizes: list[int]) -> Any:
    """One leaf from the same leaf of every batch: per-sample tensors concatenated, shared values kept."""
    return torch.cat(items) if _per_sample(items, sizes) else items[0]


def _flat_specs(items: list[Any]) -> list[list[Any]]:
    """The leaves of structurally equal items (a ValueError if their structures differ)."""
    flat = [tree_flatten(i) for i in items]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise ValueError("structure differs")
    return [[f[0][k] for f in flat] for k in range(spec.num_leaves)]


def concat_rows(items: list[Any], sizes: list[int]) -> Any:
    """Rows of one value from several sources (structurally equal items of `sizes` rows) as one value of
    ``sum(sizes)`` rows: per-sample tensors concatenated along dim 0, shared values kept.

    Raises:
        ValueError: the items differ in structure, or a leaf is neither per-sample nor shared.
    """
    spec = tree_flatten(items[0])[1]
    return tree_unflatten([_cat_leaves(leaf, sizes) for leaf in _flat_specs(items)], spec)


def mergeable(items: list[Any], sizes: list[int]) -> bool:
    """Whether `UnitData.merge` would concatenate values like `items` (one per batch of `sizes` samples),
    decided without concatenating: per-sample tensors are compared by shape and dtype only, so a value
    whose per-sample tensors are placeholders (e.g. ``torch.zeros(()).expand(n, ...)``) decides alike."""
    try:
        for leaf in _flat_specs(items):
            _per_sample(leaf, sizes)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Shard:
    """Where this rank's cached rows sit in the records one process holds (data-parallel block path,
    `postquant.blockwise`): one process's record i has ``sizes[i]`` rows, of which rows [start, stop) are
    this rank's record ``held[i] = (local, start, stop)`` (None: none here); ``trailing[i]`` is the shape of
    one row of the record's first input (for QDrop's draws on a rank that holds none of a batch);
    ``spans[i][r]`` are the rows [start, stop) of record i that rank r holds (to balance a batch's rows)."""

    sizes: tuple[int, ...]
    held: tuple[tuple[int, int, int] | None, ...]
    trailing: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[tuple[int, int], ...], ...]

    def sample(self, records: list[Record], batch_size: int, generator: torch.Generator) -> ShardDraw:
        """One process's `UnitData.sample` draw (the same generator calls), restricted to this rank."""
        if len(self.sizes) == 1:
            g = 0
        else:
            weights = torch.tensor(self.sizes, dtype=torch.float)
            g = int(torch.multinomial(weights, 1, generator=generator))
        idx = torch.randperm(self.sizes[g], generator=generator)[: min(batch_size, self.sizes[g])]
        owners = torch.zeros(len(idx), dtype=torch.int64)
        for r, (start, stop) in enumerate(self.spans[g]):
            owners[(idx >= start) & (idx < stop)] = r
        held = self.held[g]
        if held is None:
            return ShardDraw(None, idx[:0], idx[:0], len(idx), self.trailing[g], owners)
        local, start, stop = held
        mine = (idx >= start) & (idx < stop)
        return ShardDraw(
            records[local], idx[mine] - start, mine.nonzero().squeeze(1), len(idx), self.trailing[g], owners
        )


class ShardDraw(NamedTuple):
    """This rank's part of a batch drawn from a sharded cache (`Shard.sample`): its record (None when it
    holds none of the drawn one), the rows of it drawn, their positions in the batch, the batch's size, the
    shape of one row of the record's first input, and the rank holding each position of the batch."""

    record: Record | None
    idx: torch.Tensor
    positions: torch.Tensor
    total: int
    trailing: tuple[int, ...]
    owners: torch.Tensor


# ------------------------------------------------------------------------------------- the records


@dataclass
class Record:
    """Cached samples of one unit: inputs (quantized model; float model for QDrop), targets, extras."""

    n: int
    q_input: Captured | None = None  # unit input in the quantized model
    f_input: Captured | None = None  # unit input in the float model (QDrop)
    target: torch.Tensor | None = None  # unit output in the float model
    weight: torch.Tensor | None = None  # per-element loss weights (Fisher)
    model_input: Batch | None = None  # the model's input (loss='output')
    final: torch.Tensor | None = None  # the float model's final output (loss='output')

    _CACHED = ("q_input", "f_input", "target", "weight", "final")  # held on the cache's device

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tensors (the model input of loss='output' is the caller's batch, not counted)."""
        return sum(nbytes(getattr(self, name)) for name in self._CACHED)

    def to(self, device: torch.device, pin: bool = False) -> Record:
        """This record with its cached tensors on `device` (`to_device`)."""
        moved = {name: to_device(getattr(self, name), device, pin) for name in self._CACHED}
        return Record(self.n, model_input=self.model_input, **moved)

    @property
    def pinned(self) -> bool:
        """Whether every cached tensor is in pinned CPU memory (spilled from an accelerator)."""
        leaves = [
            t for t in tree_leaves([getattr(self, n) for n in self._CACHED]) if isinstance(t, torch.Tensor)
        ]
        return bool(leaves) and all(t.is_pinned() for t in leaves)

    @property
    def device(self) -> torch.device | None:
        """Where the cached tensors are (None when it holds none)."""
        leaves = tree_leaves([getattr(self, name) for name in self._CACHED])
        return next((t.device for t in leaves if isinstance(t, torch.Tensor)), None)


@dataclass
class UnitData:
    """The cached records of one unit, merged into one when the shapes allow (then sampling is uniform)."""

    records: list[Record] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # samples of each calibration batch held, in order
    chained: bool = False  # batches after the first were carried from the previous unit's outputs
    shard: Shard | None = None  # this rank holds a shard of the batches: sampled as one process samples all

    @property
    def n(self) -> int:
        return sum(r.n for r in self.records)

    def per_batch(self) -> list[Record]:
        """One record per calibration batch held, in order (row views of merged records)."""
        if len(self.records) == len(self.sizes):
            return list(self.records)
        out, k = [], 0
        for merged in self.records:
            start = 0
            while start < merged.n:
                size = self.sizes[k]
                idx = slice(start, start + size)  # views, not copies
                out.append(
                    Record(
                        size,
                        rows(merged.q_input, idx, merged.n),
                        rows(merged.f_input, idx, merged.n),
                        rows(merged.target, idx, merged.n),
                    )
                    if size < merged.n
                    else merged
                )
                start += size
                k += 1
        return out

    def merge(self) -> None:
        """Concatenate the records held on each device into one, if every per-sample tensor has equal
        trailing shapes (else keep one record per batch)."""
        groups: list[list[Record]] = []
        for rec in self.records:
            if groups and groups[-1][0].device == rec.device:
                groups[-1].append(rec)
            else:
                groups.append([rec])
        if all(len(g) < 2 for g in groups):
            return
        merged_records = []
        try:
            for group in groups:
                merged = Record(sum(r.n for r in group))
                sizes = [r.n for r in group]
                pin = group[0].device == torch.device("cpu") and group[0].pinned
                for name in ("q_input", "f_input", "target", "weight", "model_input", "final"):
                    values = [getattr(r, name) for r in group]
                    if values[0] is not None:
                        value = concat_rows(values, sizes)
                        if pin and name in Record._CACHED:  # spilled batches stay in pinned memory
                            value = tree_map(
                                lambda t: t.pin_memory() if isinstance(t, torch.Tensor) else t, value
                            )
                        setattr(merged, name, value)
                merged_records.append(merged)
        except ValueError:
            log.debug("unit inputs differ in shape across batches; sampling within batches")
            return
        self.records = merged_records

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Record, torch.Tensor]:
        """A record (chosen in proportion to its size) and `batch_size` row indices drawn without replacement."""
        if len(self.records) == 1:
            rec = self.records[0]
        else:
            weights = torch.tensor([r.n for r in self.records], dtype=torch.float)
            rec = self.records[int(torch.multinomial(weights, 1, generator=generator))]
        idx = torch.randperm(rec.n, generator=generator)[: min(batch_size, rec.n)]
        return rec, idx


# ---------------------------------------------------------------------------------------- chaining


@dataclass
class Carried:
    """A unit's outputs on its cached calibration batches, as the next unit's inputs (`carry_outputs`)."""

    q_inputs: list[Captured]  # per batch: the installed quantized unit's output, with the unit's other args
    f_inputs: list[Captured]  # per batch: the float unit's output (the cached target), likewise


@torch.no_grad()
def carry_outputs(qmodel: nn.Module, unit: Unit, data: UnitData) -> Carried:
    """Run the unit as installed on its cached quantized inputs; pair them with its cached float outputs.

    These are the next unit's inputs if the model feeds one unit into the next; `collect_unit_data` checks it.
    """
    q_inputs, f_inputs = [], []
    device = model_placement(qmodel)[0]
    for rec in data.per_batch():
        assert rec.q_input is not None and rec.target is not None
        out = unit_forward(qmodel, unit, {}, to_device(rec.q_input, device)).detach()
        out = out.to(rec.target.device)  # where the batch was held (a spilled batch stays off the device)
        q_inputs.append(Captured((out, *rec.q_input.args[1:]), rec.q_input.kwargs))
        f = rec.f_input if rec.f_input is not None else rec.q_input
        f_inputs.append(Captured((rec.target, *f.args[1:]), f.kwargs))
    return Carried(q_inputs, f_inputs)


def _same(a: Any, b: Any) -> bool:
    """Structurally equal, tensors equal up to float rounding (a different kernel path may reorder sums)."""
    (leaves_a, spec_a), (leaves_b, spec_b) = tree_flatten(a), tree_flatten(b)
    return spec_a == spec_b and all(_same_leaf(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if torch.equal(a, b):
            return True
        if not a.is_floating_point() or not a.numel():
            return False
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max())))
    return type(a) is type(b) and bool(a == b)


@torch.no_grad()
def _chain_holds(teacher: nn.Module, unit: Unit, carried: Carried, first: Record) -> bool:
    """Whether the carried inputs of batch 0 are what real captures give, and the float unit reproduces its
    captured output from its captured input (then targets of later batches can come from the unit alone)."""
    if not carried.q_inputs or first.f_input is None:
        return False
    device = model_placement(teacher)[0]
    first = first.to(device)
    return (
        _same(to_device(carried.q_inputs[0], device), first.q_input)
        and _same(to_device(carried.f_inputs[0], device), first.f_input)
        and _same(unit_forward(teacher, unit, {}, first.f_input), first.target)
    )


@torch.no_grad()
def collect_unit_data(
    qmodel: nn.Module,
    teacher: nn.Module,
    unit: Unit,
    batches: list[Batch],
    *,
    need_float_input: bool,
    loss: Loss,
    output_metric: OutputMetric,
    max_bytes: int,
    carried: Carried | None = None,
) -> UnitData:
    """Cache a unit's quantized-model inputs, float-model outputs (and what the loss needs) over `batches`.

    With `carried` (the previous unit's outputs, MSE loss only), batches after the first take their inputs
    from it once batch 0 shows that the chain holds; otherwise every batch runs the model prefixes.

    Records stay on the model's device up to `max_bytes`, then spill to CPU memory up to `max_bytes` more
    (see the module docstring); the first batch is always kept.
    """
    loss, output_metric = Loss(loss), OutputMetric(output_metric)
    data = UnitData()
    device = model_placement(qmodel)[0]
    used = {device: 0}  # bytes held per device
    cpu = torch.device("cpu")
    pin = torch.cuda.is_available()
    chained = carried is not None and loss is Loss.MSE
    all_layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedLayer)}
    for i, batch in enumerate(batches):
        n = batch_size_of(batch)
        rec = Record(n)
        if loss is Loss.OUTPUT:
            rec.model_input = batch
            rec.final = run_model(teacher, batch).detach()
        elif chained and carried is not None and 0 < i < len(carried.q_inputs):
            rec.q_input = carried.q_inputs[i]
            rec.f_input = carried.f_inputs[i]
            rec.target = unit_forward(teacher, unit, {}, to_device(rec.f_input, device)).detach()
        else:
            rec.q_input = run_captured(qmodel, unit, batch, True, False)["input"]
            seen = run_captured(teacher, unit, batch, need_float_input or chained, True)
            rec.target = seen["output"]
            rec.f_input = seen.get("input")
            if chained and i == 0:
                assert carried is not None
                chained = _chain_holds(teacher, unit, carried, rec)
                log.debug("unit %s: %s", unit.name, "inputs carried" if chained else "cached from prefixes")
            if loss is Loss.FISHER:
                final = run_model(teacher, batch).detach()
                with ste_act_quantizers(all_layers, set(), set(), 0.0, torch.Generator()):
                    rec.weight = fisher_weights(qmodel, unit, batch, final, output_metric)
        if not need_float_input:
            rec.f_input = None
        size = rec.nbytes
        if not data.records or used[device] + size <= max_bytes:
            where = device
        elif device != cpu and used.get(cpu, 0) + size <= max_bytes:
            where = cpu  # spilled: moved back to the device per sampled batch
        else:
            log.info(
                "unit %s: cache bound reached, using %d of %d calibration batches (%d samples)",
                unit.name,
                i,
                len(batches),
                data.n,
            )
            break
        if where != device and not used.get(cpu):
            log.info(
                "unit %s: cache on %s full; batches %d and later held in CPU memory", unit.name, device, i
            )
        data.records.append(rec.to(where, pin))
        data.sizes.append(n)
        used[where] = used.get(where, 0) + size
    data.chained = chained and len(data.records) > 1
    data.merge()
    return data
