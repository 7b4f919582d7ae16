"""Driving learned rounding over a model: calibration data, units in order, progress, checkpoints.

`quantize()` calls `prepare` before planning (presets' first/last-layer policy, synthetic calibration data
made from the float model before BatchNorm folding) and `learned_rounding` after weight quantization and
activation calibration. `reconstruct_model` is the same engine for users who build the pieces themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from postquant.calib.augment import augment_batches
from postquant.calib.data import (
    Batch,
    ForwardLoop,
    batch_size_of,
    collect_batches,
    run_model,
    spread_batches,
)
from postquant.calib.synthetic import distill_bn_data, noise_data
from postquant.distributed import Ranks
from postquant.errors import DataError
from postquant.model.blocks import Unit, make_units
from postquant.model.hf import no_kv_cache
from postquant.nn import cached_weights
from postquant.recipe import LayerOverride, Recipe
from postquant.reconstruct.cache import Carried, carry_outputs, collect_unit_data, nbytes
from postquant.reconstruct.checkpoint import (
    CheckpointStore,
    cached_batches,
    data_fingerprint,
    model_fingerprint,
    unit_seed,
)
from postquant.reconstruct.config import CalibSource, Init, LearnedConfig, Loss
from postquant.reconstruct.loop import UnitOutcome, check_batch_size, reconstruct_unit, restore, snapshot
from postquant.reconstruct.presets import is_learned, learned_config
from postquant.rounding import SquantMode
from postquant.store.files import fingerprint

log = logging.getLogger(__name__)

OnUnitEnd = Callable[[int, Unit, UnitOutcome], None]


@dataclass
class ReconstructionReport:
    """Per-unit outcomes of one learned-rounding run, and its wall time."""

    units: list[UnitOutcome] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0
    chained_units: list[str] = field(
        default_factory=list
    )  # inputs after batch 0 carried from the unit before

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "resumed": self.resumed,
            "chained_units": self.chained_units,
            "units": [asdict(u) for u in self.units],
        }


# ----------------------------------------------------------------------------------- before planning


def prepare(model: nn.Module, recipe: Recipe, batches: Any, example_inputs: Any) -> tuple[Recipe, Any]:
    """Apply the learned config's first/last-layer policy and calibration source (no-op for other methods).

    Args:
        model: the float model, before BatchNorm folding (synthetic data matches its BN statistics).
        recipe: the recipe.
        batches: the calibration batches (or forward loop, or None).
        example_inputs: one batch, for the input shape of synthetic data.

    Returns:
        The recipe (with 8-bit first/last weight overrides when asked) and the calibration data to use.
    """
    if not is_learned(recipe):
        return recipe, batches
    cfg = learned_config(recipe)
    if cfg.first_last_w_bits is not None:
        recipe = _first_last_policy(recipe, cfg.first_last_w_bits)
    if cfg.calib_source is CalibSource.DATA:  # `quantize` has checked that the model runs on the batches
        return recipe, batches
    shape_src = (
        example_inputs if example_inputs is not None else (batches[0] if isinstance(batches, list) else None)
    )
    if not isinstance(shape_src, torch.Tensor) or shape_src.dim() < 2:
        raise DataError(
            f"calib_source='{cfg.calib_source.value}' needs image-like tensor inputs: pass example_inputs=... "
            "(one batch) so postquant knows the input shape"
        )
    shape = tuple(shape_src.shape[1:])
    start = time.perf_counter()
    if cfg.calib_source is CalibSource.SYNTHETIC:  # minutes of forward+backward passes: kept for a resume
        parts = {
            "synthetic": model_fingerprint(model),
            "shape": shape,
            "n": recipe.calib_size,
            "steps": cfg.synthetic_steps,
            "seed": recipe.seed,
        }
        if shape_src.dtype != torch.float32:  # float32 keys stay as they were
            parts["dtype"] = str(shape_src.dtype)
        batches = cached_batches(
            cfg.checkpoint_dir,
            parts,
            lambda: distill_bn_data(
                model,
                shape,
                recipe.calib_size,
                steps=cfg.synthetic_steps,
                seed=recipe.seed,
                progress=cfg.progress,
                dtype=shape_src.dtype,
            ),
        )
    else:
        batches = noise_data(shape, recipe.calib_size, seed=recipe.seed, dtype=shape_src.dtype)
    log.info(
        "%s calibration data: %d samples in %.1f s",
        cfg.calib_source.value,
        recipe.calib_size,
        time.perf_counter() - start,
    )
    return recipe, batches


def _first_last_policy(recipe: Recipe, bits: int) -> Recipe:
    """Set ``w_bits`` of '@first' and '@last' to `bits` unless the recipe already sets them."""
    overrides = dict(recipe.overrides)
    for key in ("@first", "@last"):
        old = overrides.get(key)
        if old is not None and "w_bits" in old.model_fields_set:
            continue
        fields = old.model_dump(include=old.model_fields_set) if old is not None else {}
        overrides[key] = LayerOverride(**{**fields, "w_bits": bits})
    return recipe.model_copy(update={"overrides": overrides})


# ------------------------------------------------------------------------------------- after calibration


def learned_rounding(
    qmodel: nn.Module, teacher: nn.Module, calib: Any, recipe: Recipe, ranks: Ranks | None = None
) -> ReconstructionReport:
    """Learn the rounding of `qmodel`'s layers against the float `teacher` (same module names, BN folded);
    with `ranks`, each step's batch is split across the ranks (`reconstruct_unit`)."""
    cfg = learned_config(recipe)
    if calib is None:
        raise DataError(
            f"method '{recipe.method.value}' learns the rounding from calibration data: pass calib=... (batches, "
            "a DataLoader or a forward_loop), or set learned.calib_source to 'synthetic' or 'noise'"
        )
    fields = recipe.model_dump(mode="json", exclude={"learned": True, "mixed": {"checkpoint_dir"}})
    # a decoder layer must not append to a cache on every step; the layers not being learned dequantize once
    with no_kv_cache(qmodel, teacher), cached_weights(qmodel):
        return reconstruct_model(
            qmodel,
            teacher,
            calib,
            cfg,
            seed=recipe.seed,
            key_fields=fields,
            squant_mode=recipe.squant_mode,
            symmetric=recipe.symmetric,
            ranks=ranks,
        )


