"""The quantization pipeline: a plan made once, then a short list of stages over it.

`quantize` (postquant.api) validates its inputs and runs `run_pipeline`. Each stage reads and updates one
`PipelineState` and declares what it needs from the caller (`Needs`: calibration data, example inputs, a
float teacher), so a command line or a launcher asks `requirements(recipe)` instead of re-deriving it. The
result is a `QuantizationResult` (effective recipe, frozen plan, per-stage seconds, mixed allocation, learned
statistics), reachable from the quantized model through `result(qmodel)`.

Stages, in order (docs/algorithms.md names the methods):
    convert     Conv1D / MultiheadAttention rebuilt from Linears; plan; checks
    prepare     learned rounding's preset policy (8-bit first/last layers) and its calibration source
    fold        BatchNorm folded into the preceding convolutions (verified on example inputs)
    search      per-weight factors of the power grid's output-error exponent search
    allocate    mixed precision: bits per layer from an importance and a budget (a plan update)
    weights     grids and integer codes; layers replaced by `QuantizedLayer`s
    embeddings  embedding tables to nearest codes, `QuantizedEmbedding`s (recipe ``embeddings``)
    activations input quantizers: ranges from calibration data or a data-free rule
    reconstruct learned rounding against the float (folded) teacher
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from postquant.calib import ActRanges, as_calibration, calibrate_from_data, calibrate_reference_noise
from postquant.calib.act_ranges import (
    bn_noise_ranges,
    check_dynamic_layers,
    dynamic_input_bits,
    install_dynamic,
)
from postquant.calib.data import model_placement
from postquant.calib.moments import input_moments
from postquant.calib.observers import Observer
from postquant.choices import Importance, Method
from postquant.distributed import Ranks, current
from postquant.embeddings import check_untied, embedding_tables, quantize_embeddings
from postquant.errors import DataError
from postquant.mixed.apply import MixedResult, apply_mixed
from postquant.model import fold_batchnorm, matches, quantizable_layers
from postquant.model.convert import float_weight_modules, with_linear_layers
from postquant.nn import QuantizedEmbedding, QuantizedLayer
from postquant.outcome import QuantizationResult, attach_result, result
from postquant.plan import Plan, Source, check_finite, make_plan
from postquant.recipe import Recipe
from postquant.reconstruct import CalibSource, is_learned, learned_config
from postquant.reconstruct.checkpoint import data_fingerprint, model_fingerprint
from postquant.reconstruct.engine import ReconstructionReport, check_calibration, learned_rounding, prepare
from postquant.weights import gptq_weights, quantize_weights

__all__ = [
    "STAGES",
    "Need",
    "Needs",
    "PipelineState",
    "QuantizationResult",
    "Stage",
    "agree_model",
    "check_same_inputs",
    "requirements",
    "result",
    "run_pipeline",
]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- needs


class Need(StrEnum):
    """How much a stage needs the caller's calibration data."""

    NONE = "none"  # not used
    USEFUL = "useful"  # used when given; a data-free rule runs otherwise
    REQUIRED = "required"  # the stage fails without it


