"""Export a quantized Llama-architecture causal LM to GGUF for llama.cpp, with postquant's own codes bit for bit.

Layers quantized on a GGUF grid (recipe ``grid: gguf-q4_0 | gguf-q4_1 | gguf-q8_0``, `postquant.grids.gguf`) are
written as llama.cpp blocks holding their codes and fp16 scales unchanged (`postquant.io.gguf_blocks`); float
layers as F16 or F32, norms as F32, the token embedding as F32, F16 or Q8_0 (llama.cpp's reference quantizer).
Tensor names follow llama.cpp (``blk.0.attn_q.weight``, via ``gguf.TensorNameMap``), and the rows of
``attn_q``/``attn_k`` are permuted as llama.cpp's ``convert_hf_to_gguf.py`` does for its rotary layout: a row
permutation moves whole rows, each with its blocks of 32 inputs, so the codes and scales move unchanged.

The hyper-parameters come from the model's Hugging Face config; the tokenizer and the ``general.*`` metadata
are copied from `source_gguf`, a GGUF of the same model (e.g. the one it was loaded from, or one written by
llama.cpp's converter). Without it the file holds no vocabulary (``tokenizer.ggml.model = "no_vocab"``):
transformers loads it, llama.cpp runs it on token ids.

The file is written to a temporary name, read back with ``gguf.GGUFReader``, dequantized with
``gguf.quants.dequantize`` and compared with postquant's weights (exact equality, every tensor) before it is
renamed into place: a file that would not hold postquant's model is never left on disk.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from postquant.choices import GridKind
from postquant.errors import ExportError, OutputError, RecipeError, UnsupportedModelError
from postquant.grids.gguf import FORMATS, GGUFGrid, gguf_grid_kind
from postquant.io.gguf_blocks import pack_blocks
from postquant.model import dynamic_input_layers, quantized_embeddings, quantized_layers
from postquant.nn import QuantizedLayer
from postquant.store.files import write_atomic

__all__ = ["EXPORTABLE_TYPES", "FloatType", "GGUFExport", "GGUFMismatchError", "export_gguf", "verify_gguf"]

log = logging.getLogger(__name__)

EXPORTABLE_TYPES = tuple(fmt.ggml_name for fmt in FORMATS.values())  # ("Q8_0", "Q4_0", "Q4_1")
_SUPPORTED_MODELS = (
    "LlamaForCausalLM (Hugging Face model_type 'llama': Llama 2/3 without rope scaling, SmolLM2, TinyLlama)"
)


class GGUFMismatchError(UnsupportedModelError):
    """A written GGUF file, read back, does not hold postquant's weights exactly (nothing is left on disk)."""


class FloatType(enum.StrEnum):
    """How a tensor that postquant did not quantize is stored."""

    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"  # llama.cpp's reference Q8_0 (token embedding only)


def _float_type(value: FloatType | str) -> FloatType:
    try:
        return FloatType(value)
    except ValueError:
        known = ", ".join(t.value for t in FloatType)
        raise RecipeError(f"unknown GGUF float type {value!r}; known: {known}") from None


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, each tensor's GGML type, its size and the verification."""

    path: Path
    tensor_types: dict[str, str] = field(default_factory=dict)  # gguf name -> GGML type name
    file_bytes: int = 0
    file_type: str = ""  # general.file_type, e.g. "MOSTLY_Q4_0"
    verified_tensors: int = 0
    seconds: float = 0.0


@dataclass
class _Tensor:
    """One tensor to write: the array the writer takes, its GGML type, and the float32 weight it must hold."""

    name: str
    data: np.ndarray  # float32/float16 values, or uint8 blocks (rows, bytes)
    ggml_type: str  # "F32", "F16", "Q8_0", "Q4_0", "Q4_1"
    expected: np.ndarray  # float32, llama.cpp's row layout (rows, inputs)


# ----------------------------------------------------------------------------------------------- checks


