"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ), verified in onnxruntime.

The quantized model is exported in two steps:

1. its *float twin* (each `QuantizedLayer` replaced by its float module holding the dequantized weight) is
   exported with torch's TorchScript exporter (``dynamo=False``, the default) or its dynamo exporter
   (``exporter="dynamo"``), both of which keep a layer's weight as the initializer ``<name>.weight`` feeding
   one Conv or Gemm node;
2. the graph is rewritten per quantized layer (`postquant.io.onnx.rewrite`) with the layer's ONNX parameters
   (`postquant.io.onnx.params`: int8/uint8 codes, or int4 at opset 21), checked, written whole or with
   external data (`postquant.io.onnx.files`), and its kernels counted and outputs compared with the PyTorch
   simulation in onnxruntime (`postquant.io.onnx.verify`).

The TorchScript exporter writes opsets up to 20; an opset-21 graph (int4 weights) is exported at 20 and
converted by ``onnx.version_converter`` (21 only widens the types of the ops it changes). The dynamo
exporter runs without onnxscript's graph optimizer, which merges equal initializers (tied weights, or
layers whose dequantized weights are equal) that the rewrite needs apart.
"""

from __future__ import annotations

import copy
import enum
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from postquant.errors import ExportError, OnnxMismatchError, UnsupportedModelError
from postquant.eval.run import move_batch
from postquant.io.onnx.files import StagedOnnx, check_target, data_path, needs_external_data
from postquant.io.onnx.integer import Ranges, integerize, tensor_ranges
from postquant.io.onnx.params import (
    Int4Weights,
    Int8Weights,
    LayerQDQ,
    WeightQDQ,
    cpu_has_vnni,
    plan_embeddings,
    plan_layers,
    saturating_int8_layers,
)
from postquant.io.onnx.points import ModelPoints
from postquant.io.onnx.rewrite import drop_zero_gemm_biases, rewrite
from postquant.io.onnx.verify import (
    INT4_OPSET,
    MIN_SQNR_DB,
    MIN_TOP1_AGREEMENT,
    count_kernels,
    int4_unsupported,
    ort_feed,
    verify_onnx,
)
from postquant.model import dynamic_input_layers, quantized_embeddings, quantized_layers, set_module
from postquant.model.hf import no_kv_cache
from postquant.nn.layer import HALF, upcast_half
from postquant.nn.residual import ResidualQuant, remove_points, residual_points
from postquant.progress import progress_bar

__all__ = ["DEFAULT_OPSET", "Exporter", "export_onnx", "float_twin"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # without int4 weights: the graphs of 8-bit codes, as before int4
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's highest opset (torch 2.13): newer ones are converted
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest opset


class Exporter(enum.StrEnum):
    """Which of torch's ONNX exporters traces the float twin."""

    TORCHSCRIPT = "torchscript"  # torch.onnx.export(dynamo=False): the tested default
    DYNAMO = "dynamo"  # torch.onnx.export(dynamo=True): torch.export, then onnxscript


