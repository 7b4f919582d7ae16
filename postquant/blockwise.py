"""Block-sequential quantization of decoder stacks (causal LMs) in bounded memory: one decoder layer at a time.

`quantize` keeps the whole float model as the teacher of learned rounding beside the quantized copy and
caches every unit from model prefixes. For a decoder stack (``model.layers``, GPT-2's ``transformer.h``, ...)
`quantize_blocks` instead walks the layers in order (llm-compressor's sequential pipeline, GPTQ's
layer-by-layer loop):

1. the inputs of decoder layer 0 are captured once per calibration batch (embeddings; the rotary tables,
   masks and flags the model passes to every layer are kept as they came);
2. for layer k: its float weights are the teacher (the caller's model is not touched; with
   ``inplace=True`` a copy of that one layer's modules that shares its tensors), its planned Linears get codes by the recipe's
   rounding, and learned rounding reconstructs its output with the existing unit loop
   (`postquant.reconstruct.loop.reconstruct_unit`) from two chains: the *quantized* chain (layer k's input
   in the quantized model: quantized-input propagation, BRECQ/QDrop) and the float chain (the teacher's
   input, whose output is the target and QDrop's float input);
3. layer k's outputs become layer k+1's inputs in both chains, and the teacher is released.

Nothing copies the whole model: the quantized model is built from a copy of everything *but* the decoder
layers, then one layer copy at a time (``inplace=True`` skips even that). `quantize_checkpoint` does not
even load the model: it builds it on the ``meta`` device from a Hugging Face directory, loads what lies
outside the decoder layers, and loads each layer's float weights from the safetensors shards when its turn
comes (`postquant.model.lazy`); then the same walk runs in place. With a checkpoint directory, each
finished layer's state (codes, steps, biases) and both chains are saved, so a killed run resumes at the next
layer and ends with the same codes, bit for bit, as an uninterrupted one.

RTN and SQuant are per-layer and data-free: the same walk runs without calibration data or chains, and
gives exactly the codes `quantize` gives. Mixed precision (``mixed``) allocates the bits before the walk, on
the float model `quantize_blocks` holds, exactly as `quantize` does (same importance table, same allocation);
`quantize_checkpoint`, which never holds the float model whole, does not take it. Dynamic per-token input
quantization (``act_ranges: dynamic``) needs no calibration: each layer's `DynamicActQuantizer` is installed
with its codes' grid, before the codes are chosen, so learned rounding reconstructs with quantized inputs
(straight-through) and the quantized chain carries them; GPTQ takes each Linear's Hessian from its
*quantized* input (``Q(x) Q(x)^T`` of the float decoder layer run on the quantized chain), the inputs the
layer will see. Not here (use `quantize`): static activation ranges, the power grid's output-error search,
loss='output' / Fisher weights and augmentation. Layers outside the decoder stack that the plan quantizes (``lm_head`` unless ignored) get the
recipe's data-free codes (nearest for learned methods). The chains (``n x seqlen x hidden`` each) stay in memory up to
``chain_bytes`` together and are memory-mapped files beyond (`postquant.reconstruct.chains`).

In a torch.distributed process group (`postquant.distributed`), each rank carries the chains of its contiguous
shard of the calibration batches (kept per batch); GPTQ sums the ranks' Hessians and splits the solves,
learned rounding draws one process's batch from the sharded cache and sums the gradients, RTN/SQuant split
the layers, rank 0 writes the checkpoints, and every rank ends with the same model (docs/distributed.md).
`quantize_checkpoint` is single-process for now.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from postquant.calib import as_calibration
from postquant.calib.act_ranges import check_dynamic_layers, dynamic_input_bits, install_dynamic
from postquant.calib.data import batch_size_of, run_model, spread_batches
from postquant.choices import ActRanges, GridKind, Method, PowerSearch
from postquant.distributed import Ranks, current, shard, shard_bounds
from postquant.errors import DataError, RecipeError, UnsupportedModelError
from postquant.eval.run import main_output
from postquant.mixed.apply import MixedResult, apply_mixed
from postquant.model.blocks import Unit
from postquant.model.hf import no_kv_cache
from postquant.model.lazy import LazyCheckpoint
from postquant.model.walk import quantized_layers
from postquant.nn import cached_weights
from postquant.nn.layer import upcast_half
from postquant.outcome import QuantizationResult, attach_result
from postquant.pipeline import agree_model, check_same_inputs
from postquant.plan import Plan, Source, check_finite, make_plan
from postquant.progress import progress_bar
from postquant.recipe import Recipe
from postquant.reconstruct.cache import Record, Shard, UnitData, concat_rows, mergeable
from postquant.reconstruct.capture import Captured, _StopForward, capture
from postquant.reconstruct.chains import DEFAULT_CHAIN_BYTES, Chain, ChainCheckpoint, ChainMemory
from postquant.reconstruct.checkpoint import CheckpointStore, data_fingerprint, model_fingerprint, unit_seed
from postquant.reconstruct.config import BOOKKEEPING, Loss
from postquant.reconstruct.engine import ReconstructionReport, prepare
from postquant.reconstruct.loop import UnitOutcome, reconstruct_unit, restore, snapshot
from postquant.reconstruct.presets import is_learned, learned_config
from postquant.rounding.gptq import HessianAccumulator
from postquant.store.files import fingerprint
from postquant.weights import quantize_weights, reduce_hessians, solve_gptq

__all__ = ["DECODER_LISTS", "check_block_recipe", "decoder_layers", "quantize_blocks", "quantize_checkpoint"]

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


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to open by None (Windows)
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


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
    if recipe.a_bits is not None and recipe.act_ranges is not ActRanges.DYNAMIC:
        problems.append(
            f"static activation ranges (a_bits with act_ranges {recipe.act_ranges.value}; act_ranges: dynamic "
            "needs no calibration and runs here)"
        )
    if recipe.embeddings is not None:
        problems.append("quantized embeddings (embeddings)")
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


def _shard_of(inputs: list[Captured], parts: list[range], rank: int) -> Shard:
    """Where rank `rank`, holding batches ``parts[rank]`` of `inputs` (``parts``: every rank's), sits in the
    cache one process builds (`Shard`): one merged record when one process's `UnitData.merge` concatenates
    the batches, else one per batch."""
    sizes = [c.args[0].shape[0] for c in inputs]
    trailing = [tuple(c.args[0].shape[1:]) for c in inputs]
    part = parts[rank]
    if len(inputs) > 1 and mergeable(inputs, sizes):
        spans = tuple((sum(sizes[: p.start]), sum(sizes[: p.stop])) for p in parts)
        start, stop = spans[rank]
        return Shard((sum(sizes),), ((0, start, stop) if stop > start else None,), (trailing[0],), (spans,))
    held = tuple((b - part.start, 0, sizes[b]) if b in part else None for b in range(len(inputs)))
    spans_per_batch = tuple(
        tuple((0, sizes[b]) if b in p else (0, 0) for p in parts) for b in range(len(inputs))
    )
    return Shard(tuple(sizes), held, tuple(trailing), spans_per_batch)


@torch.no_grad()
def _run_layer(
    layer: nn.Module, inputs: list[Captured], hidden: Chain, memory: ChainMemory | None
) -> Chain | None:
    """`layer` on each batch's captured arguments with the hidden states replaced by the chain `hidden`; the
    outputs as a new chain in `memory` (None: not kept)."""
    device = next(layer.parameters(), torch.empty(0)).device
    out = memory.chain(hidden.sizes, hidden.whole is not None) if memory is not None else None
    for b, (c, h) in enumerate(zip(inputs, hidden.batches(), strict=True)):
        y = main_output(layer(h.to(device), *c.args[1:], **c.kwargs)).detach()
        if out is not None:
            out.put(b, y)
    return out


def _sharing_copy(layer: nn.Module) -> nn.Module:
    """A copy of `layer`'s modules that shares its parameters and buffers (no tensor is copied): the float
    teacher that stays when `layer`'s Linears are replaced by quantized ones in place."""
    memo: dict[int, Any] = {id(t): t for t in (*layer.parameters(), *layer.buffers())}
    return copy.deepcopy(layer, memo)


def _gptq_layer(
    qmodel: nn.Module,
    float_layer: nn.Module,
    prefix: str,
    layer_names: tuple[str, ...],
    recipe: Recipe,
    inputs: list[Captured],
    hidden: Chain,
    ranks: Ranks | None = None,
) -> None:
    """GPTQ codes for the planned layers of one decoder layer, installed in `qmodel`: their Hessians come from
    one pass of the float decoder layer over the quantized chain's inputs (GPTQ's per-block form), each
    Linear's input through the input quantizer its quantized layer has (dynamic per-token ones), if any.

    With `ranks`, `inputs` and `hidden` are this rank's shard of the batches: the Hessians are summed over the
    ranks in one all-reduce (`reduce_hessians`) and each rank solves a share of the layers (`solve_gptq`)."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    for name in layer_names:
        sub = float_layer.get_submodule(name[len(prefix) + 1 :])
        acc = accs[name] = HessianAccumulator(sub)
        quant = qmodel.get_submodule(name).act_quant or nn.Identity()  # the input the quantized layer sees
        handles.append(
            sub.register_forward_pre_hook(lambda _m, args, acc=acc, q=quant: acc.add(upcast_half(q(args[0]))))
        )
    try:
        with torch.no_grad():
            _run_layer(float_layer, inputs, hidden, None)
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
    merged: Captured | None,
    q: Chain,
    f: Chain,
    targets: Chain,
    shard_of: Shard | None = None,
) -> UnitData:
    """The unit's records: one record of all samples whose tensors are the chains themselves when the batches
    share their shapes (what `UnitData.merge` makes, without a copy), else one record per batch, merged.

    `shard_of`: this rank holds those batches of one process's cache (its chains are kept per batch; merged
    only where one process's merges)."""
    if merged is not None and q.whole is not None and f.whole is not None and targets.whole is not None:
        rest = merged.args[1:]
        n = sum(q.sizes)
        record = Record(
            n,
            Captured((q.whole, *rest), merged.kwargs),
            Captured((f.whole, *rest), merged.kwargs),
            targets.whole,
        )
        return UnitData([record], list(q.sizes))
    data = UnitData(shard=shard_of)
    for c, hq, hf, t in zip(inputs, q.batches(), f.batches(), targets.batches(), strict=True):
        n = hq.shape[0]
        rest = c.args[1:]
        data.records.append(Record(n, Captured((hq, *rest), c.kwargs), Captured((hf, *rest), c.kwargs), t))
        data.sizes.append(n)
    if shard_of is None or len(shard_of.sizes) == 1:
        data.merge()
    return data


def _start_chains(
    model: nn.Module,
    first: str,
    batches: list[Any],
    memory: ChainMemory,
    live: int,
    parts: list[range] | None,
    rank: int,
) -> tuple[list[Captured], Chain, Captured | None, Shard | None]:
    """Layer 0's call arguments without the hidden states, its hidden states as a chain, the arguments
    merged over all batches (None when the batches differ in shape: the chain is then kept per batch), and,
    with `parts` (every rank's batches), where rank `rank`'s sit in one process's cache.

    With `parts` the chain holds only rank `rank`'s batches, one tensor each (never one tensor of all samples); the
    other batches' hidden states are the placeholders of `_first_inputs`, used to find the `Shard` and
    dropped, never stored in a chain."""
    part = parts[rank] if parts is not None else None
    captured = _first_inputs(model, first, batches, part)
    shard_of = None
    if parts is not None and part is not None:
        shard_of = _shard_of(captured, parts, rank)
        captured = captured[part.start : part.stop]
    hidden = [c.args[0] for c in captured]
    inputs = [Captured((None, *c.args[1:]), c.kwargs) for c in captured]
    del captured
    sizes = [h.shape[0] for h in hidden]
    merged = None
    if part is None and all(
        h.shape[1:] == hidden[0].shape[1:] and h.dtype == hidden[0].dtype for h in hidden
    ):
        with contextlib.suppress(ValueError):  # arguments that differ across batches: kept per batch
            merged = concat_rows(inputs, sizes)
    memory.plan(sum(h.numel() * h.element_size() for h in hidden), live)
    chain = memory.chain(sizes, whole=merged is not None)
    for b, h in enumerate(hidden):
        chain.put(b, h)
    return inputs, chain, merged, shard_of


@dataclass
class _Source:
    """Where the walk finds each float decoder layer and puts the quantized one."""

    model: nn.Module  # the float model (a checkpoint's: decoder layers on meta until fetched)
    qmodel: nn.Module  # the model that receives the quantized layers (`model` itself when `inplace`)
    container: str  # dotted name of the decoder-layer list
    inplace: bool
    fingerprint: Callable[[], str]  # of the float weights (for the resume key)
    fetch: Callable[[int], None] | None = None  # loads layer k's float weights into `model`


def quantize_blocks(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    calib: Any = None,
    *,
    blocks: str | None = None,
    checkpoint_dir: str | Path | None = None,
    inplace: bool = False,
    on_block_end: OnBlockEnd | None = None,
    chain_bytes: int = DEFAULT_CHAIN_BYTES,
    spill_dir: str | Path | None = None,
) -> nn.Module:
    """Quantize a decoder stack one decoder layer at a time (module docstring).

    Args:
        model: a causal LM (or any model with a list of decoder layers), float, in eval mode.
        recipe: as for `postquant.quantize`; RTN, SQuant, GPTQ or a learned-rounding method, weight-only or
            with dynamic per-token inputs (``act_ranges: dynamic``; static ranges are refused).
        calib: calibration batches of token ids, e.g. (n, seqlen) windows (`postquant.calib.text`); learned
            methods need it, RTN and SQuant do not use it.
        blocks: the dotted name of the decoder-layer list (default: found among `DECODER_LISTS`).
        checkpoint_dir: resume directory (default: ``learned.checkpoint_dir``); each finished layer is saved.
        inplace: quantize `model` itself (its layers become `QuantizedLayer`s; peak memory: the model) instead
            of a copy built layer by layer.
        on_block_end: called as ``on_block_end(k, name)`` after layer k is finished (and checkpointed).
        chain_bytes: the activation chains alive at once (both chains' inputs and outputs of one layer) are
            kept in memory up to this many bytes together; beyond, each is a memory-mapped file.
        spill_dir: where those files go (default: a temporary folder); they are removed with the chains.

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
    recipe, _ = prepare(model, recipe, None, None)  # learned presets' first/last-layer policy
    plan = make_plan(model, recipe)
    check_finite(model, list(plan))
    check_dynamic_layers({n: model.get_submodule(n) for n in dynamic_input_bits(recipe, plan)})
    ranks = current()
    mixed = None
    if recipe.mixed is not None:  # bits per layer first, from the whole float model (as `quantize`)
        batches = as_calibration(calib, recipe.calib_size) if calib is not None else None  # as `quantize`
        recipe, mixed = apply_mixed(model, recipe, plan, batches, None, ranks)
        plan = plan.with_w_bits({row.name: row.bits for row in mixed.layers if not row.fixed}, Source.MIXED)
    qmodel = model if inplace else _skeleton_copy(model, layers)
    source = _Source(model, qmodel, container, inplace, lambda: model_fingerprint(model))
    memory = ChainMemory(chain_bytes, spill_dir)
    return _walk(source, recipe, plan, calib, memory, checkpoint_dir, on_block_end, start, ranks, mixed)


def quantize_checkpoint(
    path: str | Path,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    calib: Any = None,
    *,
    blocks: str | None = None,
    checkpoint_dir: str | Path | None = None,
    on_block_end: OnBlockEnd | None = None,
    chain_bytes: int = DEFAULT_CHAIN_BYTES,
    spill_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Quantize the causal LM saved in a Hugging Face directory without ever holding it whole in float.

    The model is built from ``config.json`` on the ``meta`` device; the parameters outside the decoder layers
    (embeddings, final norm, ``lm_head``) are loaded from the safetensors shards, and each decoder layer's
    float weights are loaded (in their stored dtype) when its turn comes, quantized, and released: the walk
    of `quantize_blocks` with ``inplace=True`` on that skeleton, the same codes bit for bit. Peak memory is the
    non-decoder parameters, the quantized codes of the finished layers, one decoder layer in float (plus what
    its method needs to learn it) and the activation chains (at most `chain_bytes` in memory).

    Args:
        path: the directory ``save_pretrained(..., safe_serialization=True)`` wrote (``config.json`` and
            ``model.safetensors`` or a sharded ``model.safetensors.index.json``).
        recipe, calib, blocks, checkpoint_dir, on_block_end, chain_bytes, spill_dir: as for `quantize_blocks`
            (a resume is keyed on the shards' bytes).
        trust_remote_code: passed to transformers for architectures defined in the directory.

    Returns:
        The quantized model (eval mode), with its `QuantizationResult` (``postquant.result``).

    Raises:
        DataError: not a model directory, no safetensors weights, or a parameter the shards do not hold.
        RecipeError, UnsupportedModelError: as for `quantize_blocks`; UnsupportedModelError also in a
            torch.distributed process group (single-process for now).
    """
    start = time.perf_counter()
    ranks = current()
    if ranks is not None:
        raise UnsupportedModelError(
            f"quantize_checkpoint runs in one process for now, not in a torch.distributed process group of "
            f"{ranks.world} ranks: run it without torchrun, or load the model and call quantize_blocks, which "
            "splits the work over the ranks"
        )
    recipe = Recipe.coerce(recipe)
    check_block_recipe(recipe)
    if recipe.mixed is not None:
        raise RecipeError(
            "quantize_checkpoint loads one decoder layer at a time, and mixed precision allocates the bits from "
            "every layer's weights at once: load the model and call quantize_blocks (or quantize), or drop mixed"
        )
    checkpoint = LazyCheckpoint(path)
    model = checkpoint.empty_model(trust_remote_code)
    checkpoint.check_complete(model)  # before any work, not when the layer's turn comes
    container, _ = decoder_layers(model, blocks)
    checkpoint.materialize(model, "", skip=(container + ".",))
    recipe, _ = prepare(model, recipe, None, None)
    plan = make_plan(model, recipe)
    check_finite(model, [n for n in plan if not n.startswith(container + ".")])  # the rest as they load
    check_dynamic_layers(
        {n: model.get_submodule(n) for n in dynamic_input_bits(recipe, plan)}
    )  # meta modules
    source = _Source(
        model,
        model,
        container,
        True,
        checkpoint.fingerprint,
        lambda k: checkpoint.materialize(model, f"{container}.{k}"),
    )
    memory = ChainMemory(chain_bytes, spill_dir)
    return _walk(source, recipe, plan, calib, memory, checkpoint_dir, on_block_end, start)


def _walk(
    src: _Source,
    recipe: Recipe,
    plan: Plan,
    calib: Any,
    memory: ChainMemory,
    checkpoint_dir: str | Path | None,
    on_block_end: OnBlockEnd | None,
    start: float,
    ranks: Ranks | None = None,
    mixed: MixedResult | None = None,
) -> nn.Module:
    """The one walk over the decoder layers behind `quantize_blocks` and `quantize_checkpoint`; with `ranks`,
    this rank's shard of the calibration batches (module docstring)."""
    model, qmodel = src.model, src.qmodel
    layers: nn.ModuleList = model.get_submodule(src.container)
    learned = is_learned(recipe)
    gptq = recipe.method is Method.GPTQ
    chained = learned or gptq  # methods that need each layer's inputs in the quantized model
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
        max_samples = learned_config(recipe).max_samples if learned else None
        if max_samples is not None:  # as `reconstruct_model`: whole batches spread over the set
            batches = spread_batches(batches, max_samples)
    part: range | None = None  # with ranks: this rank's calibration batches (of every rank's `parts`)
    parts: list[range] | None = None
    if ranks is not None:
        check_same_inputs(ranks, recipe, model, batches)
        if batches is not None:
            shard(ranks, batches, sum(batch_size_of(b) for b in batches))  # too few samples: a DataError
            parts = [range(*bounds) for bounds in shard_bounds(len(batches), ranks.world)]
            part = parts[ranks.rank]
    cfg = learned_config(recipe) if learned else None
    if checkpoint_dir is None and cfg is not None:
        checkpoint_dir = cfg.checkpoint_dir
    names = [f"{src.container}.{i}" for i in range(len(layers))]
    units = [Unit(n, (n,), tuple(p for p in plan.weight_layers if p.startswith(n + "."))) for n in names]
    store = None
    if checkpoint_dir is not None:
        key = fingerprint(
            {
                "blockwise": recipe.model_dump(mode="json", exclude={"learned": set(BOOKKEEPING)}),
                "model": src.fingerprint(),
                "data": data_fingerprint(batches) if batches is not None else None,
                "units": names,
            }
        )
        store = CheckpointStore(checkpoint_dir, key, names)
    chains = ChainCheckpoint(store.dir if store is not None else None, ranks, part)
    done = set(store.finished()) if store is not None else set()
    if ranks is not None and store is not None:  # ranks that would resume different layers would wait forever
        ranks.check_consistent({"set of finished decoder layers (checkpoint_dir)": repr(sorted(done))})
    if done:
        log.info("resuming: %d of %d decoder layers already finished in %s", len(done), len(names), store.dir)

    qlayers: nn.ModuleList = qmodel.get_submodule(src.container)
    report = ReconstructionReport()
    with no_kv_cache(model, qmodel), contextlib.closing(memory):
        inputs: list[Captured] = []
        merged: Captured | None = None
        q: Chain | None = None
        f: Chain | None = None
        shard_of: Shard | None = None
        if chained and len(done) < len(names):
            live = 4 if learned else 2  # chains alive at once: inputs and outputs (both chains if learned)
            inputs, q, merged, shard_of = _start_chains(
                model, names[0], batches, memory, live, parts, ranks.rank if ranks else 0
            )
            f = q
        bar = progress_bar(
            range(len(names)), enabled=cfg.progress if cfg else True, desc="decoder layers", unit="layer"
        )
        for k in bar:
            unit = units[k]
            if src.fetch is not None:
                src.fetch(k)
                check_finite(model, list(unit.layers))
            if src.inplace:  # the float layer is needed after its codes are chosen only by chained methods
                teacher_layer = _sharing_copy(layers[k]) if chained and k not in done else layers[k]
                teacher: nn.Module = _TeacherView(names[k], teacher_layer)
            else:
                qlayers[k] = copy.deepcopy(layers[k])
                teacher_layer, teacher = layers[k], model
            _quantize_block(qmodel, _sub_plan(plan, unit.layers), recipe, ranks)
            if k in done:
                state, outcome = store.load(k)  # type: ignore[union-attr]
                restore(qmodel, state)
                if outcome:
                    report.units.append(UnitOutcome(**outcome))
                report.resumed += 1
                if chained and k + 1 not in done and k + 1 < len(names):
                    assert q is not None
                    q, f = chains.load(k, memory, q.sizes, merged is not None)
                continue
            if gptq:
                _gptq_layer(qmodel, teacher_layer, names[k], unit.layers, recipe, inputs, q, ranks)  # type: ignore[arg-type]
                with cached_weights(qlayers[k]):
                    q = _run_layer(qlayers[k], inputs, q, memory)  # type: ignore[arg-type]
                f = q  # GPTQ needs no float chain
                chains.save(k, q, f)  # type: ignore[arg-type]
            if learned:
                # one decoder layer's dequantized weights, kept while it is learned and run
                with cached_weights(qlayers[k]):
                    assert cfg is not None and q is not None and f is not None
                    targets = _run_layer(teacher_layer, inputs, f, memory)
                    assert targets is not None
                    if unit.layers:
                        data = _unit_data(inputs, merged, q, f, targets, shard_of)
                        generator = torch.Generator().manual_seed(unit_seed(recipe.seed, k))
                        outcome = reconstruct_unit(
                            qmodel,
                            teacher,
                            unit,
                            data,
                            cfg,
                            generator,
                            desc=f"[{k + 1}/{len(names)}] {unit.name}",
                            squant_mode=recipe.squant_mode,
                            ranks=ranks,
                            symmetric=recipe.symmetric,
                        )
                        del data
                        report.units.append(outcome)
                        bar.set_postfix(loss=f"{outcome.error_after:.4g}", refresh=False)
                        log.info(
                            "layer %d/%d %s: %s, error %.4g -> %.4g, %.1f s",
                            k + 1, len(names), unit.name, outcome.status,
                            outcome.error_before, outcome.error_after, outcome.seconds,
                        )  # fmt: skip
                    q = _run_layer(qlayers[k], inputs, q, memory)
                    f = targets
                    chains.save(k, q, f)  # type: ignore[arg-type]
            if store is not None and (ranks is None or ranks.is_main):
                last = asdict(report.units[-1]) if learned and unit.layers else {}
                store.save(k, snapshot(qmodel, unit), last)
                chains.drop(k - 1)
            del teacher, teacher_layer
            _return_free_memory()
            if on_block_end is not None:
                on_block_end(k, names[k])
        bar.close()
    outside = [n for n in plan.weight_layers if not any(n.startswith(b + ".") for b in names)]
    if outside:
        log.info(
            "%d layers outside the decoder stack get data-free codes: %s", len(outside), ", ".join(outside)
        )
        _quantize_block(qmodel, _sub_plan(plan, tuple(outside)), recipe, ranks)
    report.seconds = time.perf_counter() - start
    qmodel.eval()
    attach_result(
        qmodel,
        QuantizationResult(
            recipe,
            plan,
            {"blocks": report.seconds},
            mixed,
            report if learned else None,
            act_ranges=ActRanges.DYNAMIC if dynamic_input_bits(recipe, plan) else None,
        ),
    )
    if ranks is not None:
        qmodel = agree_model(ranks, qmodel)
    log.info("quantized %d decoder layers block by block in %.1f s", len(names), report.seconds)
    return qmodel


def _return_free_memory() -> None:
    """Hand the heap memory freed with a layer's float weights back to the system (glibc's ``malloc_trim``).

    Without it glibc keeps the freed blocks of each layer (its mmap threshold rises after the first large
    free, so later weights come from the heap, between long-lived allocations) and the resident memory grows
    by most of a layer's float bytes per layer. Elsewhere (no glibc) nothing is done.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _quantize_block(qmodel: nn.Module, plan: Plan, recipe: Recipe, ranks: Ranks | None) -> None:
    """The planned layers of `qmodel` to the recipe's data-free codes, with their dynamic input quantizers."""
    done = quantize_weights(qmodel, plan, recipe, ranks=ranks)
    install_dynamic(done, dynamic_input_bits(recipe, plan))


def _sub_plan(plan: Plan, names: tuple[str, ...]) -> Plan:
    """The plan restricted to `names` (its layers' bits and sources as they were)."""
    return Plan(plan[n] for n in names)
