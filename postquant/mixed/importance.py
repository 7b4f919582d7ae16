"""Importance: per layer and bit width, the predicted damage of quantizing that layer alone.

Every measure returns a table ``cost[layer][bits]`` (non-negative floats) for `postquant.mixed.allocate`.
``Q_b(W)`` is the layer's weight quantized exactly as `postquant.quantize` will do it: the recipe's grid
(`fit_weight_grid`, the one place to switch grids) and its rounding (`postquant.weights.weight_codes`: nearest,
or SQuant's flips; learned methods are measured with nearest rounding, their starting point).

* ``loss``: the distance of the model's output to the float model's when only that layer is quantized at b
  bits, on a calibration subset (one forward per layer and bit width). The distance is the KL divergence
  ``KL(p_float || p_quant)`` for 2-D outputs (class logits) and the mean squared error otherwise (embeddings,
  padding tokens masked out). Calibration batches carry no labels (`postquant.calib` drops them), so a
  label-free distance is the only sound choice; it is also zero at the float model.
* ``taylor``: first-order Taylor score ``sum |g| * |W - Q_b(W)|`` (Molchanov et al. 2019), with ``|g|`` the
  mean absolute gradient over calibration batches.
* ``fisher``: ``1/2 sum F * (W - Q_b(W))^2`` with the diagonal Fisher ``F`` (second-order term of the loss
  change, as in HAWQ/BRECQ's Fisher approximation).
  Both need gradients of a loss, but the distance to the float output has zero gradient at the float model
  and there are no labels. The Fisher trick: sample the targets from the model's own predictive distribution
  (classes ``y ~ softmax(logits)``; embeddings ``t ~ N(f(x), I)``) and back-propagate the negative
  log-likelihood. ``E[g g^T]`` is then the true Fisher, and the squared gradient of a batch is an unbiased
  estimate of the sum of its samples' diagonal Fisher (the per-sample gradients have mean zero).
* ``datafree`` (no data, for SQuant): the relative noise power of the BatchNorm-folded weight per output
  channel, ``mean_c ||W_c - Q_b(W)_c||^2 / ||W_c||^2``. For inputs with uncorrelated features this is the
  noise-to-signal ratio of the layer's output channels (BN-folded channels feed the next layer on an equal
  footing, so they are averaged rather than weighted by their energy: a per-tensor grid stretched by one
  large channel ruins the small ones), and under independent noise propagation the model output's
  noise-to-signal ratio is about the sum of the layers'. It is not scaled by the layer's size: the budget
  already charges large layers more, and a small depthwise layer is no less sensitive for being small.

In a torch.distributed process group (`postquant.distributed`) the measures are split over the ranks and every
rank ends with the same table: ``loss`` splits the layers (each rank measures whole rows on all the batches,
as one process does, and the rows are all-gathered: the table of one process, bit for bit); ``taylor`` and
``fisher`` split the batches (each rank back-propagates its contiguous shard, the gradient sums are
all-reduced: one process's up to float32 summation order) and then the layers' scores.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from postquant.calib.data import batch_size_of, collect_batches
from postquant.distributed import Ranks, shard, shard_bounds, split_work
from postquant.errors import DataError
from postquant.eval.run import run_model, token_mask
from postquant.grids import Grid
from postquant.mixed.cache import WAIT, ImportanceCache
from postquant.mixed.config import Importance
from postquant.nn.layer import upcast_half
from postquant.progress import progress_bar
from postquant.recipe import Recipe
from postquant.reconstruct.checkpoint import data_fingerprint, model_fingerprint
from postquant.weights import weight_codes

__all__ = [
    "CostTable",
    "batch_distance",
    "datafree_cost",
    "fisher_cost",
    "fit_weight_grid",
    "gradient_moments",
    "importance_table",
    "loss_costs",
    "output_distance",
    "quantized_weight",
    "target_generator",
    "taylor_cost",
]

log = logging.getLogger(__name__)

CostTable = dict[str, dict[int, float]]  # layer -> bits -> predicted damage
LayerGrids = Mapping[str, Mapping[int, Grid]]  # layer -> bits -> its fitted weight grid


def _grid(grids: LayerGrids | None, name: str, bits: int) -> Grid | None:
    return None if grids is None else grids.get(name, {}).get(bits)


# ----------------------------------------------------------------------------------- the quantizer Q_b


def fit_weight_grid(
    w: torch.Tensor, bits: int, recipe: Recipe, importance: torch.Tensor | None = None
) -> Grid:
    """The grid the recipe gives a weight at `bits` bits: exactly what `quantize` installs (given the same
    power-search `importance`)."""
    return recipe.weight_grid(upcast_half(w), bits, importance)


def quantized_weight(w: torch.Tensor, bits: int, recipe: Recipe, grid: Grid | None = None) -> torch.Tensor:
    """``Q_b(W)``: the dequantized weight with the recipe's grid and rounding method (same shape as `w`).

    `grid`: the grid `fit_weight_grid` gives `w` at `bits`, when the caller already has it (a power grid's
    exponent search is the costly part).
    """

    w = upcast_half(w)
    grid = grid if grid is not None else fit_weight_grid(w, bits, recipe)
    codes = weight_codes(recipe.method, grid.to_int(w), grid.qmin, grid.qmax, recipe)
    return grid.dequantize(codes)


# ----------------------------------------------------------------------------------- pure cost formulas


def datafree_cost(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean relative noise power of the output channels, ``mean_c ||W_c - W_hat_c||^2 / ||W_c||^2``.

    All-zero channels (pruned or dead) count as noise-free.
    """
    energy = w.double().reshape(w.shape[0], -1).pow(2).sum(1)  # (OC,)
    noise = (w - w_hat).double().reshape(w.shape[0], -1).pow(2).sum(1)  # (OC,)
    ratio = torch.where(energy > 0, noise / energy.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return float(ratio.mean())


def taylor_cost(grad_abs: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """First-order Taylor score ``sum |g| * |W - W_hat|``."""
    return float((grad_abs.double() * (w - w_hat).double().abs()).sum())


def fisher_cost(fisher: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Second-order (diagonal Fisher) score ``1/2 sum F * (W - W_hat)^2``."""
    return 0.5 * float((fisher.double() * (w - w_hat).double().pow(2)).sum())


# ----------------------------------------------------------------------------------- output distances


def batch_distance(out: torch.Tensor, ref: torch.Tensor, batch: Any) -> torch.Tensor:
    """`output_distance` of one batch's outputs, leaving out its padding tokens (`token_mask`)."""
    mask = token_mask(batch, ref)
    return output_distance(out, ref, None if mask is None else mask.to(ref.dtype).unsqueeze(-1))


def output_distance(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed distance over the batch's samples: KL(softmax(ref) || softmax(out)) for 2-D outputs (logits),
    else the squared error averaged over each sample's (unmasked) elements. Computed in float64: the
    distances of 8-bit layers are far below float32's resolution of the logits."""
    out, ref = out.double(), ref.double()
    mask = None if mask is None else mask.double()
    if out.dim() == 2:
        logp, logq = torch.log_softmax(ref, dim=-1), torch.log_softmax(out, dim=-1)
        return (logp.exp() * (logp - logq)).sum()
    err = (out - ref).pow(2)
    if mask is not None:  # (N, T, H) * (N, T, 1)
        per_sample = (err * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * out.shape[-1]).clamp(min=1)
        return per_sample.sum()
    return err.flatten(1).mean(1).sum()


# ----------------------------------------------------------------------------------- measured: loss


@torch.no_grad()
def loss_costs(
    model: nn.Module,
    layers: Sequence[str],
    bit_choices: Sequence[int],
    recipe: Recipe,
    batches: list[Any],
    grids: LayerGrids | None = None,
    progress: bool = True,
    cache: ImportanceCache | None = None,
    ranks: Ranks | None = None,
) -> CostTable:
    """``cost[l][b]``: mean output distance to the float model with only layer `l` quantized at `b` bits.

    The layer's weight is swapped in place and restored, so `model` is unchanged on return. This is one
    forward pass of the calibration batches per layer and bit width, so `progress` shows a bar over layers.
    `cache`: rows already measured are taken from it, each new row is saved to it as soon as measured, and
    processes measuring the same table at once split its layers (`ImportanceCache.next_layer`).
    `ranks`: the process group; its ranks split the layers (`_measure_split`; `cache` on rank 0 only).
    """
    if ranks is not None:
        return _measure_split(model, layers, bit_choices, recipe, batches, grids, progress, cache, ranks)
    if cache is not None and all(cache.row(name, bit_choices) is not None for name in layers):
        return {name: cache.row(name, bit_choices) for name in layers}  # type: ignore[misc]
    measure = _row_measurer(model, bit_choices, recipe, batches, grids)
    bar = progress_bar(total=len(layers), enabled=progress, desc="loss importance", unit="layer", leave=False)
    with bar:
        if cache is None:
            table = {}
            for name in layers:
                table[name] = measure(name)
                bar.update()
            return table
        try:
            while (name := cache.next_layer(layers, bit_choices)) is not None:
                if name == WAIT:  # the layers left are being measured by another process
                    cache.wait()
                else:
                    cache.record({name: measure(name)})
                bar.n = sum(cache.row(n_, bit_choices) is not None for n_ in layers)
                bar.refresh()
        finally:
            cache.release()
    return {name: cache.row(name, bit_choices) for name in layers}  # type: ignore[misc]


def _row_measurer(
    model: nn.Module,
    bit_choices: Sequence[int],
    recipe: Recipe,
    batches: list[Any],
    grids: LayerGrids | None,
) -> Callable[[str], dict[int, float]]:
    """``measure(layer) -> {bits: cost}`` of `loss_costs` (the float outputs of `batches` computed now)."""
    refs = [run_model(model, batch) for batch in batches]
    n = sum(batch_size_of(batch) for batch in batches)

    def measure(name: str) -> dict[int, float]:
        weight = model.get_submodule(name).weight
        original = weight.detach().clone()
        row: dict[int, float] = {}
        try:
            for bits in bit_choices:
                weight.copy_(quantized_weight(original, bits, recipe, _grid(grids, name, bits)))
                dist = sum(
                    float(batch_distance(run_model(model, b), r, b))
                    for b, r in zip(batches, refs, strict=True)
                )
                row[bits] = max(dist / n, 0.0)
        finally:
            weight.copy_(original)
        log.debug("loss importance %s: %s", name, row)
        return row

    return measure


def _measure_split(
    model: nn.Module,
    layers: Sequence[str],
    bit_choices: Sequence[int],
    recipe: Recipe,
    batches: list[Any],
    grids: LayerGrids | None,
    progress: bool,
    cache: ImportanceCache | None,
    ranks: Ranks,
) -> CostTable:
    """`loss_costs` over ranks: the layers split, each rank measuring whole rows on all the batches.

    Rank 0 sends the rows its `cache` already holds; the layers left go round-robin to the ranks (every row
    costs about the same: one forward pass of the batches per bit width). They are measured in rounds, one
    layer per rank, each round's rows all-gathered (and written to the cache by rank 0), so an interrupted
    measurement keeps its finished rounds. Every row is measured by one rank exactly as one process measures
    it (the same forward passes and the same summation order), so the table is one process's, bit for bit.
    The ranks take no file claims: they split the layers among themselves.
    """
    known: CostTable = {}
    if cache is not None:
        known = {name: row for name in layers if (row := cache.row(name, bit_choices)) is not None}
    known = ranks.broadcast_object(known, "the loss importance rows rank 0 has saved")
    todo = [name for name in layers if name not in known]
    if todo:
        owner = split_work([1] * len(todo), ranks.world)
        mine = [name for name, r in zip(todo, owner, strict=True) if r == ranks.rank]
        rounds = max(owner.count(r) for r in range(ranks.world))
        measure = _row_measurer(model, bit_choices, recipe, batches, grids) if mine else None
        bar = progress_bar(
            total=len(todo), enabled=progress, desc="loss importance", unit="layer", leave=False
        )
        with bar:
            for k in range(rounds):
                row = (mine[k], measure(mine[k])) if measure is not None and k < len(mine) else None
                new = dict(
                    r for r in ranks.gather_objects(row, "gathering loss importance rows") if r is not None
                )
                if cache is not None:
                    cache.record(new)
                known.update(new)
                bar.update(len(new))
    return {name: known[name] for name in layers}


# ----------------------------------------------------------------------------------- gradients


def _sampled_nll(out: torch.Tensor, batch: Any, gen: torch.Generator) -> torch.Tensor:
    """Negative log-likelihood of targets drawn from the model's own predictive distribution."""
    # Targets are drawn on the CPU (`gen` is a CPU generator), so every device draws the same ones.
    if out.dim() == 2:  # classes: y ~ softmax(logits)
        probs = torch.softmax(out.detach().double(), -1).cpu()
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(out.device)
        return nn.functional.cross_entropy(out, y, reduction="sum")
    noise = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    target = out.detach() + noise  # t ~ N(f(x), I)
    err = 0.5 * (out - target).pow(2)
    mask = token_mask(batch, out)
    return (err * mask.to(err.dtype).unsqueeze(-1)).sum() if mask is not None else err.sum()


def target_generator(seed: int, index: int) -> torch.Generator:
    """The generator of batch `index`'s sampled targets: one per batch, so that a rank starting at any batch
    draws what one process draws there."""
    digest = hashlib.sha256(f"importance targets:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def gradient_moments(
    model: nn.Module, layers: Sequence[str], batches: list[Any], seed: int = 0, ranks: Ranks | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer: the mean |gradient| over batches, and the diagonal Fisher per sample (mean g^2 per sample).

    Gradients are of the sampled-target negative log-likelihood (see the module docstring), the targets of
    batch i drawn from `target_generator` (`seed`, i); only the weights of `layers` get gradients, and every
    ``requires_grad`` flag is restored. `ranks`: each rank back-propagates its contiguous shard of `batches`
    and the sums are all-reduced, so every rank returns the same moments: one process's up to the float
    summation order of the sums.

    Raises:
        DataError: with `ranks`, fewer calibration samples than ranks.
    """
    part = range(len(batches))
    if ranks is not None:
        shard(ranks, batches, sum(batch_size_of(b) for b in batches))  # too few samples: a DataError
        part = range(*shard_bounds(len(batches), ranks.world)[ranks.rank])
    params = dict(model.named_parameters())
    flags = {k: p.requires_grad for k, p in params.items()}
    weights = {name: model.get_submodule(name).weight for name in layers}
    abs_sum = {name: torch.zeros_like(w) for name, w in weights.items()}
    sq_sum = {name: torch.zeros_like(w) for name, w in weights.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for i in part:
            batch = batches[i]
            with torch.enable_grad():
                out = run_model(model, batch)
                loss = _sampled_nll(out, batch, target_generator(seed, i))
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for name, g in zip(weights, grads, strict=True):
                if g is None:  # the layer does not reach the main output (e.g. a BERT pooler): no damage
                    continue
                abs_sum[name] += g.abs()
                sq_sum[name] += g.pow(2)
    finally:
        for k, p in params.items():
            p.requires_grad_(flags[k])
    if ranks is not None:
        ranks.all_reduce_sum_([*abs_sum.values(), *sq_sum.values()], "summing the importance gradients")
    n = sum(batch_size_of(batch) for batch in batches)
    grad_abs = {name: t / len(batches) for name, t in abs_sum.items()}
    fisher = {name: t / n for name, t in sq_sum.items()}
    return grad_abs, fisher


# ----------------------------------------------------------------------------------- entry point


def _spread(batches: list[Any], n: int | None) -> list[Any]:
    """At most `n` samples from batches spread evenly over the list (calibration sets may be sorted by class)."""
    sizes = [batch_size_of(b) for b in batches]
    if n is None or sum(sizes) <= n:
        return collect_batches(batches)
    per_batch = max(sum(sizes) / len(sizes), 1.0)
    k = min(len(batches), max(1, round(n / per_batch)))
    picked = [batches[int(i * len(batches) / k)] for i in range(k)]  # k evenly spaced batches
    if sum(batch_size_of(b) for b in picked) < n:
        picked = batches
    return collect_batches(picked, n)


def importance_table(
    model: nn.Module,
    layers: Sequence[str],
    bit_choices: Sequence[int],
    recipe: Recipe,
    importance: Importance | str,
    batches: list[Any] | None = None,
    calib_size: int | None = None,
    grids: LayerGrids | None = None,
    checkpoint_dir: str | Path | None = None,
    ranks: Ranks | None = None,
) -> CostTable:
    """The damage table ``cost[layer][bits]`` of `importance` for the layers of a float (BN-folded) model.

    Args:
        model: the float model (weights are read, and for ``loss`` swapped and restored).
        layers: names of its Conv/Linear layers to score.
        bit_choices: bit widths to score.
        recipe: grid and rounding settings of ``Q_b``.
        importance: ``loss``, ``taylor``, ``fisher`` or ``datafree``.
        batches: calibration batches (not needed for ``datafree``).
        calib_size: use at most this many samples of `batches`.
        grids: the layers' grids per bit width (`fit_weight_grid`), when already fitted; else fitted here.
        checkpoint_dir: save the measured rows here and reuse them (`postquant.mixed.cache`); data-driven
            measures only (``datafree`` takes well under a second). In a process group rank 0 alone reads
            and writes it, and sends the other ranks what it holds.
        ranks: the process group (`postquant.distributed.current`): the work is split over its ranks (see
            the module docstring) and every rank returns the same table.

    Raises:
        DataError: a data-driven measure without calibration batches (or, with `ranks`, fewer calibration
            samples than ranks).
    """
    importance = Importance(importance)
    model.eval()
    if importance is Importance.DATAFREE:
        table: CostTable = {}
        for name in layers:
            w = model.get_submodule(name).weight.detach()
            table[name] = {
                b: datafree_cost(w, quantized_weight(w, b, recipe, _grid(grids, name, b)))
                for b in bit_choices
            }
        return table
    if not isinstance(batches, list):
        raise DataError(
            f"importance {importance.value!r} needs calibration batches (calib=... as tensors or a "
            "DataLoader, not a forward loop); or use importance='datafree'"
        )
    batches = _spread(batches, calib_size)
    cache = None
    if checkpoint_dir is not None and (ranks is None or ranks.is_main):
        cache = ImportanceCache(
            checkpoint_dir, _cache_parts(model, layers, bit_choices, recipe, importance, batches, grids)
        )
    if importance is Importance.LOSS:
        return loss_costs(model, layers, bit_choices, recipe, batches, grids, cache=cache, ranks=ranks)
    rows = {name: cache.row(name, bit_choices) for name in layers} if cache is not None else {}
    saved = rows if rows and all(row is not None for row in rows.values()) else None
    if ranks is not None:
        saved = ranks.broadcast_object(saved, "the importance table rank 0 has saved")
    if saved is not None:
        return saved  # type: ignore[return-value]
    grad_abs, fisher = gradient_moments(model, layers, batches, seed=recipe.seed, ranks=ranks)
    score = taylor_cost if importance is Importance.TAYLOR else fisher_cost
    stat = grad_abs if importance is Importance.TAYLOR else fisher

    def scored(names: Sequence[str]) -> CostTable:
        table = {}
        for name in names:
            w = model.get_submodule(name).weight.detach()
            table[name] = {
                b: score(stat[name], w, quantized_weight(w, b, recipe, _grid(grids, name, b)))
                for b in bit_choices
            }
        return table

    if ranks is None:
        table = scored(layers)
    else:  # every rank holds the summed moments: each scores a share of the layers (by weight size)
        owner = split_work([model.get_submodule(name).weight.numel() for name in layers], ranks.world)
        mine = scored([name for name, r in zip(layers, owner, strict=True) if r == ranks.rank])
        parts = ranks.gather_objects(mine, "gathering the importance scores")
        table = {name: parts[r][name] for name, r in zip(layers, owner, strict=True)}
    if cache is not None:
        cache.record(table)
    return table


def _cache_parts(
    model: nn.Module,
    layers: Sequence[str],
    bit_choices: Sequence[int],
    recipe: Recipe,
    importance: Importance,
    batches: list[Any],
    grids: LayerGrids | None,
) -> dict[str, Any]:
    """What a data-driven cost table depends on, as the key of its `ImportanceCache` (see that module)."""
    weights = hashlib.sha256()
    for name in layers:
        w = model.get_submodule(name).weight.detach()
        for b in bit_choices:
            w_hat = quantized_weight(w, b, recipe, _grid(grids, name, b))
            weights.update(f"{name}:{b}".encode())
            weights.update(w_hat.detach().cpu().contiguous().float().numpy().tobytes())
    return {
        "importance": importance.value,
        "model": model_fingerprint(model),
        "data": data_fingerprint(batches),
        "weights": weights.hexdigest(),
        "seed": None if importance is Importance.LOSS else recipe.seed,  # targets sampled for the gradients
        "targets": None if importance is Importance.LOSS else "per batch",  # `target_generator`
    }