class _MatrixLinear(nn.Module):
    """A Linear that flattens inputs of more than two dimensions to a matrix, so that it exports as one Gemm
    on its weight initializer (the exporter turns a Linear on (N, L, D), or one without a bias, into a MatMul
    on a folded, transposed copy of the weight, which the QDQ rewrite cannot find). The same function: rows
    are independent, and a missing bias becomes an exact zero one."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        bias = linear.bias
        if bias is None:  # without a bias the exporter writes MatMul on a transposed copy of the weight
            bias = nn.Parameter(
                torch.zeros(linear.out_features, dtype=linear.weight.dtype), requires_grad=False
            )
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def float_twin(qmodel: nn.Module) -> nn.Module:
    """A copy of `qmodel` where each `QuantizedLayer` is its float module holding the dequantized weight, and
    each `QuantizedEmbedding` an ``nn.Embedding`` holding the dequantized table.

    Input quantizers (and the points of integer residuals) are dropped; `export_onnx` puts them back as QDQ
    nodes. Linears (whose forward is
    ``nn.Linear``'s) take their input as a matrix (`_MatrixLinear`).
    """
    twin = copy.deepcopy(qmodel).eval()
    remove_points(twin)  # integer residuals: `postquant.io.onnx.points` puts them back as QDQ nodes
    for name, layer in quantized_layers(twin).items():
        inner = layer.inner
        inner.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        if isinstance(inner, nn.Linear) and type(inner).forward is nn.Linear.forward:
            inner = _MatrixLinear(inner)
        set_module(twin, name, inner)
    for name, table in quantized_embeddings(twin).items():
        weight = table.weight.detach()  # (V, D) in the grid's precision
        lookup = nn.Embedding(
            *table.weight_shape, padding_idx=table.padding_idx, _weight=weight, _freeze=True
        )
        set_module(twin, name, lookup.to(table.dtype))
    return twin


# --------------------------------------------------------------------------------------------- export


@dataclass
class _Inputs:
    """The example inputs: positional tensors, or keyword tensors (a tokenizer's dict)."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        if self.kwargs:
            return list(self.kwargs)
        return ["input"] if len(self.args) == 1 else [f"input_{i}" for i in range(len(self.args))]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Dimension 0 of every input is the batch; dimension 1 of keyword inputs is the sequence."""
        tensors = list(self.kwargs.values()) if self.kwargs else list(self.args)
        return {
            name: {0: "batch", 1: "sequence"} if self.kwargs and t.dim() >= 2 else {0: "batch"}
            for name, t in zip(self.names, tensors, strict=True)
        }


def _as_inputs(example_inputs: Any) -> _Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return _Inputs((example_inputs,), {})
    if isinstance(example_inputs, tuple | list) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return _Inputs(tuple(example_inputs), {})
    if isinstance(example_inputs, Mapping) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in example_inputs.items()
    ):
        return _Inputs((), dict(example_inputs))
    raise UnsupportedModelError(
        "export_onnx takes example inputs as a tensor, a tuple of positional tensors or a dict of keyword "
        f"tensors (a tokenizer's output), not {type(example_inputs).__name__}"
    )


class _Keywords(nn.Module):
    """Calls `model` with keyword tensors given positionally, in the order of `names` (what the exporter
    traces: its own keyword handling trips over models with more keyword parameters, such as BERT's)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))

    @staticmethod
    def unwrap(graph: Any) -> None:
        """Drop the wrapper's ``model.`` from the initializer names, so that layers are found by their names."""
        renamed = {i.name: i.name[len("model.") :] for i in graph.initializer if i.name.startswith("model.")}
        for init in graph.initializer:
            init.name = renamed.get(init.name, init.name)
        for node in graph.node:
            node.input[:] = [renamed.get(x, x) for x in node.input]


def _torch_export(model: nn.Module, inputs: _Inputs, path: Path, opset: int, exporter: Exporter) -> None:
    axes = {**inputs.dynamic_axes, "output": {0: "batch"}}
    args = inputs.args
    if inputs.kwargs:
        model, args = _Keywords(model, inputs.names), tuple(inputs.kwargs.values())
    if exporter is Exporter.DYNAMO:
        _dynamo_export(model, args, inputs, path, opset)
        return
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        try:
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                input_names=inputs.names,
                output_names=["output"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types; say which model part failed
            raise UnsupportedModelError(f"torch.onnx.export failed on {type(model).__name__}: {exc}") from exc


def _dynamo_export(
    model: nn.Module, args: tuple[torch.Tensor, ...], inputs: _Inputs, path: Path, opset: int
) -> None:
    """`torch.onnx.export(..., dynamo=True)`: `torch.export` then ONNX through onnxscript."""
    try:
        import onnxscript  # noqa: F401  the dynamo exporter's dependency (extra: onnx)
    except ImportError:
        raise UnsupportedModelError(
            "exporter='dynamo' needs onnxscript: pip install onnxscript (or postquant[onnx]), or use "
            "exporter='torchscript'"
        ) from None
    dynamic = torch.export.Dim.DYNAMIC
    shapes: tuple[Any, ...] = tuple({d: dynamic for d in axes} for axes in inputs.dynamic_axes.values())
    if inputs.kwargs:  # `_Keywords` takes them as *args: one argument holding them
        shapes = (shapes,)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=inputs.names,
                output_names=["output"],
                dynamic_shapes=shapes,
                verbose=False,
                optimize=False,
            )
            program.save(str(path))
        except Exception as exc:  # the exporter raises many types; say which model part failed
            raise UnsupportedModelError(
                f"torch.onnx.export(dynamo=True) failed on {type(model).__name__}: {exc}; "
                "try exporter='torchscript'"
            ) from exc


def _exported(
    staged: StagedOnnx, opset: int, plans: dict[str, LayerQDQ], tables: dict[str, WeightQDQ]
) -> dict[str, Any]:
    """The result of `export_onnx` for the `staged` graph (to be renamed to its path), before verifying."""
    path = staged.path
    result: dict[str, Any] = {
        "path": str(path),
        "bytes": staged.bytes,
        "external_data": str(data_path(path)) if staged.external_data else None,
        "opset": opset,
        "int8_weight_layers": sum(p.weight.dtype in ("int8", "uint8") for p in plans.values()),
        "uint8_weight_layers": sum(p.weight.dtype == "uint8" for p in plans.values()),
        "int4_weight_layers": sum(p.weight.int4 for p in plans.values()),
        "weight_dtypes": {name: p.weight.dtype for name, p in plans.items()},
        "float_compute_layers": {name: p.weight.why_float for name, p in plans.items() if p.weight.why_float},
        **count_kernels(staged.model),
        "top1_agreement": None,
        "max_abs_diff": None,
        "sqnr_db": None,
        "n": None,
    }
    if tables:  # only for models with quantized embeddings: other results keep their keys
        result["embedding_dtypes"] = {name: w.dtype for name, w in tables.items()}
    log.info(
        "exported %s (%d bytes, opset %d): %d layers with 8-bit weights (%d stored as uint8), %d with int4 "
        "weights, %d integer kernels after onnxruntime fusion",
        path,
        result["bytes"],
        opset,
        result["int8_weight_layers"],
        result["uint8_weight_layers"],
        result["int4_weight_layers"],
        result["integer_kernels"],
    )
    return result


def _choice(kind: type[enum.StrEnum], value: Any, argument: str) -> Any:
    """`value` as a member of `kind`, or a ValueError that lists the accepted values."""
    try:
        return kind(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{argument} must be one of {accepted}, not {value!r}") from None


def _plan(
    qmodel: nn.Module, opset: int | None, int4: Int4Weights, int8: Int8Weights = Int8Weights.PORTABLE
) -> tuple[dict[str, LayerQDQ], dict[str, WeightQDQ], int]:
    """The layers' and embedding tables' ONNX parameters and the opset: int4 weights (`int4`) where they fit
    and the opset allows them (`INT4_OPSET`), full-range 8-bit codes as `int8` says; ``opset=None`` picks
    `INT4_OPSET` when a layer or table stores int4, else `DEFAULT_OPSET`."""
    if opset is not None and opset < 13:
        raise UnsupportedModelError(f"opset {opset} has no per-channel DequantizeLinear; use opset >= 13")
    if opset is not None and opset < INT4_OPSET:
        if int4 is Int4Weights.ALL:
            raise ValueError(
                f"int4='all' needs opset >= {INT4_OPSET} (int4 DequantizeLinear); pass opset=None or "
                f"opset={INT4_OPSET}, or int4='none'"
            )
        int4 = Int4Weights.NONE
    why = int4_unsupported() if int4 is not Int4Weights.NONE else ""
    if why and opset is not None:
        raise UnsupportedModelError(
            f"opset {opset} needs int4 DequantizeLinear, which the installed packages cannot write or run: "
            f"{why}; upgrade them (pip install -U 'onnx>=1.16' 'onnxruntime>=1.20'), or pass opset={DEFAULT_OPSET} "
            "(4-bit codes stored as int8)"
        )
    if why:
        log.warning("4-bit weights stored as int8 (opset %d): int4 ONNX unavailable: %s", DEFAULT_OPSET, why)
    plans = plan_layers(qmodel, int4=Int4Weights.NONE if why else int4, int8=int8)
    tables = plan_embeddings(qmodel, int4=Int4Weights.NONE if why else int4, int8=int8)
    if opset is None:
        int4_used = any(p.weight.int4 for p in plans.values()) or any(w.int4 for w in tables.values())
        opset = INT4_OPSET if int4_used else DEFAULT_OPSET
    return plans, tables, opset


def _integerize(
    model: Any,
    inputs: _Inputs,
    example_inputs: Any,
    calib_batches: Iterable[Any] | None,
    points: ResidualQuant | None,
) -> dict:
    """`integerize` `model` with the quantizers of the model's integer residuals (`points`), else with ranges
    from `calib_batches` (or the example inputs) run in onnxruntime."""
    if points is not None:
        if calib_batches is not None:
            log.info(
                "full_integer export: the model's own residual points give the ranges; calib_batches unused"
            )
        found: list[ModelPoints] = []

        def from_model(tensors: list[str]) -> ModelPoints:
            found.append(ModelPoints(model, points, tensors))
            return found[-1]

        integer = integerize(model, from_model)
        found[0].check_all_used()
        return integer
    if calib_batches is None:
        log.warning(
            "full_integer export without calib_batches: the ranges of the new quantization points come from "
            "the example inputs alone; pass calib_batches= (e.g. the calibration batches) for real ranges"
        )
        calib_batches = [example_inputs]
    batches = list(calib_batches)
    if not batches:
        raise ValueError("export_onnx(full_integer=True) needs at least one calibration batch")
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    feeds = [ort_feed(batch, names) for batch in batches]
    return integerize(model, lambda tensors: Ranges(tensor_ranges(model, tensors, feeds) if tensors else {}))


def _refuse_dynamic_inputs(qmodel: nn.Module) -> None:
    """`ExportError` naming the layers with dynamic per-token input quantizers: QDQ cannot express them."""
    layers = dynamic_input_layers(qmodel)
    if layers:
        names = ", ".join(list(layers)[:4]) + (", ..." if len(layers) > 4 else "")
        raise ExportError(
            f"{len(layers)} layers quantize their inputs per token at run time (act_ranges: dynamic): {names}. "
            "The ONNX export writes QuantizeLinear with a static scale per tensor; a scale per row computed in "
            "the graph from each token is not written (the export would drop the activation quantization). "
            "Quantize with a static act_ranges (calib) or a_bits: null for ONNX, or export with "
            "export_compressed_tensors (vLLM runs per-token int8 inputs)"
        )


def export_onnx(
    qmodel: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    verify_batches: Iterable[Any] | None = None,
    opset: int | None = None,
    int4: Int4Weights | str = Int4Weights.WEIGHT_ONLY,
    int8_weights: Int8Weights | str = Int8Weights.PORTABLE,
    min_sqnr_db: float | None = MIN_SQNR_DB,
    min_top1_agreement: float | None = MIN_TOP1_AGREEMENT,
    progress: bool = True,
    full_integer: bool = False,
    calib_batches: Iterable[Any] | None = None,
    external_data: bool | None = None,
    overwrite: bool = True,
    exporter: Exporter | str = Exporter.TORCHSCRIPT,
) -> dict[str, Any]:
    """Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear, and check it in onnxruntime.

    Args:
        qmodel: a quantized model (a float model exports as plain float ONNX, e.g. as a speed baseline).
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors (a tokenizer's output) that
            the model accepts; dimension 0 is exported as dynamic (and dimension 1 of keyword inputs: the
            sequence). A model that returns several outputs is checked on the first.
        path: the ``.onnx`` file to write (its folder is created).
        verify_batches: batches to compare onnxruntime with the PyTorch simulation on (see `verify_onnx`).
        opset: ONNX opset, 13 or more (per-channel DequantizeLinear); from 21 (`INT4_OPSET`) on, layers whose
            codes and zero points fit [-8, 7] store int4 weights (`postquant.io.onnx.params`). None: 21 when a
            layer stores int4, else 17 (`DEFAULT_OPSET`).
        int4: which layers whose codes and zero points fit [-8, 7] store int4 codes from opset 21 on
            (`Int4Weights`): ``"weight-only"`` (default: layers without an input quantizer, which run in float
            in onnxruntime whatever the storage), ``"all"`` (W4A8 layers too: smaller, but onnxruntime fuses
            no int4 weight into an integer kernel), ``"none"``.
        int8_weights: how 8-bit layers whose codes leave [-64, 63] store them (`Int8Weights`): ``"portable"``
            (default: uint8 ``q + 128``, exact on every CPU, on onnxruntime's slower u8 x u8 kernels) or
            ``"signed"`` (int8: the fast u8 x s8 kernels, for a CPU with VNNI: AVX-512 VNNI, AVX-VNNI or AMX;
            on x86 without VNNI they can saturate, and the export warns when its own CPU lacks VNNI).
        min_sqnr_db, min_top1_agreement: the floors of the verification (see `verify_onnx`).
        progress: show a bar over the export's steps, then one over the verification batches.
        full_integer: also quantize the tensors between quantized ops (conv outputs before residual adds,
            the adds' outputs, the feature map before global pooling), so that onnxruntime runs chains of
            QLinearConv / QLinearAdd / QLinearGlobalAveragePool in integers (`postquant.io.onnx.integer`):
            faster, and 8-bit rounding the simulation does not have at those points (the verification
            measures it).
        calib_batches: batches (like `verify_batches`) whose min/max give the ranges of the new quantization
            points of `full_integer` (default: the example inputs alone, with a warning). A model quantized
            with integer residuals (recipe ``a_residual: true``) has those points already: the graph takes
            their scales and zero points, computes the simulation's function, and `calib_batches` is unused.
        external_data: write the tensors to ``<path>.data`` beside the ``.onnx`` (ONNX external data; both
            files are needed to run it). None: when they come near protobuf's 2 GB limit
            (`postquant.io.onnx.files.EXTERNAL_DATA_BYTES`).
        overwrite: replace an existing `path` (and its data file); False refuses them with `OutputError`.
        exporter: torch's exporter of the float twin (`Exporter`): ``"torchscript"`` (default) or
            ``"dynamo"`` (opset 18 or more; needs onnxscript; docs/export.md says what it passes).

    Returns:
        ``path``, ``bytes`` (with the data file), ``external_data`` (the data file, or None), ``opset``,
        ``int8_weight_layers`` (layers with 8-bit integer codes, int8 or uint8), ``uint8_weight_layers`` (how
        many of them store uint8 codes: codes outside [-64, 63], see `postquant.io.onnx.params`),
        ``int4_weight_layers``, ``weight_dtypes`` ({layer: "int8", "uint8" or "int4"}), ``float_compute_layers`` ({layer:
        why onnxruntime cannot give it integer kernels}), the `count_kernels` entries ``integer_kernels``,
        ``float_kernels``, ``ops``, and ``top1_agreement``, ``max_abs_diff``, ``sqnr_db``, ``n`` (None without
        `verify_batches`); with `full_integer`, ``full_integer`` (what `integerize` returns); with quantized
        embedding tables, ``embedding_dtypes`` ({table: "int8", "uint8" or "int4"}).

    Raises:
        UnsupportedModelError: a layer QDQ cannot express (the message names it), or the exporter failed;
            `ExportError` (a subclass) for a model with integer residuals exported without `full_integer`,
            or whose points do not match the full-integer graph's (the message names the point), and for
            dynamic per-token input quantizers (recipe ``act_ranges: dynamic``; the message names the layers).
        OutputError: `path` cannot be written, or exists (or its data file does) without `overwrite`.
        OnnxMismatchError: onnxruntime disagrees with the simulation on `verify_batches` (nothing is written
            at `path`; the graph is kept beside it as ``<stem>.rejected.onnx``, with external data as the
            directory ``<stem>.rejected`` holding both files, for inspection).
        ValueError: `int4`, `int8_weights` or `exporter` is not one of its values, or ``int4="all"`` with an opset below 21.
    """
    import onnx  # optional dependency (extra: onnx)
    from onnx import version_converter  # optional dependency (extra: onnx)

    if any(t.device.type != "cpu" for t in [*qmodel.parameters(), *qmodel.buffers()]):
        qmodel = copy.deepcopy(qmodel).cpu()  # exported and verified on the CPU, where onnxruntime runs
    example_inputs = move_batch(example_inputs, "cpu")
    inputs = _as_inputs(example_inputs)  # first: export_onnx(qmodel, path, inputs) gets a clear error
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"export_onnx(qmodel, example_inputs, path): path is a str or Path, not {type(path).__name__}"
        )
    path = Path(path).expanduser()
    check_target(path, overwrite=overwrite, external_data=external_data)  # before any work; again at the end
    exporter = _choice(Exporter, exporter, "exporter")
    if exporter is Exporter.DYNAMO and opset is not None and opset < DYNAMO_MIN_OPSET:
        raise UnsupportedModelError(
            f"exporter='dynamo' writes opset {DYNAMO_MIN_OPSET} or more, not {opset}; pass opset=None or "
            f">= {DYNAMO_MIN_OPSET}, or exporter='torchscript'"
        )
    _refuse_dynamic_inputs(qmodel)
    plans, tables, opset = _plan(
        qmodel, opset, _choice(Int4Weights, int4, "int4"), _choice(Int8Weights, int8_weights, "int8_weights")
    )
    if exporter is Exporter.DYNAMO:
        opset = max(opset, DYNAMO_MIN_OPSET)
    points = residual_points(qmodel)
    if points is not None and not (full_integer and plans):
        raise ExportError(
            "the model quantizes its residual adds and global pooling (recipe a_residual: true); a QDQ graph "
            "without those points computes another function: export it with full_integer=True"
        )
    if not plans and not tables:
        log.info("%s has no quantized layer: exporting it in float", type(qmodel).__name__)
    steps = progress_bar(total=4, desc="export onnx", unit="step", enabled=progress)
    steps.set_postfix_str("trace")
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        twin = float_twin(qmodel)
        if any(t.dtype in HALF for t in twin.state_dict().values()):
            twin = twin.float()  # a half-precision model exports in float32 (with its int8 weights)
            inputs = _Inputs(
                tuple(map(upcast_half, inputs.args)), {k: upcast_half(t) for k, t in inputs.kwargs.items()}
            )
        with no_kv_cache(twin):  # a causal LM's key/value cache object is no ONNX output
            _torch_export(twin, inputs, float_path, opset, exporter)
        model = onnx.load(str(float_path))
    if (
        exporter is Exporter.TORCHSCRIPT and opset > TORCHSCRIPT_MAX_OPSET
    ):  # 21 extends the types of its changed ops (int4...): the same graph
        model = version_converter.convert_version(model, opset)
        del model.graph.value_info[:]  # the converter's inferred shapes: optional, and not in the 17 graph
    steps.update()
    steps.set_postfix_str("quantize graph")
    if inputs.kwargs:
        _Keywords.unwrap(model.graph)
    drop_zero_gemm_biases(model.graph)
    rewrite(model, plans, tables)
    integer = None
    if full_integer and plans:
        integer = _integerize(model, inputs, example_inputs, calib_batches, points)
    onnx.checker.check_model(model)
    steps.update()
    external = needs_external_data(model) if external_data is None else external_data
    if external and not external_data:
        log.info("the model's tensors exceed protobuf's 2 GB: writing them to %s", data_path(path))
    check_target(path, overwrite=overwrite, external_data=external)
    steps.set_postfix_str("save")
    staged = StagedOnnx.save(model, path, external_data=external)  # checked, then renamed into place
    try:
        steps.update()
        steps.set_postfix_str("count kernels")  # an onnxruntime session: its graph optimisation takes a while
        result = _exported(staged, opset, plans, tables)
        if integer is not None:
            result["full_integer"] = integer
        steps.update()
        steps.close()
        if verify_batches is not None:
            result.update(
                verify_onnx(
                    qmodel,
                    staged.model,
                    verify_batches,
                    min_sqnr_db=min_sqnr_db,
                    min_top1_agreement=min_top1_agreement,
                    progress=progress,
                )
            )
            log.info(
                "onnxruntime vs PyTorch on %d samples: top-1 agreement %.2f %%, max |diff| %.3g, SQNR %.1f dB",
                result["n"],
                result["top1_agreement"],
                result["max_abs_diff"],
                result["sqnr_db"],
            )
    except OnnxMismatchError as exc:
        rejected = staged.reject()
        hint = ""
        if saturating_int8_layers(plans) and cpu_has_vnni() is False:
            hint = (
                " int8_weights='signed' stores full-range int8 codes, which onnxruntime's u8 x s8 kernels can "
                "saturate on this CPU (x86 without VNNI): export with int8_weights='portable', or verify on "
                "the CPU with VNNI that will run the file."
            )
        raise OnnxMismatchError(
            f"{exc}{hint} Nothing was written to {path}; the rejected graph is kept at {rejected} for inspection.",
            exc.metrics,
        ) from None
    except BaseException:
        staged.discard()
        raise
    staged.commit(overwrite=overwrite)
    return result
