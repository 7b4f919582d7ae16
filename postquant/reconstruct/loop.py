"""The one reconstruction loop of AdaRound, BRECQ and QDrop: a loss, the parameters to train, a schedule.

Layer-wise (AdaRound, Nagel et al., ICML 2020), block-wise (BRECQ, Li et al., ICLR 2021) and QDrop (Wei et
al., ICLR 2022) differ only in settings of `LearnedConfig`: the unit, where its inputs come from, whether
activations are randomly kept float. The loop minimises

    rec(unit_q(x_q; W_soft), unit_fp(x_fp)) + lambda * sum(1 - |2h - 1|^beta)          (AdaRound eq. 25)

over a cached calibration set, then rounds the variables to integer codes and installs them. A
non-finite loss stops the unit and keeps the codes it had before (logged as a warning).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from postquant.calib.data import Batch, batch_size_of, model_placement, run_model
from postquant.distributed import Ranks, shard_bounds
from postquant.grids import Grid
from postquant.model.blocks import Unit
from postquant.nn import ActQuantizer, QuantizedLayer, compact_grid_tensor
from postquant.progress import progress_bar
from postquant.reconstruct.cache import Record, UnitData, rows, to_device
from postquant.reconstruct.capture import Captured, unit_forward
from postquant.reconstruct.config import Init, LearnedConfig, Loss, Optimizer, Schedule
from postquant.reconstruct.losses import final_distance, unit_distance
from postquant.reconstruct.params import (
    LayerRounding,
    Rows,
    beta_at,
    reg_active,
    ste_act_quantizers,
    uniform_rows,
)
from postquant.reconstruct.shards import WeightShards, balanced_rows, layer_owners
from postquant.rounding import SquantMode, squant_codes

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class LoopResult:
    """How one optimisation went: ``status`` is ``"ok"`` or ``"nan"``."""

    status: str
    steps: int
    first_loss: float | None
    last_loss: float | None


class SignSGD:
    """Signed gradient descent, ``p -= lr * sign(grad)`` (AutoRound, Cheng et al., "Optimize Weight Rounding
    via Signed Gradient Descent for the Quantization of LLMs", 2023).

    Every variable moves by exactly `lr` per step whatever its gradient's size, so ``lr * iters / 2`` (with
    the linear decay) bounds how far a rounding offset can travel: ``lr = 1 / iters`` lets it cross the whole
    rounding interval once, which is what makes short runs work. Not a `torch.optim.Optimizer`: those import
    TorchDynamo on their first step (2-6 s on a CPU, as long as a short run's whole optimisation), so
    `optimise` applies its learning-rate schedule itself (`scale_lr`).
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        self.param_groups = [
            {**g, "base_lr": float(g.get("lr", lr)), "lr": float(g.get("lr", lr))} for g in groups
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def scale_lr(self, factor: float) -> None:
        """Set every group's lr to its base lr times `factor`."""
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def schedule_factor(schedule: Schedule, step: int, iters: int) -> float:
    """The factor on the base learning rate at `step` of `iters` (what `CosineAnnealingLR` to 0 and
    `LinearLR` to 0 give, in closed form)."""
    t = step / max(iters, 1)
    if schedule is Schedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule is Schedule.LINEAR:
        return 1.0 - t
    return 1.0


def make_optimizer(groups: list[dict[str, Any]], cfg: LearnedConfig) -> torch.optim.Optimizer | SignSGD:
    """The optimizer of `cfg.optimizer` over parameter groups that carry their own ``lr``."""
    if cfg.optimizer is Optimizer.SIGNSGD:
        return SignSGD(groups, lr=cfg.lr)
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer is Optimizer.RMSPROP:
        return torch.optim.RMSprop(groups, lr=cfg.lr)
    if cfg.optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def optimise(
    step_loss: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    weight_groups: list[dict[str, Any]],
    act_params: list[nn.Parameter],
    cfg: LearnedConfig,
    desc: str,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> LoopResult:
    """Run `cfg.iters` steps of ``rec + reg = step_loss(step)``.

    Weight groups follow `cfg.lr_schedule`; activation steps use Adam at `cfg.act_lr` with a cosine
    schedule to 0 (BRECQ's code). Stops at the first non-finite loss (status ``"nan"``). With
    `cfg.keep_best_step` the variables end as they were at the step of the lowest loss.

    `reduce` (data-parallel steps, `postquant.reconstruct.shards.WeightShards.reduce`): `step_loss` is this
    rank's part of the step's loss; ``reduce(rec, reg)`` backpropagates it, sums the gradients over the ranks
    and returns the step's total loss, the same on every rank, so every rank stops at the same step.
    """
    optimizers: list[Any] = [make_optimizer(weight_groups, cfg)] if weight_groups else []
    if act_params:
        optimizers.append(torch.optim.Adam(act_params, lr=cfg.act_lr))
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
    signed = optimizers[0] if optimizers and isinstance(optimizers[0], SignSGD) else None
    if signed is None and weight_groups and cfg.lr_schedule is Schedule.COSINE:
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[0], T_max=max(cfg.iters, 1)))
    elif signed is None and weight_groups and cfg.lr_schedule is Schedule.LINEAR:
        schedulers.append(
            torch.optim.lr_scheduler.LinearLR(
                optimizers[0], start_factor=1.0, end_factor=0.0, total_iters=max(cfg.iters, 1)
            )
        )
    if act_params:
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[-1], T_max=max(cfg.iters, 1)))
    first = last = None
    params = [p for g in weight_groups for p in g["params"]] + list(act_params)
    best: tuple[float, list[torch.Tensor]] | None = None  # cfg.keep_best_step: (loss, variables)
    amp = _step_autocast(cfg, params)
    bar = progress_bar(range(cfg.iters), enabled=cfg.progress, desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        if signed is not None:
            signed.scale_lr(schedule_factor(cfg.lr_schedule, step, cfg.iters))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with amp:
            rec, reg = step_loss(step)
        rec, reg = rec.float(), reg.float()
        total = rec + reg if reduce is None else reduce(rec, reg)
        value = float(total.detach())
        if not torch.isfinite(total.detach()):
            bar.close()
            return LoopResult("nan", step, first, last)
        first = value if first is None else first
        last = value
        if cfg.keep_best_step and (best is None or value < best[0]):  # the variables this loss was made with
            best = (value, [p.detach().clone() for p in params])
        if reduce is None:
            total.backward()
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
        if step % 50 == 0 or step == cfg.iters - 1:
            bar.set_postfix(rec=f"{float(rec.detach()):.4g}", reg=f"{float(reg.detach()):.4g}", refresh=False)
    bar.close()
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best[1], strict=True):
                p.copy_(kept)
    return LoopResult("ok", cfg.iters, first, last)