def _check_model(qmodel: nn.Module) -> Any:
    """The model's config if it is a Llama causal LM llama.cpp's ``llama`` architecture runs; else raise."""
    config = getattr(qmodel, "config", None)
    model_type = getattr(config, "model_type", None)
    if type(qmodel).__name__ != "LlamaForCausalLM" or model_type != "llama":
        raise UnsupportedModelError(
            f"GGUF export supports {_SUPPORTED_MODELS}; got {type(qmodel).__name__}"
            + (f" (model_type {model_type!r})" if model_type else "")
            + ". Export other models with postquant.io.save or export_onnx"
        )
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention/MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (llama.cpp's llama runs SiLU)")
    rope_type = _rope(config)[1]
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling {rope_type!r}")
    if problems:
        raise UnsupportedModelError(
            f"this Llama has {', '.join(problems)}, which the GGUF export does not write; supported: "
            f"{_SUPPORTED_MODELS}"
        )
    return config


def _rope(config: Any) -> tuple[float, str | None]:
    """(rope theta, rope type) from a transformers 4 (``rope_theta``, ``rope_scaling``) or 5 config."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(theta), kind


def _check_target(out_path: Path, overwrite: bool) -> None:
    if out_path.is_dir():
        raise OutputError(
            f"{out_path} is a directory; give the GGUF file's path, e.g. {out_path / 'model.gguf'}"
        )
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out_path} exists; pass overwrite=True (CLI --overwrite) to replace it")
    if not out_path.parent.is_dir():
        raise OutputError(f"the folder {out_path.parent} does not exist; create it first")


def _check_type(qmodel: nn.Module, kind: GridKind) -> None:
    """Raise a `RecipeError` naming the quantized layers that are not of GGUF grid `kind`."""
    other = {n: layer.grid_config.kind.value for n, layer in quantized_layers(qmodel).items()}
    other = {n: k for n, k in other.items() if k != kind.value}
    if other:
        shown = ", ".join(f"{n} ({k})" for n, k in list(other.items())[:4]) + (
            ", ..." if len(other) > 4 else ""
        )
        raise RecipeError(
            f"{len(other)} layers are not {FORMATS[kind].ggml_name}: {shown}; quantize with grid: {kind.value} "
            "and no other w_bits per layer, or export without a type to keep the mix (llama.cpp runs it)"
        )


def _layer_grid(name: str, layer: QuantizedLayer) -> GGUFGrid:
    """The layer's GGUF grid, or an error naming the layer, why, and what to do."""
    grid = layer.grid
    if not isinstance(grid, GGUFGrid):
        cfg = layer.grid_config
        raise UnsupportedModelError(
            f"layer {name!r} is quantized on a {cfg.kind.value} grid ({cfg.bits}-bit, {cfg.granularity.value}"
            + (f" {cfg.group_size}" if cfg.granularity.value == "group" else "")
            + f"), which no llama.cpp type stores exactly; the GGUF export writes {', '.join(EXPORTABLE_TYPES)}: "
            "quantize with the recipe field grid: gguf-q4_0, gguf-q4_1 or gguf-q8_0 (CLI --grid)"
        )
    if layer.act_quant is not None:
        raise UnsupportedModelError(
            f"layer {name!r} quantizes its input ({layer.act_quant.bits}-bit): llama.cpp runs weight-only "
            "quantized models, so the file would not compute what postquant simulates; quantize with a_bits: null"
        )
    if getattr(layer.inner, "bias", None) is not None:
        raise UnsupportedModelError(
            f"layer {name!r} has a bias, which llama.cpp's llama architecture has not"
        )
    return grid


# ------------------------------------------------------------------------------------------- tensors


def rotary_row_order(rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives ``attn_q`` (``n_head`` heads) and ``attn_k`` (the KV heads).

    Within each head, Hugging Face keeps the two rotary halves apart (``rotate_half``); llama.cpp interleaves
    them: GGUF row ``i`` is Hugging Face row ``order[i]``.
    """
    dim = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, dim).transpose(1, 2).reshape(rows)


def _quantized_tensor(
    name: str, layer_name: str, layer: QuantizedLayer, order: torch.Tensor | None
) -> _Tensor:
    grid = _layer_grid(layer_name, layer)
    fmt = grid.format
    codes = layer.codes.detach().cpu().to(torch.int32)  # (OC, IC)
    out_ch = codes.shape[0]
    blocks = codes.reshape(-1, 32)  # (OC*IC/32, 32), one grid row per block
    scale = grid.scale.detach().cpu().reshape(out_ch, -1)  # (OC, IC/32)
    offset = grid.offset.detach().cpu().reshape(out_ch, -1)
    expected = layer.weight.detach().cpu().float()  # (OC, IC): the weight postquant's model computes with
    packed = pack_blocks(blocks, scale.reshape(-1), offset.reshape(-1), fmt.kind).reshape(out_ch, -1)
    if order is not None:
        packed, expected = packed[order.numpy()], expected[order]
    return _Tensor(name, np.ascontiguousarray(packed), fmt.ggml_name, expected.numpy())


def _float_tensor(name: str, weight: torch.Tensor, kind: FloatType, order: torch.Tensor | None) -> _Tensor:
    w = weight.detach().cpu().float()
    if order is not None:
        w = w[order]
    values = w.numpy()
    if kind is FloatType.F32:
        return _Tensor(name, np.ascontiguousarray(values), "F32", values)
    if kind is FloatType.F16:
        if np.abs(values).max(initial=0.0) > 65504:
            raise UnsupportedModelError(f"{name} holds values beyond fp16's range; export it as f32")
        half = values.astype(np.float16)
        return _Tensor(name, np.ascontiguousarray(half), "F16", half.astype(np.float32))
    from gguf import GGMLQuantizationType, quants  # optional dependency (extra: gguf)

    if values.ndim != 2 or values.shape[1] % 32:
        raise UnsupportedModelError(f"{name} of shape {values.shape} cannot be stored as Q8_0 (rows of 32)")
    blocks = quants.quantize(values, GGMLQuantizationType.Q8_0)
    return _Tensor(name, blocks, "Q8_0", quants.dequantize(blocks, GGMLQuantizationType.Q8_0))


def _collect_tensors(
    qmodel: nn.Module, config: Any, float_type: FloatType, embedding_type: FloatType
) -> list[_Tensor]:
    """Every tensor of the GGUF file, in the model's order, named as llama.cpp names them."""
    import gguf  # optional dependency (extra: gguf)

    n_blocks = int(config.num_hidden_layers)
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, n_blocks)
    qlayers = quantized_layers(qmodel)
    tied = _tied_output(qmodel)
    out: list[_Tensor] = []
    for key, value in _float_state(qmodel, list(qlayers)).items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        out.append(_named_tensor(names, key, value, None, float_type, embedding_type, n_head, n_kv))
    for name, layer in qlayers.items():
        out.append(
            _named_tensor(names, f"{name}.weight", None, layer, float_type, embedding_type, n_head, n_kv)
        )
    order = {n: i for i, n in enumerate(_weight_order(qmodel))}
    return sorted(out, key=lambda t: order.get(t.name, len(order)))


def _named_tensor(
    names: Any,
    key: str,
    value: torch.Tensor | None,
    layer: QuantizedLayer | None,
    float_type: FloatType,
    embedding_type: FloatType,
    n_head: int,
    n_kv: int,
) -> _Tensor:
    gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UnsupportedModelError(f"tensor {key!r} has no llama.cpp name; the GGUF export cannot place it")
    order = None
    rows = layer.codes.shape[0] if layer is not None else (value.shape[0] if value is not None else 0)
    if gguf_name.endswith("attn_q.weight"):
        order = rotary_row_order(rows, n_head)
    elif gguf_name.endswith("attn_k.weight"):
        order = rotary_row_order(rows, n_kv)
    if layer is not None:
        return _quantized_tensor(gguf_name, key.removesuffix(".weight"), layer, order)
    assert value is not None
    if value.dim() == 1:  # norms
        return _float_tensor(gguf_name, value, FloatType.F32, None)
    if gguf_name == "token_embd.weight":
        return _float_tensor(gguf_name, value, embedding_type, None)
    return _float_tensor(gguf_name, value, float_type, order)


def _float_state(qmodel: nn.Module, qnames: list[str]) -> dict[str, torch.Tensor]:
    """The model's persistent tensors outside its quantized layers (embeddings, norms, float Linears)."""
    inside = tuple(f"{n}." for n in qnames)
    return {k: v for k, v in qmodel.state_dict().items() if not k.startswith(inside)}


def _weight_order(qmodel: nn.Module) -> list[str]:
    """llama.cpp names of the model's weights in registration order (the file's tensor order)."""
    import gguf  # optional dependency (extra: gguf)

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, int(qmodel.config.num_hidden_layers))
    keys = [
        f"{n}.weight"
        for n, m in qmodel.named_modules()
        if hasattr(m, "weight") or isinstance(m, QuantizedLayer)
    ]
    return [g for k in keys if (g := names.get_name(k, try_suffixes=(".weight",))) is not None]


