"""Block-sequential quantization of decoder stacks (causal LMs) in bounded memory: one decoder layer at a time.

`quantize` keeps the whole float model as the teacher of learned rounding beside the quantized copy and
caches every unit from model prefixes. For a decoder stack (``model.layers``, GPT-2's ``transformer.h``, ...)
`quantize_blocks` instead walks the layers in order (llm-compressor's sequential pipeline, GPTQ's
layer-by-layer loop):

1. the inputs of decoder layer 0 are captured once per calibration batch (embeddings; the rotary tables,
   masks and flags the model passes to every layer are kept as they came);
2. for layer k: its float weights are the teacher (the caller's model is not touched; with
   ``inplace=True`` a copy of that one layer is kept instead), its planned Linears get codes by the recipe's
   rounding, and learned rounding reconstructs its output with the existing unit loop
   (`postquant.reconstruct.loop.reconstruct_unit`) from two chains: the *quantized* chain (layer k's input
   in the quantized model: quantized-input propagation, BRECQ/QDrop) and the float chain (the teacher's
   input, whose output is the target and QDrop's float input);
3. layer k's outputs become layer k+1's inputs in both chains, and the teacher is released.

Nothing copies the whole model: the quantized model is built from a copy of everything *but* the decoder
layers, then one layer copy at a time (``inplace=True`` skips even that). With a checkpoint directory, each
finished layer's state (codes, steps, biases) and both chains are saved, so a killed run resumes at the next
layer and ends with the same codes, bit for bit, as an uninterrupted one.

RTN and SQuant are per-layer and data-free: the same walk runs without calibration data or chains, and
gives exactly the codes `quantize` gives. Not here (use `quantize`): activation quantization, mixed
precision, the power grid's output-error search, loss='output' / Fisher weights and augmentation. Layers
outside the decoder stack that the plan quantizes (``lm_head`` unless ignored) get the recipe's data-free
codes (nearest for learned methods). Chains stay in memory (``n x seqlen x hidden`` floats each).

In a torch.distributed process group (`postquant.distributed`), each rank carries the chains of its contiguous
shard of the calibration batches; GPTQ sums the ranks' Hessians and splits the solves, learned rounding draws
one process's batch from the sharded cache and sums the gradients, RTN/SQuant split the layers, rank 0 writes
the checkpoints, and every rank ends with the same model (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from postquant.calib import as_calibration
from postquant.calib.data import batch_size_of, run_model
from postquant.choices import GridKind, Method, PowerSearch
from postquant.distributed import Ranks, current, shard, shard_bounds
from postquant.errors import CheckpointError, DataError, RecipeError, UnsupportedModelError
from postquant.eval.run import main_output
from postquant.model.blocks import Unit
from postquant.model.hf import no_kv_cache
from postquant.model.walk import quantized_layers
from postquant.nn import cached_weights
from postquant.nn.layer import upcast_half
from postquant.outcome import QuantizationResult, attach_result
from postquant.pipeline import agree_model, check_same_inputs
from postquant.plan import Plan, check_finite, make_plan
from postquant.progress import progress_bar
from postquant.recipe import Recipe
from postquant.reconstruct.cache import Record, Shard, UnitData, mergeable
from postquant.reconstruct.capture import Captured, _StopForward, capture
from postquant.reconstruct.checkpoint import (
    CheckpointStore,
    data_fingerprint,
    model_fingerprint,
    read_tensors,
    unit_seed,
)
from postquant.reconstruct.config import BOOKKEEPING, Loss
from postquant.reconstruct.engine import ReconstructionReport, prepare
from postquant.reconstruct.loop import UnitOutcome, reconstruct_unit, restore, snapshot
from postquant.reconstruct.presets import is_learned, learned_config
from postquant.rounding.gptq import HessianAccumulator
from postquant.store.files import fingerprint, write_atomic
from postquant.weights import quantize_weights, reduce_hessians, solve_gptq

__all__ = ["DECODER_LISTS", "check_block_recipe", "decoder_layers", "quantize_blocks"]

log = logging.getLogger(__name__)

# Where the decoder layers of the common causal-LM families live (Llama/Qwen/Mistral/Gemma, OPT, GPT-2,
# GPT-NeoX, multimodal Gemma 3 text towers).
DECODER_LISTS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
)

OnBlockEnd = Callable[[int, str], None]


def decoder_layers(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ``nn.ModuleList`` of `model`'s decoder layers.

    Args:
        blocks: the list's dotted name; None looks for the `DECODER_LISTS` in order.

    Raises:
        UnsupportedModelError: no such list (the message names the lists looked for).
    """
    for name in (blocks,) if blocks else DECODER_LISTS:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return name, found
    looked = repr(blocks) if blocks else ", ".join(DECODER_LISTS)
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1][:4]
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder-layer list at {looked}: pass blocks='<dotted name of the "
        f"nn.ModuleList of its layers>'" + (f" (its module lists: {', '.join(lists)})" if lists else "")
    )