def _step_autocast(cfg: LearnedConfig, params: list[torch.Tensor]) -> Any:
    """The context each step's forward runs in: `torch.autocast` on the variables' device in `cfg.autocast`'s
    dtype, or a no-op."""
    if cfg.autocast is None:
        return contextlib.nullcontext()
    device = params[0].device.type if params else "cpu"
    return torch.autocast(device_type=device, dtype=getattr(torch, cfg.autocast))


# ------------------------------------------------------------------------------- unit state and forward


def snapshot(qmodel: nn.Module, unit: Unit) -> dict[str, torch.Tensor]:
    """Everything reconstruction may change in a unit: codes, steps, biases, activation steps."""
    state: dict[str, torch.Tensor] = {}
    for name in unit.layers:
        layer: QuantizedLayer = qmodel.get_submodule(name)
        state[f"{name}.codes"] = layer.codes.detach().clone()
        state[f"{name}.grid_inv_scale"] = layer.grid_inv_scale.detach().clone()
        state[f"{name}.grid_zero_point"] = layer.grid_zero_point.detach().clone()
        if getattr(layer.inner, "bias", None) is not None:
            state[f"{name}.inner.bias"] = layer.inner.bias.detach().clone()
        if isinstance(layer.act_quant, ActQuantizer):  # a dynamic quantizer has no step
            state[f"{name}.act_quant.scale"] = layer.act_quant.scale.detach().clone()
    return state