def _tied_output(qmodel: nn.Module) -> bool:
    """Whether ``lm_head`` is the float embedding itself (then no ``output.weight`` is written)."""
    head = getattr(qmodel, "lm_head", None)
    embed = qmodel.get_input_embeddings()
    return isinstance(head, nn.Linear) and head.weight is embed.weight


# ------------------------------------------------------------------------------------------- metadata


_OWN_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "llama.")


def _hparams(config: Any) -> dict[str, tuple[Any, str]]:
    """llama.* keys from the Hugging Face config: value and GGUF value type."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, _ = _rope(config)
    hp: dict[str, tuple[Any, str]] = {
        "llama.context_length": (int(config.max_position_embeddings), "UINT32"),
        "llama.embedding_length": (int(config.hidden_size), "UINT32"),
        "llama.block_count": (int(config.num_hidden_layers), "UINT32"),
        "llama.feed_forward_length": (int(config.intermediate_size), "UINT32"),
        "llama.attention.head_count": (int(config.num_attention_heads), "UINT32"),
        "llama.attention.head_count_kv": (int(config.num_key_value_heads), "UINT32"),
        "llama.rope.freq_base": (theta, "FLOAT32"),
        "llama.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "FLOAT32"),
        "llama.rope.dimension_count": (int(head_dim), "UINT32"),
        "llama.vocab_size": (int(config.vocab_size), "UINT32"),
    }
    if head_dim * config.num_attention_heads != config.hidden_size:
        hp["llama.attention.key_length"] = (int(head_dim), "UINT32")
        hp["llama.attention.value_length"] = (int(head_dim), "UINT32")
    return hp


def _source_fields(source_gguf: Path, hparams: dict[str, tuple[Any, str]]) -> list[tuple[str, Any, Any, Any]]:
    """The source GGUF's tokenizer and general metadata, after checking it describes the same model."""
    from gguf import GGUFReader, GGUFValueType  # optional dependency (extra: gguf)

    if not source_gguf.is_file():
        raise OutputError(f"source GGUF {source_gguf} does not exist")
    try:
        reader = GGUFReader(source_gguf)
    except Exception as exc:  # the gguf package raises ValueError, struct errors, ... on a bad file
        raise UnsupportedModelError(f"cannot read the source GGUF {source_gguf}: {exc}") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "llama":
        raise UnsupportedModelError(
            f"source GGUF {source_gguf} is not a llama model; give the model's own GGUF"
        )
    differ = []
    for key, (value, _) in hparams.items():
        f = reader.fields.get(key)
        if f is not None and not np.isclose(float(f.contents()), float(value), rtol=1e-6):
            differ.append(f"{key} {f.contents()} (model: {value})")
    if differ:
        raise UnsupportedModelError(
            f"source GGUF {source_gguf} describes another model: {'; '.join(differ)}; give this model's GGUF"
        )
    out = []
    for key, f in reader.fields.items():
        if key.startswith(_OWN_KEYS):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out