@dataclass(frozen=True)
class Needs:
    """What a pipeline needs from its caller. `calib_size`: samples the calibration stages use."""

    calib: Need = Need.NONE
    calib_size: int = 0
    example_inputs: bool = False
    teacher: bool = False

    def __or__(self, other: Needs) -> Needs:
        order = list(Need)
        calib = max(self.calib, other.calib, key=order.index)
        return Needs(
            calib,
            max(self.calib_size, other.calib_size),
            self.example_inputs or other.example_inputs,
            self.teacher or other.teacher,
        )


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class PipelineState:
    """What the stages share. `model` is the float model (with Linears for Conv1D/MHA, never modified);
    `qmodel` the working copy that ends quantized."""

    model: nn.Module
    recipe: Recipe
    batches: Any
    example_inputs: Any
    plan: Plan | None = None
    qmodel: nn.Module | None = None
    teacher: nn.Module | None = None
    search: dict[str, torch.Tensor] | None = None
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    embeddings: dict[str, QuantizedEmbedding] = field(default_factory=dict)
    mixed: MixedResult | None = None
    learned: ReconstructionReport | None = None
    act_ranges: ActRanges | None = None
    act_observer: Observer | None = None
    ranks: Ranks | None = None  # the process group (postquant.distributed), None in a single process

    def current_plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("no plan yet: the convert stage makes it")
        return self.plan

    def working_model(self) -> nn.Module:
        if self.qmodel is None:
            raise RuntimeError("no working copy yet: the fold stage makes it")
        return self.qmodel


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: `needs(recipe)` says what it needs, `run(state)` does it in place.

    `applies(recipe)` is False for a stage the recipe does not use (it is then skipped and not timed).
    """

    name: str
    run: Callable[[PipelineState], None]
    needs: Callable[[Recipe], Needs] = lambda recipe: Needs()
    applies: Callable[[Recipe], bool] = lambda recipe: True


def _convert(state: PipelineState) -> None:
    torch.manual_seed(state.recipe.seed)
    state.model = with_linear_layers(state.model)  # a copy when anything is rebuilt
    state.plan = make_plan(state.model, state.recipe)  # validates the layer set before any work
    _warn_unmatched_patterns(state.model, state.recipe)
    check_finite(state.model, list(state.plan))
    dynamic = dynamic_input_bits(state.recipe, state.plan)
    check_dynamic_layers({name: state.model.get_submodule(name) for name in dynamic})  # before any work
    if state.recipe.embeddings is not None:  # tied tables are refused before any work
        check_untied(state.model, embedding_tables(state.model, state.recipe.ignore))
    left = float_weight_modules(state.model, list(state.plan), state.recipe.ignore)
    if left:
        log.warning(
            "%d modules with weights stay float (no quantizer for their type; ignore=[...] silences this): %s",
            len(left),
            ", ".join(f"{name} ({kind})" for name, kind in list(left.items())[:8])
            + (", ..." if len(left) > 8 else ""),
        )
    if state.batches is not None:
        state.batches = as_calibration(state.batches, state.recipe.calib_size)
    if isinstance(state.batches, list) and state.batches:
        check_calibration(state.model, state.batches, 0)  # a batch the model cannot run: a DataError now
    if state.example_inputs is None and isinstance(state.batches, list):
        state.example_inputs = state.batches[0]
    if state.ranks is not None:  # every rank must quantize the same model with the same recipe and data
        check_same_inputs(state.ranks, state.recipe, state.model, state.batches)


def _prepare(state: PipelineState) -> None:
    recipe, state.batches = prepare(state.model, state.recipe, state.batches, state.example_inputs)
    if recipe is not state.recipe:  # the preset's first/last-layer overrides
        state.recipe = recipe
        state.plan = make_plan(state.model, recipe)
    if state.example_inputs is None and isinstance(state.batches, list):
        state.example_inputs = state.batches[0]


def _fold(state: PipelineState) -> None:
    state.qmodel = copy.deepcopy(state.model).eval()
    if not state.recipe.fold_bn:
        return
    if state.example_inputs is None:
        log.info("BatchNorm not folded: pass example_inputs or calib so the fold can be verified")
        return
    state.qmodel, _ = fold_batchnorm(state.qmodel, state.example_inputs)


def _search(state: PipelineState) -> None:
    if not isinstance(state.batches, list):
        raise DataError(
            "power_search: outputs measures each layer's inputs on calibration data: pass calib=... (tensors, "
            "batches or a DataLoader; not a forward loop), or use power_search: weights"
        )
    layers = state.current_plan().weight_layers
    start = time.perf_counter()
    state.search = input_moments(state.working_model(), layers, state.batches)
    log.info(
        "input moments of %d layers for the power exponent search in %.1f s",
        len(layers),
        time.perf_counter() - start,
    )


def _allocate(state: PipelineState) -> None:
    state.recipe, state.mixed = apply_mixed(
        state.working_model(), state.recipe, state.current_plan(), state.batches, state.search, state.ranks
    )
    allocated = {row.name: row.bits for row in state.mixed.layers if not row.fixed}
    state.plan = state.current_plan().with_w_bits(allocated, Source.MIXED)


def _weights(state: PipelineState) -> None:
    if is_learned(state.recipe):  # float, folded: the target of learning
        state.teacher = copy.deepcopy(state.working_model())
    if state.recipe.method is Method.GPTQ:
        if not isinstance(state.batches, list) or not state.batches:
            raise DataError(
                "method 'gptq' chooses codes from each layer's inputs on calibration data: pass calib=... "
                "(tensors, batches or a DataLoader; not a forward loop)"
            )
        state.layers = gptq_weights(
            state.working_model(),
            state.current_plan(),
            state.recipe,
            state.batches,
            state.search,
            ranks=state.ranks,
            dynamic_inputs=dynamic_input_bits(state.recipe, state.current_plan()),
        )
        return
    state.layers = quantize_weights(
        state.working_model(), state.current_plan(), state.recipe, state.search, ranks=state.ranks
    )


def _embeddings(state: PipelineState) -> None:
    config = state.recipe.embeddings
    if config is None:
        raise RuntimeError("the embeddings stage runs for recipes with embeddings")
    tables = embedding_tables(state.model, state.recipe.ignore)
    if not tables:
        log.warning(
            "the recipe quantizes embeddings but %s has no nn.Embedding to quantize",
            type(state.model).__name__,
        )
    state.embeddings = quantize_embeddings(state.working_model(), list(tables), config)


def _activations(state: PipelineState) -> None:
    plan = state.current_plan()
    a_bits = {name: plan[name].a_bits for name in state.layers if plan[name].a_bits is not None}
    if not a_bits:
        return
    act_layers = {name: state.layers[name] for name in a_bits}
    _calibrate_activations(state, act_layers, a_bits)  # type: ignore[arg-type]


def _reconstruct(state: PipelineState) -> None:
    if state.teacher is None:
        raise RuntimeError("learned rounding needs the teacher the weights stage keeps")
    state.learned = learned_rounding(
        state.working_model(), state.teacher, state.batches, state.recipe, ranks=state.ranks
    )
    state.teacher = None  # the float copy is not needed any longer


def _activation_needs(recipe: Recipe) -> Needs:
    if recipe.a_bits is None or recipe.act_ranges is ActRanges.DYNAMIC:  # dynamic: nothing to calibrate
        return Needs()
    if recipe.act_ranges is ActRanges.CALIB or recipe.a_residual:
        return Needs(Need.REQUIRED, recipe.calib_size)
    if recipe.act_ranges is ActRanges.AUTO:
        return Needs(Need.USEFUL, recipe.calib_size, example_inputs=True)
    return Needs(example_inputs=True)


def _learned_needs(recipe: Recipe) -> Needs:
    data = learned_config(recipe).calib_source is CalibSource.DATA
    return Needs(
        Need.REQUIRED if data else Need.NONE, recipe.calib_size, example_inputs=not data, teacher=True
    )


def _mixed_needs(recipe: Recipe) -> Needs:
    cfg = recipe.mixed
    if cfg is None or cfg.importance is Importance.DATAFREE:
        return Needs()
    return Needs(Need.REQUIRED, cfg.calib_size)


STAGES: tuple[Stage, ...] = (
    Stage("convert", _convert),
    Stage("prepare", _prepare, applies=is_learned),
    Stage("fold", _fold, needs=lambda r: Needs(example_inputs=r.fold_bn)),
    Stage(
        "search",
        _search,
        # with mixed precision, the search measures on the importance's samples
        needs=lambda r: Needs(Need.REQUIRED, r.mixed.calib_size if r.mixed is not None else r.calib_size),
        applies=lambda r: r.searches_on_outputs,
    ),
    Stage("allocate", _allocate, needs=_mixed_needs, applies=lambda r: r.mixed is not None),
    Stage(
        "weights",
        _weights,
        needs=lambda r: Needs(Need.REQUIRED, r.calib_size) if r.method is Method.GPTQ else Needs(),
    ),
    Stage("embeddings", _embeddings, applies=lambda r: r.embeddings is not None),
    Stage("activations", _activations, needs=_activation_needs),
    Stage("reconstruct", _reconstruct, needs=_learned_needs, applies=is_learned),
)


def requirements(recipe: Recipe, *, optional_data: bool = True) -> Needs:
    """What quantizing with `recipe` needs from the caller, over every stage it runs.

    With ``optional_data=False`` the caller will not give calibration data to stages that only find it
    useful (they then run their data-free rule), so those stages add no calibration need.
    """
    needs = Needs()
    for stage in STAGES:
        if not stage.applies(recipe):
            continue
        need = stage.needs(recipe)
        if need.calib is Need.USEFUL and not optional_data:
            need = Needs(example_inputs=need.example_inputs, teacher=need.teacher)
        needs = needs | need
    return needs


def run_pipeline(model: nn.Module, recipe: Recipe, calib: Any, example_inputs: Any) -> nn.Module:
    """Run the stages on a validated recipe and a model in eval mode; return the quantized copy (eval mode)
    with its `QuantizationResult` attached.

    Inside a torch.distributed process group of several processes (`postquant.distributed.current`), the
    ranks check that they got the same inputs, split calibration and weight rounding, and end with the same
    quantized model (rank 0's where a rank computed another one).
    """
    state = PipelineState(model, recipe, calib, example_inputs, ranks=current())
    seconds: dict[str, float] = {}
    for stage in STAGES:
        # `prepare` may change the recipe (not the method), so whether a stage applies is asked when it comes
        if not stage.applies(state.recipe):
            continue
        start = time.perf_counter()
        stage.run(state)
        seconds[stage.name] = time.perf_counter() - start
        log.debug("stage %s: %.3f s", stage.name, seconds[stage.name])
    qmodel = state.working_model().eval()  # the QuantizedLayers are new modules, created in train mode
    attach_result(
        qmodel,
        QuantizationResult(
            state.recipe,
            state.current_plan(),
            seconds,
            state.mixed,
            state.learned,
            act_ranges=state.act_ranges,
            act_observer=state.act_observer,
        ),
    )
    if state.ranks is not None:
        qmodel = agree_model(state.ranks, qmodel)
    return qmodel


# --------------------------------------------------------------------------------------------- helpers


def check_same_inputs(ranks: Ranks, recipe: Recipe, model: nn.Module, batches: Any) -> None:
    """Refuse (`DistributedMismatchError` on every rank) ranks given another recipe, other model weights or
    other calibration batches than rank 0."""
    hashes = {"recipe": recipe.model_dump_json(), "model weights": model_fingerprint(model)}
    if isinstance(batches, list):
        hashes["calibration data"] = data_fingerprint(batches)
    ranks.check_consistent(hashes)


def agree_model(ranks: Ranks, qmodel: nn.Module) -> nn.Module:
    """Every rank's quantized model equal to rank 0's: compared by a hash of its tensors and grid configs
    (bits, granularity), replaced by rank 0's where it differs."""
    configs = [
        (name, m.grid_config.model_dump_json())
        for name, m in qmodel.named_modules()
        if isinstance(m, QuantizedLayer)
    ]
    digest = model_fingerprint(qmodel) + repr(configs)
    agreed = ranks.agree(qmodel, digest, "quantized model")
    if agreed is not qmodel:
        agreed = agreed.to(model_placement(qmodel)[0])
    return agreed


def _warn_unmatched_patterns(model: nn.Module, recipe: Recipe) -> None:
    """Warn about ignore patterns that match no module and override patterns that match no layer (typos)."""
    modules = list(model.named_modules())
    layers = quantizable_layers(model)
    unmatched = [p for p in recipe.ignore if not any(matches(name, m, p) for name, m in modules)]
    unmatched += [
        p
        for p in recipe.overrides
        if not p.startswith("@") and not any(matches(name, m, p) for name, m in layers.items())
    ]
    if unmatched:
        log.warning(
            "%d layer patterns match nothing in %s (a typo?): %s",
            len(unmatched),
            type(model).__name__,
            ", ".join(repr(p) for p in unmatched),
        )


def _data_free_default(float_model: nn.Module, example_inputs: Any) -> ActRanges:
    """The data-free activation rule that measured better: BN-matched noise where the model has BatchNorm
    (EfficientNet-Lite0 W6A6: 82.8 vs 81.2 for SQuant's reference rule; CIFAR ResNets within seed noise),
    else the reference's uniform-noise rule."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in float_model.modules())
    return (
        ActRanges.BN_NOISE if has_bn and isinstance(example_inputs, torch.Tensor) else ActRanges.SQUANT_NOISE
    )


def _observer(recipe: Recipe, rule: ActRanges) -> Observer:
    """The recipe's activation observer, else the measured best for its rule and method: percentile for
    bn-noise ranges (benchmarks/results/accuracy*.md), MSE for learned rounding (min/max loses 2.5 points on
    resnet20 W4A4 and 5.2 at W2A4: benchmarks/results/default_check/), min/max otherwise."""
    if recipe.a_observer is not None:
        return recipe.a_observer
    if rule is ActRanges.BN_NOISE:
        return Observer.PERCENTILE
    return Observer.MSE if is_learned(recipe) else Observer.MINMAX


def _observer_samples(recipe: Recipe) -> int:
    """Values per layer input the sampling observers keep: the recipe's, else 2^20, and 2^18 for the
    learned-fast method (its MSE range search in a quarter of the time: benchmarks/results/learned_fast.md)."""
    if recipe.a_observer_samples is not None:
        return recipe.a_observer_samples
    return 1 << 18 if recipe.method is Method.LEARNED_FAST else 1 << 20


def _calibrate_activations(
    state: PipelineState, layers: dict[str, QuantizedLayer], a_bits: dict[str, int]
) -> None:
    recipe, batches, example_inputs = state.recipe, state.batches, state.example_inputs
    rule = recipe.act_ranges
    if rule is ActRanges.DYNAMIC:  # no ranges: each token's step at run time
        install_dynamic(layers, a_bits)
        state.act_ranges = rule
        return
    if rule is ActRanges.AUTO:
        rule = ActRanges.CALIB if batches is not None else _data_free_default(state.model, example_inputs)
    if rule is ActRanges.CALIB:
        if batches is None:
            raise DataError(
                "activation quantization with act_ranges='calib' needs calibration data: pass calib=..., "
                "or choose a data-free rule (act_ranges='squant-noise')"
            )
        state.act_ranges, state.act_observer = rule, _observer(recipe, rule)
        calibrate_from_data(
            state.working_model(),
            layers,
            a_bits,
            batches,
            state.act_observer,
            recipe.a_percentile,
            ranks=state.ranks,
            sample_size=_observer_samples(recipe),
            residual=recipe.a_residual,
        )
        return
    if recipe.a_residual:
        raise DataError(
            "a_residual calibrates its quantization points on calibration data: pass calib=..., or drop "
            "a_residual"
        )
    if example_inputs is None:
        raise DataError(
            "data-free activation ranges need example_inputs=... (one batch, for the input shape)"
        )
    state.act_ranges, state.act_observer = rule, _observer(recipe, rule)
    if rule is ActRanges.BN_NOISE:
        ranges = bn_noise_ranges(
            state.model,
            a_bits,
            example_inputs,
            state.act_observer,
            seed=recipe.seed,
            sample_size=_observer_samples(recipe),
        )
        for name, (lo, hi) in ranges.items():
            layers[name].act_quant = layers[name].input_quantizer(a_bits[name], lo, hi)
        return
    state.act_observer = None  # the reference rule: ranges from the noise's own statistics
    calibrate_reference_noise(state.working_model(), layers, a_bits, example_inputs, seed=recipe.seed)