_STATE_KEYS = ("codes", "grid_inv_scale", "grid_zero_point", "inner.bias", "act_quant.scale")


@torch.no_grad()
def restore(qmodel: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Install a `snapshot` (or a checkpointed unit) into `qmodel`."""
    for key, value in state.items():
        what = next((k for k in _STATE_KEYS if key.endswith("." + k)), None)
        if what is None:
            raise KeyError(f"unknown unit state {key!r}")
        layer: QuantizedLayer = qmodel.get_submodule(key[: -len(what) - 1])
        if what in ("grid_inv_scale", "grid_zero_point"):  # a checkpointed state comes from the CPU
            setattr(layer, what, value.to(layer.grid_inv_scale.device, copy=True))
        elif what == "inner.bias":
            layer.inner.bias.copy_(value)
        elif what == "act_quant.scale":
            layer.act_quant.scale.copy_(value)
    for key, value in state.items():
        if key.endswith(".codes"):  # after the steps: set_codes recomputes the dequantized weight
            qmodel.get_submodule(key[: -len(".codes")]).set_codes(value.to(torch.int32))


class _Runner(nn.Module):
    """Calls a model on a batch (tensor, tuple or dict) so that `functional_call` can run whole models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return run_model(self.model, batch)


def _mix_inputs(
    q: Captured, f: Captured | None, p: float, generator: torch.Generator, window: Rows | None = None
) -> Captured:
    """QDrop input: each element of the first argument from the float input w.p. `p`, else quantized.
    `window`: these are rows [start, stop) of a batch of ``total`` (`uniform_rows`)."""
    if f is None or p <= 0 or not q.args or not isinstance(q.args[0], torch.Tensor):
        return q
    xq, xf = q.args[0], f.args[0]
    keep_float = (uniform_rows(xq.shape, generator, window) < p).to(xq.device)  # drawn on the CPU generator
    mixed = torch.where(keep_float, xf, xq)
    return Captured((mixed, *q.args[1:]), q.kwargs)


# ---------------------------------------------------------------------------------- one unit, end to end


@dataclass
class UnitOutcome:
    """What happened to one unit: the loop's result and the error before/after on the cached data."""

    name: str
    status: str
    steps: int
    error_before: float
    error_after: float
    seconds: float


def _make_rounding(
    qmodel: nn.Module,
    teacher: nn.Module,
    unit: Unit,
    cfg: LearnedConfig,
    generator: torch.Generator,
    squant_mode: SquantMode,
    ranks: Ranks | None = None,
    owners: dict[str, int] | None = None,
    symmetric: bool = False,
) -> dict[str, LayerRounding]:
    """The rounding variables of the unit's layers, from their starting codes (`cfg.init`).

    With `ranks`, SQuant starting codes are computed by each layer's owner (`owners`) and broadcast."""
    inits: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}
    for name in unit.layers:
        grid: Grid = qmodel.get_submodule(name).grid
        w = teacher.get_submodule(name).weight.detach()
        xs[name] = x = grid.to_int(w)
        if cfg.init is not Init.SQUANT:
            inits[name] = grid.nearest(w)
        elif ranks is None or owners is None or owners[name] == ranks.rank:
            inits[name] = squant_codes(x, grid.qmin, grid.qmax, squant_mode).to(torch.int32)
        else:
            inits[name] = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    if cfg.init is Init.SQUANT and ranks is not None and owners is not None:
        for name, init in inits.items():
            ranks.broadcast_(init, owners[name], "sending SQuant starting codes")
    out = {}
    for name in unit.layers:  # in order: a random selection draws from `generator` alike on every rank
        layer: QuantizedLayer = qmodel.get_submodule(name)
        bias = getattr(layer.inner, "bias", None)
        out[name] = LayerRounding(xs[name], inits[name], layer.grid, bias, cfg, generator, symmetric)
    return out


def _overrides(roundings: dict[str, LayerRounding], prefix: str = "") -> dict[str, torch.Tensor]:
    ov: dict[str, torch.Tensor] = {}
    for name, r in roundings.items():
        ov[f"{prefix}{name}.weight"] = r.weight()
        if r.bias is not None:
            ov[f"{prefix}{name}.inner.bias"] = r.bias
    return ov