def record_model_inputs(model: nn.Module, forward_loop: ForwardLoop, limit: int | None) -> list[Batch]:
    """The inputs a user's ``forward_loop(model)`` feeds to `model`, as batches (at most `limit` samples)."""
    seen: list[Batch] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs and not args:
            seen.append(dict(kwargs))
        elif len(args) == 1 and not kwargs:
            seen.append(args[0])
        else:
            seen.append(tuple(args))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        handle.remove()
    return collect_batches(seen, limit)


def check_calibration(teacher: nn.Module, batches: list[Batch], batch_size: int) -> None:
    """Fail clearly on calibration data the model cannot run; warn when there is less than one batch."""
    if not batches:
        raise DataError("learned rounding needs calibration data: the calibration set is empty")
    try:
        with torch.no_grad():
            run_model(teacher, batches[0])
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = batches[0]
        desc = (
            f"a {tuple(first.shape)} {first.dtype} tensor"
            if isinstance(first, torch.Tensor)
            else f"a {type(first).__name__}"
        )
        raise DataError(
            f"the model cannot run on calibration batch 0 ({desc}): {str(exc).splitlines()[0]}. "
            "Pass inputs of the shape and dtype the model takes (e.g. float32 (N, C, H, W) images)."
        ) from None
    n = sum(batch_size_of(b) for b in batches)
    if n < batch_size:
        log.warning(
            "only %d calibration samples for learned rounding with batch_size %d: every step sees all of them "
            "and the result may overfit; pass more calibration data (calib_size)",
            n,
            batch_size,
        )