def check_block_recipe(recipe: Recipe) -> None:
    """What the block path does not do raises a `RecipeError` that points to `quantize`."""
    problems = []
    if recipe.a_bits is not None:
        problems.append("activation quantization (a_bits)")
    if recipe.mixed is not None:
        problems.append("mixed precision")
    if recipe.grid is GridKind.POWER and recipe.power_search is PowerSearch.OUTPUTS:
        problems.append("power_search: outputs")
    if is_learned(recipe):
        cfg = learned_config(recipe)
        if cfg.loss is not Loss.MSE:
            problems.append(f"learned.loss={cfg.loss.value} (only mse)")
        if cfg.unit.value != "block":
            problems.append(f"learned.unit={cfg.unit.value} (a unit here is one decoder layer)")
        if cfg.augment:
            problems.append("learned.augment")
        if cfg.calib_source.value != "data":
            problems.append(f"learned.calib_source={cfg.calib_source.value} (text data only)")
    if problems:
        raise RecipeError(
            f"the block-sequential path does not support {', '.join(problems)}: use postquant.quantize for "
            "these, or change the recipe"
        )


def _skeleton_copy(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """A deep copy of `model` whose decoder layers are empty placeholders (filled one at a time)."""
    memo: dict[int, Any] = {id(layer): nn.Module() for layer in layers}
    return copy.deepcopy(model, memo)


class _TeacherView(nn.Module):
    """A module tree that holds one float layer at its dotted name, so the unit loop finds
    ``teacher.get_submodule('model.layers.3.mlp.up_proj')`` without a whole float model."""

    def __init__(self, path: str, layer: nn.Module) -> None:
        super().__init__()
        parts = path.split(".")
        node: nn.Module = self
        for part in parts[:-1]:
            child = nn.Module()
            node.add_module(part, child)
            node = child
        node.add_module(parts[-1], layer)


def _split_hidden(c: Captured) -> Captured:
    """The captured call with the hidden states as its first positional argument."""
    if c.args and isinstance(c.args[0], torch.Tensor):
        return c
    if "hidden_states" in c.kwargs:
        kwargs = dict(c.kwargs)
        hidden = kwargs.pop("hidden_states")
        return Captured((hidden, *c.args), kwargs)
    raise UnsupportedModelError("the first decoder layer is called without its hidden states as input")


@torch.no_grad()
def _first_inputs(
    model: nn.Module, first: str, batches: list[Any], keep: range | None = None
) -> list[Captured]:
    """Layer 0's call arguments for every calibration batch (the model runs only up to layer 0).

    `keep`: the batches whose hidden states are kept (a rank's shard); the others' are placeholders of the
    same shape that hold no memory (their other arguments are real: they decide how the cache merges).
    """
    unit = Unit(first, (first,), ())
    out = []
    for b, batch in enumerate(batches):
        with (
            capture(model, unit, want_input=True, want_output=False) as seen,
            contextlib.suppress(_StopForward),
        ):
            run_model(model, batch)
        if "input" not in seen:
            raise UnsupportedModelError(f"{first} was not called when the model ran on a calibration batch")
        c = _split_hidden(seen["input"])
        if keep is not None and b not in keep:
            hidden = c.args[0]
            placeholder = torch.zeros((), dtype=hidden.dtype, device=hidden.device).expand(hidden.shape)
            c = Captured((placeholder, *c.args[1:]), c.kwargs)
        out.append(c)
    return out


def _shard_of(inputs: list[Captured], part: range) -> Shard:
    """Where a rank holding batches `part` of `inputs` sits in the cache one process builds (`Shard`): one
    merged record when one process's `UnitData.merge` concatenates the batches, else one per batch."""
    sizes = [c.args[0].shape[0] for c in inputs]
    trailing = [tuple(c.args[0].shape[1:]) for c in inputs]
    if len(inputs) > 1 and mergeable(inputs, sizes):
        start, stop = sum(sizes[: part.start]), sum(sizes[: part.stop])
        return Shard((sum(sizes),), ((0, start, stop) if stop > start else None,), (trailing[0],))
    held = tuple((b - part.start, 0, sizes[b]) if b in part else None for b in range(len(inputs)))
    return Shard(tuple(sizes), held, tuple(trailing))


@torch.no_grad()
def _run_layer(layer: nn.Module, inputs: list[Captured], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """`layer` on each batch's captured arguments with the hidden states replaced by `hidden`."""
    return [
        main_output(layer(h, *c.args[1:], **c.kwargs)).detach() for c, h in zip(inputs, hidden, strict=True)
    ]


def _gptq_layer(
    qmodel: nn.Module,
    float_layer: nn.Module,
    prefix: str,
    layer_names: tuple[str, ...],
    recipe: Recipe,
    inputs: list[Captured],
    hidden: list[torch.Tensor],
    ranks: Ranks | None = None,
) -> None:
    """GPTQ codes for the planned layers of one decoder layer, installed in `qmodel`: their Hessians come from
    one pass of the float decoder layer over the quantized chain's inputs (GPTQ's per-block form).

    With `ranks`, `inputs` and `hidden` are this rank's shard of the batches: the Hessians are summed over the
    ranks in one all-reduce (`reduce_hessians`) and each rank solves a share of the layers (`solve_gptq`)."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for name in layer_names:
        sub = float_layer.get_submodule(name[len(prefix) + 1 :])
        acc = accs[name] = HessianAccumulator(sub)
        handles.append(sub.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(upcast_half(args[0]))))
    try:
        with torch.no_grad():
            _run_layer(float_layer, inputs, hidden)
    finally:
        for handle in handles:
            handle.remove()
    if ranks is not None:
        reduce_hessians(list(accs.values()), ranks)
    items = [
        (name, upcast_half(float_layer.get_submodule(name[len(prefix) + 1 :]).weight.detach()), acc,
         qmodel.get_submodule(name).grid)
        for name, acc in accs.items()
    ]  # fmt: skip
    for name, codes in solve_gptq(items, recipe, ranks).items():
        qmodel.get_submodule(name).set_codes(codes)


def _unit_data(
    inputs: list[Captured],
    q_hidden: list[torch.Tensor],
    f_hidden: list[torch.Tensor],
    targets: list[torch.Tensor],
    shard_of: Shard | None = None,
) -> UnitData:
    """The unit cache of one decoder layer; `shard_of`: this rank holds those batches of one process's cache
    (merged only where one process's merges)."""
    data = UnitData(shard=shard_of)
    for c, hq, hf, t in zip(inputs, q_hidden, f_hidden, targets, strict=True):
        n = hq.shape[0]
        rest = c.args[1:]
        data.records.append(Record(n, Captured((hq, *rest), c.kwargs), Captured((hf, *rest), c.kwargs), t))
        data.sizes.append(n)
    if shard_of is None or len(shard_of.sizes) == 1:
        data.merge()
    return data


class _Chains:
    """Both chains after finished layer k, saved beside the checkpoint store (``chains_<k>.safetensors``).

    With `ranks`, each rank holds batches `part` of the chains: saving gathers them (rank 0 writes the file
    one process writes), loading takes this rank's part of it (so a run resumes on any number of ranks)."""

    def __init__(
        self, store: CheckpointStore | None, ranks: Ranks | None = None, part: range | None = None
    ) -> None:
        self.store = store
        self.ranks = ranks
        self.part = part

    def path(self, k: int) -> Path | None:
        return None if self.store is None else self.store.dir / f"chains_{k:04d}.safetensors"

    def save(self, k: int, q: list[torch.Tensor], f: list[torch.Tensor]) -> None:
        path = self.path(k)
        if path is None:
            return
        q, f = [t.cpu() for t in q], [t.cpu() for t in f]
        if self.ranks is not None:
            parts = self.ranks.gather_objects((q, f), "gathering the chains for the checkpoint")
            if not self.ranks.is_main:
                return
            q, f = [t for part in parts for t in part[0]], [t for part in parts for t in part[1]]
        tensors = {f"q.{b}": t.contiguous() for b, t in enumerate(q)}
        tensors.update({f"f.{b}": t.contiguous() for b, t in enumerate(f)})
        write_atomic(path, lambda tmp: save_file(tensors, tmp))

    def load(self, k: int, batches: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        path = self.path(k)
        if path is None or not path.is_file():
            raise CheckpointError(
                f"the chains of finished layer {k} are missing ({path}); delete the checkpoint directory "
                f"{None if self.store is None else self.store.dir} to start over"
            )
        tensors = read_tensors(path, "delete it and the checkpoint to redo")
        part = self.part if self.part is not None else range(batches)
        return [tensors[f"q.{b}"] for b in part], [tensors[f"f.{b}"] for b in part]

    def drop(self, k: int) -> None:
        path = self.path(k)
        if path is not None and (self.ranks is None or self.ranks.is_main):
            path.unlink(missing_ok=True)


def quantize_blocks(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    calib: Any = None,
    *,
    blocks: str | None = None,
    checkpoint_dir: str | Path | None = None,
    inplace: bool = False,
    on_block_end: OnBlockEnd | None = None,
) -> nn.Module:
    """Quantize a decoder stack one decoder layer at a time (module docstring).

    Args:
        model: a causal LM (or any model with a list of decoder layers), float, in eval mode.
        recipe: as for `postquant.quantize`; weight-only RTN, SQuant or a learned-rounding method.
        calib: calibration batches of token ids, e.g. (n, seqlen) windows (`postquant.calib.text`); learned
            methods need it, RTN and SQuant do not use it.
        blocks: the dotted name of the decoder-layer list (default: found among `DECODER_LISTS`).
        checkpoint_dir: resume directory (default: ``learned.checkpoint_dir``); each finished layer is saved.
        inplace: quantize `model` itself (its layers become `QuantizedLayer`s; peak memory: the model plus one
            layer's float copy) instead of a copy built layer by layer.
        on_block_end: called as ``on_block_end(k, name)`` after layer k is finished (and checkpointed).

    Returns:
        The quantized model (eval mode), with its `QuantizationResult` (``postquant.result``).

    Raises:
        RecipeError: a recipe field the block path does not support.
        UnsupportedModelError: no decoder-layer list; an already quantized model.
        DataError: a learned method without calibration data.
    """
    start = time.perf_counter()
    recipe = Recipe.coerce(recipe)
    check_block_recipe(recipe)
    if quantized_layers(model):
        raise UnsupportedModelError(f"{type(model).__name__} is already quantized: pass the float model")
    model.eval()
    container, layers = decoder_layers(model, blocks)
    learned = is_learned(recipe)
    gptq = recipe.method is Method.GPTQ
    chained = learned or gptq  # methods that need each layer's inputs in the quantized model
    recipe, _ = prepare(model, recipe, None, None)  # learned presets' first/last-layer policy
    plan = make_plan(model, recipe)
    check_finite(model, list(plan))
    batches = None
    if chained:
        batches = as_calibration(calib, recipe.calib_size) if calib is not None else None
        if not batches:
            raise DataError(
                f"method '{recipe.method.value}' chooses the rounding from calibration data: pass calib=... "
                "(token windows, e.g. postquant.calib.text.random_windows)"
            )
        if not isinstance(batches, list):
            raise DataError("the block path takes calibration batches (tensors or dicts), not a forward loop")
    ranks = current()
    part: range | None = None  # with ranks: this rank's calibration batches
    if ranks is not None:
        check_same_inputs(ranks, recipe, model, batches)
        if batches is not None:
            shard(ranks, batches, sum(batch_size_of(b) for b in batches))  # too few samples: a DataError
            part = range(*shard_bounds(len(batches), ranks.world)[ranks.rank])
    cfg = learned_config(recipe) if learned else None
    if checkpoint_dir is None and cfg is not None:
        checkpoint_dir = cfg.checkpoint_dir
    names = [f"{container}.{i}" for i in range(len(layers))]
    units = [Unit(n, (n,), tuple(p for p in plan.weight_layers if p.startswith(n + "."))) for n in names]
    store = None
    if checkpoint_dir is not None:
        key = fingerprint(
            {
                "blockwise": recipe.model_dump(mode="json", exclude={"learned": set(BOOKKEEPING)}),
                "model": model_fingerprint(model),
                "data": data_fingerprint(batches) if batches is not None else None,
                "units": names,
            }
        )
        store = CheckpointStore(checkpoint_dir, key, names)
    chains = _Chains(store, ranks, part)
    done = set(store.finished()) if store is not None else set()
    if ranks is not None and store is not None:  # ranks that would resume different layers would wait forever
        ranks.check_consistent({"set of finished decoder layers (checkpoint_dir)": repr(sorted(done))})
    if done:
        log.info("resuming: %d of %d decoder layers already finished in %s", len(done), len(names), store.dir)

    qmodel = model if inplace else _skeleton_copy(model, layers)
    qlayers: nn.ModuleList = qmodel.get_submodule(container)
    report = ReconstructionReport()
    with no_kv_cache(model, qmodel):
        inputs: list[Captured] = []
        q_hidden: list[torch.Tensor] = []
        f_hidden: list[torch.Tensor] = []
        shard_of: Shard | None = None
        if chained and len(done) < len(names):
            inputs = _first_inputs(model, names[0], batches, part)  # type: ignore[arg-type]
            if part is not None:  # this rank's batches; the cache samples as one process's
                shard_of = _shard_of(inputs, part)
                inputs = inputs[part.start : part.stop]
            q_hidden = [c.args[0] for c in inputs]
            f_hidden = list(q_hidden)
        bar = progress_bar(
            range(len(names)), enabled=cfg.progress if cfg else True, desc="decoder layers", unit="layer"
        )
        for k in bar:
            unit = units[k]
            if inplace:  # the float layer is needed after its codes are chosen only by learned rounding
                teacher_layer = copy.deepcopy(layers[k]) if chained and k not in done else layers[k]
                teacher: nn.Module = _TeacherView(names[k], teacher_layer)
            else:
                qlayers[k] = copy.deepcopy(layers[k])
                teacher_layer, teacher = layers[k], model
            quantize_weights(qmodel, _sub_plan(plan, unit.layers), recipe, ranks=ranks)
            if k in done:
                state, outcome = store.load(k)  # type: ignore[union-attr]
                restore(qmodel, state)
                if outcome:
                    report.units.append(UnitOutcome(**outcome))
                report.resumed += 1
                if chained and k + 1 not in done and k + 1 < len(names):
                    q_hidden, f_hidden = chains.load(k, len(inputs))
                continue
            if gptq:
                _gptq_layer(qmodel, teacher_layer, names[k], unit.layers, recipe, inputs, q_hidden, ranks)
                with cached_weights(qlayers[k]):
                    q_hidden = _run_layer(qlayers[k], inputs, q_hidden)
                f_hidden = q_hidden  # GPTQ needs no float chain
                chains.save(k, q_hidden, f_hidden)
            if learned:
                # one decoder layer's dequantized weights, kept while it is learned and run
                with cached_weights(qlayers[k]):
                    assert cfg is not None
                    targets = _run_layer(teacher_layer, inputs, f_hidden)
                    if unit.layers:
                        data = _unit_data(inputs, q_hidden, f_hidden, targets, shard_of)
                        generator = torch.Generator().manual_seed(unit_seed(recipe.seed, k))
                        outcome = reconstruct_unit(
                            qmodel,
                            teacher,
                            unit,
                            data,
                            cfg,
                            generator,
                            desc=f"[{k + 1}/{len(names)}] {unit.name}",
                            ranks=ranks,
                        )
                        del data
                        report.units.append(outcome)
                        bar.set_postfix(loss=f"{outcome.error_after:.4g}", refresh=False)
                        log.info(
                            "layer %d/%d %s: %s, error %.4g -> %.4g, %.1f s",
                            k + 1, len(names), unit.name, outcome.status,
                            outcome.error_before, outcome.error_after, outcome.seconds,
                        )  # fmt: skip
                    q_hidden = _run_layer(qlayers[k], inputs, q_hidden)
                    f_hidden = targets
                    chains.save(k, q_hidden, f_hidden)
            if store is not None and (ranks is None or ranks.is_main):
                last = asdict(report.units[-1]) if learned and unit.layers else {}
                store.save(k, snapshot(qmodel, unit), last)
                chains.drop(k - 1)
            del teacher, teacher_layer
            if on_block_end is not None:
                on_block_end(k, names[k])
        bar.close()
    outside = [n for n in plan.weight_layers if not any(n.startswith(b + ".") for b in names)]
    if outside:
        log.info(
            "%d layers outside the decoder stack get data-free codes: %s", len(outside), ", ".join(outside)
        )
        quantize_weights(qmodel, _sub_plan(plan, tuple(outside)), recipe, ranks=ranks)
    report.seconds = time.perf_counter() - start
    qmodel.eval()
    attach_result(
        qmodel,
        QuantizationResult(recipe, plan, {"blocks": report.seconds}, None, report if learned else None),
    )
    if ranks is not None:
        qmodel = agree_model(ranks, qmodel)
    log.info("quantized %d decoder layers block by block in %.1f s", len(names), report.seconds)
    return qmodel


def _sub_plan(plan: Plan, names: tuple[str, ...]) -> Plan:
    """The plan restricted to `names` (its layers' bits and sources as they were)."""
    return Plan(plan[n] for n in names)