@torch.no_grad()
def evaluate_unit(
    qmodel: nn.Module,
    unit: Unit,
    data: UnitData,
    cfg: LearnedConfig,
    chunk: int = 128,
    ranks: Ranks | None = None,
) -> float:
    """Mean reconstruction loss of the unit as installed (hard codes, deployed quantizers) on the cache (on its
    first ``cfg.check_samples`` rows when set).

    With `ranks`, each rank evaluates a contiguous share of the chunks (of its own rows when the cache is
    sharded, ``data.shard``) and the sums are all-reduced (the same mean on every rank; one process's up to
    float summation order)."""
    chunks = [
        (rec, slice(start, min(start + chunk, rec.n)))
        for rec in data.records
        for start in range(0, rec.n, chunk)
    ]
    if cfg.check_samples is not None:  # the first `check_samples` rows of the cache
        chunks = _first_rows(chunks, cfg.check_samples)
    if ranks is not None and data.shard is None:  # a sharded cache: each rank evaluates its own rows
        first, stop = shard_bounds(len(chunks), ranks.world)[ranks.rank]
        chunks = chunks[first:stop]
    total, count = 0.0, 0
    device = model_placement(qmodel)[0]
    for rec, idx in chunks:  # row views: a spilled (pinned) chunk copies fast
        size = idx.stop - idx.start
        total += float(_loss(qmodel, unit, rec, idx, {}, cfg, None, device)) * size
        count += size
    if ranks is not None:
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        ranks.all_reduce_sum_([sums], "summing reconstruction errors")
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1)


def _first_rows(chunks: list[tuple[Record, slice]], n: int) -> list[tuple[Record, slice]]:
    """The first `n` rows of a cache given as (record, rows) chunks, in order."""
    out: list[tuple[Record, slice]] = []
    for rec, idx in chunks:
        if n <= 0:
            break
        stop = min(idx.stop, idx.start + n)
        out.append((rec, slice(idx.start, stop)))
        n -= stop - idx.start
    return out


def _loss(
    qmodel: nn.Module,
    unit: Unit,
    rec: Record,
    idx: torch.Tensor | slice,
    overrides: dict[str, torch.Tensor],
    cfg: LearnedConfig,
    generator: torch.Generator | None,
    device: torch.device,
    window: Rows | None = None,
) -> torch.Tensor:
    """The reconstruction loss on rows `idx` of a cached record, computed on `device` (the model's).
    `window`: `idx` are rows [start, stop) of a step's batch of ``total`` (data-parallel QDrop draws)."""
    if cfg.loss is Loss.OUTPUT:
        batch = rows(rec.model_input, idx, rec.n)
        ov = {f"model.{k}": v for k, v in overrides.items()}
        out = functional_call(_Runner(qmodel), ov, (batch,))
        return final_distance(out, to_device(rows(rec.final, idx, rec.n), device), cfg.output_metric)
    inp = to_device(rows(rec.q_input, idx, rec.n), device)
    if generator is not None and cfg.drop_prob > 0:
        f_inp = to_device(rows(rec.f_input, idx, rec.n), device)
        inp = _mix_inputs(inp, f_inp, cfg.drop_prob, generator, window)
    out = unit_forward(qmodel, unit, overrides, inp)
    weight = to_device(rows(rec.weight, idx, rec.n), device) if rec.weight is not None else None
    return unit_distance(out, to_device(rows(rec.target, idx, rec.n), device), weight)