def reconstruct_model(
    qmodel: nn.Module,
    teacher: nn.Module,
    calib: list[Batch] | ForwardLoop,
    cfg: LearnedConfig,
    *,
    seed: int = 0,
    key_fields: dict[str, Any] | None = None,
    on_unit_end: OnUnitEnd | None = None,
    squant_mode: SquantMode = SquantMode.EKC,
    symmetric: bool = False,
    ranks: Ranks | None = None,
) -> ReconstructionReport:
    """Learn the rounding of every unit of `qmodel`, in order, in place.

    Args:
        qmodel: the quantized model (`QuantizedLayer`s with initial codes and input quantizers installed).
        teacher: the float model with the same module names (BatchNorm folded the same way).
        calib: calibration batches, or a ``forward_loop(model)`` callable (its inputs are recorded).
        cfg: the learned config.
        seed: every RNG of unit k is seeded from ``(seed, k)``.
        key_fields: extra JSON-able fields for the checkpoint key (e.g. the recipe).
        on_unit_end: called as ``on_unit_end(k, unit, outcome)`` after each unit is installed and saved.
        squant_mode: the SQuant variant of the starting codes when ``cfg.init`` is ``squant`` (`quantize`
            passes the recipe's ``squant_mode``).
        symmetric: the grids are symmetric (the recipe's ``symmetric``; a learned range keeps them so).
        ranks: a process group (`postquant.distributed`): every rank caches all the data and each step's
            batch is split across the ranks, gradients summed (`reconstruct_unit`). A checkpoint directory
            is written by rank 0 alone.

    Raises:
        DataError: calibration data missing, empty or not runnable by the model.
        RecipeError: a block pattern matches nothing.
    """
    start = time.perf_counter()
    squant_mode = SquantMode(squant_mode)
    qmodel.eval()
    teacher.eval()
    batches = calib if isinstance(calib, list) else record_model_inputs(teacher, calib, None)
    if cfg.max_samples is not None:
        batches = spread_batches(batches, cfg.max_samples)
    check_calibration(teacher, batches, cfg.batch_size)
    if cfg.augment:
        batches = augment_batches(batches, cfg.augment, cfg.augment_copies, seed=seed)
    units = make_units(qmodel, cfg.unit, cfg.block_patterns, cfg.blocks_per_unit)
    report = ReconstructionReport()
    store = None
    if cfg.checkpoint_dir is not None:
        parts: dict[str, Any] = {
            "config": cfg.result_fields(),
            "extra": key_fields or {},
            "model": model_fingerprint(teacher),
            "data": data_fingerprint(batches),
            "units": [u.name for u in units],
        }
        # a SQuant start other than full SQuant changes the codes; keys of the default stay as they were
        if cfg.init is Init.SQUANT and squant_mode is not SquantMode.EKC:
            parts["squant_mode"] = squant_mode.value
        key = fingerprint(parts)
        store = CheckpointStore(cfg.checkpoint_dir, key, [u.name for u in units])
    done = set(store.finished()) if store is not None else set()
    if ranks is not None and store is not None:  # ranks that would resume different units would wait forever
        ranks.check_consistent({"set of checkpointed units (checkpoint_dir)": repr(sorted(done))})
    if done:
        log.info(
            "resuming learned rounding: %d of %d units already finished in %s",
            len(done),
            len(units),
            store.dir,
        )
    max_bytes = cfg.max_cache_mb * 2**20
    carried: Carried | None = None
    for k, unit in enumerate(units):
        if k in done:
            state, outcome = store.load(k)
            restore(qmodel, state)
            report.units.append(UnitOutcome(**outcome))
            report.resumed += 1
            carried = None
            continue
        generator = torch.Generator().manual_seed(unit_seed(seed, k))
        data = collect_unit_data(
            qmodel,
            teacher,
            unit,
            batches,
            need_float_input=cfg.drop_prob > 0,
            loss=cfg.loss,
            output_metric=cfg.output_metric,
            max_bytes=max_bytes,
            carried=carried,
        )
        carried = None  # consumed: do not hold the previous unit's outputs while this unit learns
        if data.chained:
            report.chained_units.append(unit.name)
        check_batch_size(data, cfg, unit)
        log.debug(
            "unit %s: %d samples cached (%.1f MB)",
            unit.name,
            data.n,
            sum(nbytes(r.target) for r in data.records) / 2**20 if cfg.loss is not Loss.OUTPUT else 0,
        )
        outcome = reconstruct_unit(
            qmodel,
            teacher,
            unit,
            data,
            cfg,
            generator,
            desc=f"[{k + 1}/{len(units)}] {unit.name}",
            squant_mode=squant_mode,
            ranks=ranks,
            symmetric=symmetric,
        )
        if cfg.chain_inputs and cfg.loss is Loss.MSE and k + 1 < len(units) and k + 1 not in done:
            carried = carry_outputs(qmodel, unit, data)
        del data
        log.info(
            "unit %d/%d %s: %s, error %.4g -> %.4g, %d steps, %.1f s",
            k + 1,
            len(units),
            unit.name,
            outcome.status,
            outcome.error_before,
            outcome.error_after,
            outcome.steps,
            outcome.seconds,
        )
        report.units.append(outcome)
        if store is not None and (ranks is None or ranks.is_main):
            store.save(k, snapshot(qmodel, unit), asdict(outcome))
        if on_unit_end is not None:
            on_unit_end(k, unit, outcome)
    report.seconds = time.perf_counter() - start
    if report.chained_units:
        log.info(
            "%d of %d units cached from the previous unit's outputs", len(report.chained_units), len(units)
        )
    return report