def _file_type(tensors: list[_Tensor]) -> str:
    """general.file_type: the type of most quantized weights (by bytes), else all F32 / mostly F16."""

    weights = Counter({t.ggml_type: 0 for t in tensors})
    for t in tensors:
        if t.name != "token_embd.weight":
            weights[t.ggml_type] += t.expected.size
    quantized = {k: v for k, v in weights.items() if k in EXPORTABLE_TYPES and v}
    if quantized:
        return f"MOSTLY_{max(quantized, key=quantized.__getitem__)}"
    return "MOSTLY_F16" if weights.get("F16") else "ALL_F32"


# ------------------------------------------------------------------------------------------- writing


def _write(
    path: str,
    tensors: list[_Tensor],
    hparams: dict[str, tuple[Any, str]],
    copied: list[tuple[str, Any, Any, Any]],
    file_type: str,
) -> None:
    import gguf  # optional dependency (extra: gguf)

    writer = gguf.GGUFWriter(path, "llama")
    try:
        for key, (value, vtype) in hparams.items():
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
        if file_type.startswith("MOSTLY_Q"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if not copied:
            writer.add_tokenizer_model("no_vocab")
        for key, value, vtype, sub in copied:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in tensors:
            raw = None if t.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[t.ggml_type]
            writer.add_tensor(t.name, t.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def verify_gguf(path: str | Path, tensors: dict[str, np.ndarray]) -> int:
    """Read `path` back with ``gguf.GGUFReader``, dequantize every tensor with ``gguf.quants.dequantize`` and
    compare it with `tensors` (name -> float32 weight in llama.cpp's row layout): exact equality.

    Returns:
        The number of tensors compared.

    Raises:
        GGUFMismatchError: a tensor is missing, extra, of another shape, or differs in any value.
    """
    from gguf import GGUFReader, quants  # optional dependency (extra: gguf)

    reader = GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        want = tensors.get(t.name)
        if want is None:
            raise GGUFMismatchError(f"{path} holds an unexpected tensor {t.name!r}")
        got = quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if not np.array_equal(got, want):
            bad = int((got != want).sum())
            raise GGUFMismatchError(
                f"{t.name} ({t.tensor_type.name}) read back from {path} differs from postquant's weights in "
                f"{bad} of {want.size} values (max |diff| {float(np.abs(got - want).max()):.3g})"
            )
        seen.add(t.name)
    missing = set(tensors) - seen
    if missing:
        raise GGUFMismatchError(f"{path} lacks the tensors {sorted(missing)}")
    return len(seen)


def export_gguf(
    qmodel: nn.Module,
    out_path: str | Path,
    *,
    source_gguf: str | Path | None = None,
    overwrite: bool = False,
    float_type: FloatType | str = FloatType.F16,
    embedding_type: FloatType | str = FloatType.F16,
    verify: bool = True,
    expect_type: str | None = None,
) -> GGUFExport:
    """Write a Llama causal LM quantized on GGUF grids (or a float one) as a GGUF file for llama.cpp.

    Args:
        qmodel: a ``transformers`` ``LlamaForCausalLM``, as `postquant.quantize` returns it (layers on
            ``grid: gguf-q4_0 | gguf-q4_1 | gguf-q8_0``, weight-only) or float.
        out_path: the ``.gguf`` file to write (its folder must exist).
        source_gguf: a GGUF of the same model whose tokenizer and ``general.*`` metadata are copied
            (its hyper-parameters must agree with the model's config). None: no vocabulary in the file.
        overwrite: replace an existing `out_path`.
        float_type: how Linear layers left float are stored: ``f16`` or ``f32``.
        embedding_type: the token embedding: ``f16``, ``f32`` or ``q8_0`` (llama.cpp's reference Q8_0).
        verify: read the file back and check every tensor equals postquant's weights exactly before
            renaming it into place (`verify_gguf`).
        expect_type: the GGUF type the quantized layers must have (``q4_0``, ``q4_1``, ``q8_0``; the CLI's
            ``--type``): a `RecipeError` names the layers of another type. None: whatever they are.

    Returns:
        A `GGUFExport`: the path, each tensor's GGML type, the file size and the verification count.

    Raises:
        UnsupportedModelError: not a supported Llama, a layer on a grid llama.cpp cannot store exactly, input
            quantizers or biases; `ExportError` (a subclass) for quantized embedding tables (recipe
            ``embeddings``) and dynamic per-token input quantizers (the message names the layers).
        OutputError: `out_path` exists (without `overwrite`), is a folder, or its folder is missing.
        RecipeError: `expect_type` is not a supported type, or layers have another one.
        GGUFMismatchError: the file read back differs (nothing is written then).
    """
    start = time.perf_counter()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UnsupportedModelError(
            "GGUF export needs the gguf package: pip install 'postquant[gguf]' (or pip install gguf)"
        ) from None
    out_path = Path(out_path)
    float_type, embedding_type = _float_type(float_type), _float_type(embedding_type)
    if float_type is FloatType.Q8_0:
        raise RecipeError(
            "float_type q8_0 would quantize the float Linears by llama.cpp's rule, not postquant's: quantize "
            "them with grid: gguf-q8_0 (or w_bits: 8 per layer), or use float_type f16 or f32"
        )
    config = _check_model(qmodel)
    dynamic = dynamic_input_layers(qmodel)
    if dynamic:
        raise ExportError(
            f"{len(dynamic)} layers quantize their inputs per token at run time (act_ranges: dynamic): "
            f"{', '.join(list(dynamic)[:4])}{', ...' if len(dynamic) > 4 else ''}. A GGUF file stores weights "
            "only: llama.cpp quantizes activations by its own rule (per block of 32 values, for its dot "
            "products), not per token, so the file would not compute what postquant simulates; quantize with "
            "a_bits: null for llama.cpp, or export with export_compressed_tensors"
        )
    tables = quantized_embeddings(qmodel)
    if tables:
        raise ExportError(
            f"embedding {next(iter(tables))!r} is quantized (recipe embeddings): the GGUF export writes the token "
            "embedding from a float table (embedding_type f16, f32 or q8_0 by llama.cpp's rule), not from "
            "postquant's codes; quantize without the recipe's embeddings and pass embedding_type='q8_0', or "
            "export with postquant.io.save / export_onnx"
        )
    _check_target(out_path, overwrite)
    if expect_type is not None:
        _check_type(qmodel, gguf_grid_kind(expect_type))
    hparams = _hparams(config)
    copied = _source_fields(Path(source_gguf), hparams) if source_gguf is not None else []
    if source_gguf is None:
        log.warning(
            "no source GGUF given: %s has no vocabulary; llama.cpp can run it on token ids only", out_path
        )
    with torch.no_grad():
        tensors = _collect_tensors(qmodel, config, float_type, embedding_type)
    file_type = _file_type(tensors)
    result = GGUFExport(out_path, {t.name: t.ggml_type for t in tensors}, file_type=file_type)

    def write(tmp: str) -> None:
        _write(tmp, tensors, hparams, copied, file_type)
        if verify:
            result.verified_tensors = verify_gguf(tmp, {t.name: t.expected for t in tensors})

    write_atomic(out_path, write)
    result.file_bytes = out_path.stat().st_size
    result.seconds = time.perf_counter() - start
    log.info(
        "wrote %s (%s, %d tensors, %.1f MB%s) in %.1f s",
        out_path,
        file_type,
        len(tensors),
        result.file_bytes / 1e6,
        f", {result.verified_tensors} verified bit for bit" if verify else "",
        result.seconds,
    )
    return result