def reconstruct_unit(
    qmodel: nn.Module,
    teacher: nn.Module,
    unit: Unit,
    data: UnitData,
    cfg: LearnedConfig,
    generator: torch.Generator,
    desc: str,
    squant_mode: SquantMode = SquantMode.EKC,
    ranks: Ranks | None = None,
    symmetric: bool = False,
) -> UnitOutcome:
    """Learn the rounding of one unit on its cached data and install the result in `qmodel`.

    On a non-finite loss the unit keeps the codes it had before and a warning is logged; if the learned
    codes reconstruct worse than the starting codes on the cached data, the starting codes are kept.
    `squant_mode` is the SQuant variant of the starting codes when ``cfg.init`` is ``squant`` (the recipe's);
    `symmetric` says the grids are symmetric (the recipe's), which a learned range keeps.

    With `ranks` (a process group, every rank holding the same cache and generator), each step draws the
    same batch on every rank, each rank computes the loss of its contiguous share of the batch's rows
    (weighted by its share) and `optimise` sums the gradients: the step of one process up to float summation
    order. The weight side of the step (soft weights, regulariser, optimizer step) is split by layers
    (`postquant.reconstruct.shards.WeightShards`). QDrop's random draws are made for the whole batch
    on every rank and sliced to its rows (`uniform_rows`), so they are one process's draws. A batch of
    fewer rows than ranks is run whole by every rank, its loss divided among them.

    When each rank holds only a shard of the data (``data.shard``, the block path), every rank draws the
    batch one process draws from all the data (same generator calls), the ranks move rows so that each
    computes its share of the batch (`postquant.reconstruct.shards.balanced_rows`), and each computes the
    loss of its rows, weighted by their share of the batch (none: a zero loss, and QDrop's draw still
    made): the same global batch and step as one process.
    """
    start_time = time.perf_counter()
    device = model_placement(qmodel)[0]
    layers = {n: qmodel.get_submodule(n) for n in unit.layers}
    before = snapshot(qmodel, unit)
    owners = layer_owners({n: layers[n].weight_shape for n in unit.layers}, ranks) if ranks else None
    roundings = _make_rounding(qmodel, teacher, unit, cfg, generator, squant_mode, ranks, owners, symmetric)
    _install(qmodel, roundings, {})  # the starting codes (nearest or SQuant)
    error_before = evaluate_unit(qmodel, unit, data, cfg, ranks=ranks)

    if cfg.loss is Loss.OUTPUT:  # gradients must pass every activation quantizer of the model
        swap = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedLayer)}
    else:
        swap = layers
    learn_act = set(unit.layers) if cfg.learn_act_scales else set()
    with ste_act_quantizers(swap, learn_act, set(unit.layers), cfg.drop_prob, generator) as act_q:
        act_params = [q.scale for q in act_q.values() if isinstance(q.scale, nn.Parameter)]
        split = ranks
        shards = WeightShards(roundings, ranks, owners, act_params) if ranks and owners else None
        groups = (
            shards.groups(cfg)
            if shards is not None
            else [g for r in roundings.values() for g in r.groups(cfg)]
        )
        trainable = any(g["params"] for r in roundings.values() for g in r.groups(cfg))  # on any rank

        def batch_loss(overrides: dict[str, torch.Tensor]) -> torch.Tensor:
            """This process's (this rank's share of the) loss on one batch drawn from the cache."""
            window: Rows | None
            if data.shard is not None:  # this rank's rows of the batch one process draws from all the data
                assert split is not None  # a sharded cache exists only over ranks
                drawn = data.shard.sample(data.records, cfg.batch_size, generator)
                record, idx, positions = balanced_rows(drawn, split)  # its share, rows moved between ranks
                window = (positions, drawn.total)
                for q in act_q.values():
                    q.window = window
                if record is None or not len(idx):
                    if cfg.drop_prob > 0 and cfg.loss is not Loss.OUTPUT:  # QDrop's draw, as the other ranks
                        uniform_rows((0, *drawn.trailing), generator, window)
                    return torch.zeros((), device=device)
                loss = _loss(qmodel, unit, record, idx, overrides, cfg, generator, device, window)
                return loss * (len(idx) / drawn.total)
            rec, idx = data.sample(cfg.batch_size, generator)
            window = None
            if split is not None and len(idx) >= split.world:  # this rank's rows, weighted by their share
                start, stop = shard_bounds(len(idx), split.world)[split.rank]
                window, idx = (start, stop, len(idx)), idx[start:stop]
            for q in act_q.values():
                q.window = window
            loss = _loss(qmodel, unit, rec, idx, overrides, cfg, generator, device, window)
            if split is not None:
                loss = loss * ((window[1] - window[0]) / window[2] if window is not None else 1 / split.world)
            return loss

        def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            # every rank, with or without rows in the batch: the soft weights' broadcast is a collective
            rec_loss = batch_loss(_overrides(roundings) if shards is None else shards.overrides())
            reg = rec_loss.new_zeros(())
            if cfg.reg_lambda > 0 and reg_active(step, cfg):
                beta = beta_at(step, cfg)
                reg = cfg.reg_lambda * (
                    sum((r.regulariser(beta) for r in roundings.values()), rec_loss.new_zeros(()))
                    if shards is None
                    else shards.regulariser(beta)  # this rank's layers: the ranks' terms add up
                )
            return rec_loss, reg

        result = None
        if trainable or act_params:
            reduce = shards.reduce if shards is not None else None
            result = optimise(step_loss, _merge_groups(groups), act_params, cfg, desc, reduce=reduce)
            if shards is not None and result.status == "ok":
                shards.share()  # every layer's variables from its owner: every rank installs the same codes
        learned_scales = {
            n: q.scale.detach().abs().clone()
            for n, q in act_q.items()
            if n in learn_act and q.scale is not None
        }

    if result is not None and result.status == "nan":
        restore(qmodel, before)
        log.warning(
            "unit %s: the reconstruction loss became non-finite at step %d; keeping its previous codes",
            unit.name,
            result.steps,
        )
        return UnitOutcome(
            unit.name, "nan", result.steps, error_before, error_before, time.perf_counter() - start_time
        )

    start_state = snapshot(qmodel, unit)
    _install(qmodel, roundings, learned_scales)
    error_after = evaluate_unit(qmodel, unit, data, cfg, ranks=ranks)
    status = "ok"
    if cfg.keep_better_start and not error_after <= error_before:
        log.info(
            "unit %s: learned rounding reconstructs worse (%.4g > %.4g); keeping the start",
            unit.name,
            error_after,
            error_before,
        )
        restore(qmodel, start_state)
        error_after, status = error_before, "kept-start"
    steps = result.steps if result is not None else 0
    return UnitOutcome(unit.name, status, steps, error_before, error_after, time.perf_counter() - start_time)


def _merge_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One optimizer group per learning rate (fewer, larger groups are faster)."""
    by_lr: dict[float, list[nn.Parameter]] = {}
    for g in groups:
        by_lr.setdefault(float(g["lr"]), []).extend(g["params"])
    return [{"params": ps, "lr": lr} for lr, ps in by_lr.items()]


@torch.no_grad()
def _install(
    qmodel: nn.Module, roundings: dict[str, LayerRounding], act_scales: dict[str, torch.Tensor]
) -> None:
    """Write hard codes, learned weight steps, biases and activation steps into the quantized layers."""
    for name, r in roundings.items():
        layer: QuantizedLayer = qmodel.get_submodule(name)
        grid = r.current_grid()
        layer.grid_inv_scale = grid.inv_scale.detach().clone()
        if r.range_hi is not None:  # a learned range moves the zero points too
            layer.grid_zero_point = compact_grid_tensor(grid.zero_point.detach().clone())
        layer.set_codes(r.hard_codes())
        if r.bias is not None:
            layer.inner.bias.copy_(r.bias)
    for name, scale in act_scales.items():
        qmodel.get_submodule(name).act_quant.scale.copy_(scale)


def check_batch_size(data: UnitData, cfg: LearnedConfig, unit: Unit) -> None:
    """Warn once when the cached samples are fewer than the batch size (every step sees all of them)."""
    if data.n < cfg.batch_size:
        log.warning(
            "unit %s: only %d calibration samples for batch_size %d; every step uses all of them",
            unit.name,
            data.n,
            cfg.batch_size,
        )


__all__ = [
    "LoopResult",
    "UnitOutcome",
    "batch_size_of",
    "check_batch_size",
    "evaluate_unit",
    "optimise",
    "reconstruct_unit",
    "restore",
    "snapshot",
]
