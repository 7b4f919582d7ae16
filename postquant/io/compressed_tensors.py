"""compressed-tensors checkpoints: the format llm-compressor writes and Hugging Face transformers and vLLM load.

`export_compressed_tensors` writes a directory that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads
when the PyPI ``compressed-tensors`` package is installed:

* ``config.json``: the model's config plus ``quantization_config`` (``quant_method: compressed-tensors``,
  ``format: pack-quantized``, ``quantization_status: compressed``) with one config group per distinct layer
  scheme (weight bits, symmetric or not, groups of ``g`` inputs / output channels / whole tensor, and the input
  quantizer if any), so a mixed-precision model keeps every layer's bit width. A scheme shared by every
  quantized layer targets ``Linear``; with several schemes each group lists its layers by name. ``ignore`` lists
  the Linear layers that stayed float (``lm_head``...).
* ``model.safetensors``: per quantized Linear ``<name>``: ``<name>.weight_packed`` (int32 (OC, ceil(IC*b/32)),
  the codes), ``<name>.weight_scale`` ((OC, IC/g) per group, (OC, 1) per channel, (1,) per tensor, in the
  model's float dtype), ``<name>.weight_zero_point`` (asymmetric schemes only: packed like the codes along the
  output channels, int32 (ceil(OC*b/32), G); int8 (1,) per tensor), ``<name>.weight_shape`` (int64 [OC, IC]),
  ``<name>.input_scale`` / ``<name>.input_zero_point`` for an input quantizer; every other tensor (embeddings,
  norms, biases, float layers) in float under its usual name, tied tensors once.
* the tokenizer files, chat template and generation config of the source model.

**Mapping.** postquant's weight grid is ``w = (q + Z) / S`` with signed codes ``q`` in ``[-2^(b-1), 2^(b-1)-1]``
(`postquant.grids.uniform`); compressed-tensors dequantizes ``(q - zp) * scale`` with codes in the same signed
range. So the codes are stored as they are, ``zp = -Z`` and ``scale = 1/S``. Both formats pack the *unsigned*
code ``u = q + 2^(b-1)``: compressed-tensors' packing is the little-endian bit stream of `pack_codes` cut into
int32 words, each row padded to a multiple of 32 codes (`pack_int32`). A zero point is packed with the codes'
bit width, so ``-Z`` must lie in the signed b-bit range: it does for every min/max or MSE grid whose range
contains 0 (``Z = round(S*lo) + 2^(b-1)``, ``S*lo`` in ``[-(2^b-1), 0]``); a layer with a group whose weights
all have one sign is refused (symmetric grids have ``Z = 0``). An input quantizer (postquant's static per-tensor
``ActQuantizer``) is a static per-tensor ``input_activations`` scheme: same scale, and unsigned codes
``[0, 2^b-1]`` become signed ones with ``zp - 2^(b-1)``, which dequantize to the same values. A dynamic
per-token input quantizer (``act_ranges: dynamic``, `DynamicActQuantizer`) is ``input_activations`` with
``strategy: token, dynamic: true, symmetric: true`` and no stored tensor: vLLM's int8 kernels compute its
step as postquant does (``absmax / 127``); compressed-tensors' own fake quantization in transformers uses
``absmax / 127.5`` and codes ``[-128, 127]``, which `verify_compressed_tensors` accounts for.

**Exactness.** The consumer multiplies by ``scale = fl(1/S)`` (the model's float dtype) where postquant divides
by ``S``: for a float32 model each dequantized weight ``fl((q + Z) * fl(1/S))`` is within one float32 ulp of
postquant's ``fl((q + Z) / S)`` (``|(q+Z) fl(1/S) - (q+Z)/S| <= 2^-24 |(q+Z)/S|``, at most half an ulp, so the
two round to the same or adjacent floats; about 9 in 10 weights are bit-identical). A half-precision model's
consumer holds the scale in its own dtype (compressed-tensors sizes ``weight_scale`` like the weight), so there
the weights agree to that dtype's rounding. Grids without this affine form (power grids, exponent < 1), convs
and other non-Linear layers (compressed-tensors quantizes ``nn.Linear`` only) are refused with `ExportError`.

**Consumers.** transformers 5.x with compressed-tensors 0.20 has two routes (`transformers_route`). Its
default one builds every layer's scheme and decompresses on the first forward: it loads symmetric schemes,
mixed precision and input quantizers, but not asymmetric per-group/per-channel weights (a size mismatch on the
packed ``weight_zero_point``, for compressed-tensors' own asymmetric checkpoints too). Its
``CompressedTensorsConfig(dequantize=True)`` route loads asymmetric weights but applies the first config
group's scheme to every layer and drops input quantizers. So an asymmetric export verifies in transformers
when it has one weight-only scheme; asymmetric mixed precision, or asymmetric weights with input quantizers,
is written but cannot be verified there (`verify_compressed_tensors` says so; ``symmetric=True`` avoids it).
vLLM's weight-only kernels take 4- and 8-bit ``pack-quantized`` weights; other bit widths load in
transformers. For 2, 4 and 8 bits, 32/b codes fill an int32 word exactly, so every word-wise packing agrees;
3, 5, 6 and 7 bits follow compressed-tensors 0.20's dense packing (codes cross word boundaries).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from postquant.choices import Granularity, GridKind
from postquant.errors import ExportError, ExportMismatchError, OutputError
from postquant.io.hf_check import (
    CONFIG_FILE,
    CT_VERSION,
    ConsumerCheck,
    model_dtype,
    transformers_route,
    verify_compressed_tensors,
)
from postquant.io.pack import pack_codes
from postquant.model import quantized_embeddings, quantized_layers
from postquant.nn import DynamicActQuantizer, QuantizedLayer
from postquant.store.files import replace_dir

__all__ = [
    "CompressedTensorsExport",
    "ConsumerCheck",
    "LayerScheme",
    "export_compressed_tensors",
    "layer_scheme",
    "pack_int32",
    "transformers_route",
    "verify_compressed_tensors",
]

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
TENSORS_FILE = "model.safetensors"
# Files copied from a source model directory: tokenizer, chat template, generation defaults.
SOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


# ----------------------------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class LayerScheme:
    """One config group: how a layer's weights (and input) are quantized, in compressed-tensors' terms."""

    bits: int
    symmetric: bool
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None = None
    input_bits: int | None = None  # an input quantizer: static per-tensor, or dynamic per-token
    input_symmetric: bool = True
    input_dynamic: bool = False

    def config(self, targets: list[str]) -> dict[str, Any]:
        """The config group: ``targets``, ``weights`` and ``input_activations`` (or None)."""
        weights: dict[str, Any] = {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size,
            "dynamic": False,
            "actorder": None,
        }
        inputs = None
        if self.input_bits is not None:
            inputs = {
                "num_bits": self.input_bits,
                "type": "int",
                "symmetric": self.input_symmetric,
                "strategy": "token" if self.input_dynamic else "tensor",
                "group_size": None,
                "dynamic": self.input_dynamic,
            }
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": inputs,
            "output_activations": None,
            "format": FORMAT,
        }

    def describe(self) -> str:
        """``W4 asym g64``, ``W8 sym channel A8 asym``..."""
        where = {"group": f"g{self.group_size}", "channel": "channel", "tensor": "tensor"}[self.strategy]
        text = f"W{self.bits} {'sym' if self.symmetric else 'asym'} {where}"
        if self.input_bits is not None:
            text += f" A{self.input_bits} {'sym' if self.input_symmetric else 'asym'}"
            text += " token dynamic" if self.input_dynamic else ""
        return text


def _uniform_grid_tensors(name: str, layer: QuantizedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, Z)`` of the layer's grid, each (G, 1) float64; `ExportError` for a grid without an affine form."""
    kind = layer.grid_config.kind
    s = layer.grid_inv_scale.detach().double()
    z = layer.grid_zero_point.detach().double()
    if kind is GridKind.POWER:
        exponent = layer.get_buffer("grid_exponent")
        max_abs = layer.get_buffer("grid_max_abs")
        if not (bool((exponent == 1).all()) and bool((max_abs == 1).all())):
            raise ExportError(
                f"layer {name!r}: a power grid (exponent {float(exponent.reshape(-1)[0]):.2f}) has no "
                "compressed-tensors form: the format dequantizes (q - zero_point) * scale, an affine grid. "
                "Quantize with grid: uniform (CLI --grid uniform), or keep the layer float with ignore=[...]"
            )
    elif kind is not GridKind.UNIFORM:
        raise ExportError(f"layer {name!r}: grid kind {kind!r} has no compressed-tensors form")
    if not torch.equal(z, z.round()):
        raise ExportError(f"layer {name!r}: its grid's zero points are not integers; quantize it again")
    return s, z


def layer_scheme(name: str, layer: QuantizedLayer) -> LayerScheme:
    """The compressed-tensors scheme of a quantized layer, or `ExportError` naming the layer and why."""
    if not isinstance(layer.inner, nn.Linear):
        raise ExportError(
            f"layer {name!r} is a quantized {type(layer.inner).__name__}: compressed-tensors quantizes "
            "nn.Linear layers only; keep it float with ignore=[...]"
        )
    _, z = _uniform_grid_tensors(name, layer)
    bits = layer.bits
    strategy = {Granularity.GROUP: "group", Granularity.CHANNEL: "channel", Granularity.TENSOR: "tensor"}[
        layer.grid_config.granularity
    ]
    symmetric = bool((z == 0).all())
    zp = -z
    lo, hi = (-128, 127) if strategy == "tensor" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    outside = int(((zp < lo) | (zp > hi)).sum())
    if outside:
        raise ExportError(
            f"layer {name!r}: {outside} of its {zp.numel()} zero points -Z lie outside [{lo}, {hi}], which "
            f"compressed-tensors stores {bits}-bit zero points in (groups whose weights all have one sign). "
            "Quantize with symmetric=True, or keep the layer float with ignore=[...]"
        )
    group_size = layer.grid_config.group_size if strategy == "group" else None
    act = layer.act_quant
    if act is None:
        return LayerScheme(bits, symmetric, strategy, group_size)
    if isinstance(act, DynamicActQuantizer):
        return LayerScheme(bits, symmetric, strategy, group_size, act.bits, True, input_dynamic=True)
    return LayerScheme(bits, symmetric, strategy, group_size, act.bits, _input_zero_point(act) == 0)


def _input_zero_point(act: nn.Module) -> int:
    """The signed zero point of an `ActQuantizer`: unsigned codes [0, 2^b - 1] shift by -2^(b-1)."""
    zp = int(act.zero_point.item())
    return zp - 2 ** (act.bits - 1) if act.qmin == 0 else zp


# ----------------------------------------------------------------------------------------------- tensors


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed b-bit codes row by row into int32 words, as compressed-tensors' ``pack-quantized`` does.

    Row ``r`` is the little-endian bit stream of its unsigned codes ``q + 2^(b-1)`` (code ``i`` at bits
    ``b*i .. b*i + b - 1``, `pack_codes`), padded with zero bits to whole words and cut to ``ceil(C*b/32)`` words.

    Args:
        codes: integer codes (R, C) in ``[-2^(b-1), 2^(b-1) - 1]``.
        bits: 2..8.

    Returns:
        int32 (R, ceil(C * bits / 32)).
    """
    rows, cols = codes.shape
    padded = math.ceil(cols / 32) * 32  # 32 codes of b bits are exactly b words: rows stay word-aligned
    full = torch.full((rows, padded), -(2 ** (bits - 1)), dtype=torch.int16)  # pads to unsigned code 0
    full[:, :cols] = codes.to(torch.int16)
    stream = pack_codes(full.cpu(), bits).numpy()  # (rows * padded * bits / 8,) uint8
    words = stream.view("<i4").astype(np.int32).reshape(rows, -1)  # little-endian words, native int32
    return torch.from_numpy(np.ascontiguousarray(words[:, : math.ceil(cols * bits / 32)]))


def _layer_tensors(
    name: str, layer: QuantizedLayer, scheme: LayerScheme, dtype: torch.dtype
) -> dict[str, Any]:
    """The safetensors entries of one quantized Linear (see the module docstring)."""
    s, z = _uniform_grid_tensors(name, layer)
    codes = layer.codes.detach().cpu()  # (OC, IC) int8
    out_features, in_features = codes.shape
    shape = {"group": (out_features, -1), "channel": (out_features, 1), "tensor": (1,)}[scheme.strategy]
    scale = (1.0 / s).reshape(shape).to(dtype).cpu()  # scale = 1/S
    zp = (-z).reshape(shape).cpu()  # zero point = -Z
    tensors: dict[str, Any] = {
        f"{name}.weight_packed": pack_int32(codes, scheme.bits),
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not scheme.symmetric:
        if scheme.strategy == "tensor":
            tensors[f"{name}.weight_zero_point"] = zp.to(torch.int8)
        else:  # packed along the output channels: (ceil(OC * b / 32), G)
            tensors[f"{name}.weight_zero_point"] = pack_int32(zp.t(), scheme.bits).t().contiguous()
    act = layer.act_quant
    if act is not None and not scheme.input_dynamic:  # a dynamic input has no stored scale
        tensors[f"{name}.input_scale"] = act.scale.detach().reshape(1).to(dtype).cpu()
        if not scheme.input_symmetric:
            tensors[f"{name}.input_zero_point"] = torch.tensor([_input_zero_point(act)], dtype=torch.int8)
    return tensors


def _float_tensors(qmodel: nn.Module, qlayers: dict[str, QuantizedLayer]) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict outside the quantized layers' weights, in float naming.

    A quantized layer keeps its float module's other tensors (``<name>.inner.bias`` is saved as ``<name>.bias``).
    """
    out: dict[str, torch.Tensor] = {}
    prefixes = {f"{name}.": name for name in qlayers}
    for key, t in qmodel.state_dict(keep_vars=True).items():
        layer = next((n for p, n in prefixes.items() if key.startswith(p)), None)
        if layer is None:
            out[key] = t
        elif key.startswith(f"{layer}.inner."):
            out[f"{layer}.{key.removeprefix(f'{layer}.inner.')}"] = t
    return out


# ------------------------------------------------------------------------------ the model transformers builds


def _check_hf_model(qmodel: nn.Module) -> None:
    try:
        from transformers import PreTrainedModel  # optional dependency (the hf extra)
    except ImportError:  # then the model cannot be one
        PreTrainedModel = ()

    if not isinstance(qmodel, PreTrainedModel):
        raise ExportError(
            f"compressed-tensors export needs a Hugging Face transformers model (a PreTrainedModel with a config), "
            f"not {type(qmodel).__name__}: the consumer rebuilds the model from config.json. Quantize a model "
            "loaded with transformers' from_pretrained, or use postquant.io.save / export_onnx for this model"
        )


def _export_config(qmodel: nn.Module, dtype: torch.dtype) -> Any:
    """A copy of the model's config for the export: no previous quantization_config, the class and dtype set."""
    config = copy.deepcopy(qmodel.config)
    if getattr(config, "quantization_config", None) is not None:
        method = getattr(
            config.quantization_config, "quant_method", type(config.quantization_config).__name__
        )
        log.info("the export's config drops the model's own quantization_config (%s)", method)
        del config.quantization_config
    config.architectures = [type(qmodel).__name__]
    config.dtype = dtype
    return config


def _skeleton(qmodel: nn.Module, config: Any) -> nn.Module:
    """The consumer's model built from `config` on the meta device (no memory): names, classes, tied weights."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(qmodel)(copy.deepcopy(config))


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name one tensor (tied weights), in state-dict order, groups of two or more."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _untie_if_needed(qmodel: nn.Module, config: Any, skeleton: nn.Module, qweights: set[str]) -> nn.Module:
    """The skeleton again with ``tie_word_embeddings`` off when the consumer would tie a quantized weight (a
    quantized ``lm_head`` of a model with tied embeddings: its float embedding and its codes are both stored)."""
    tied = [keys for keys in _tied_groups(skeleton) if qweights & set(keys)]
    if not tied:
        return skeleton
    if getattr(config, "tie_word_embeddings", False):
        log.info(
            "%s: tied, one of them quantized, the other float: the export unties them", " and ".join(tied[0])
        )
        config.tie_word_embeddings = False
        skeleton = _skeleton(qmodel, config)
        tied = [keys for keys in _tied_groups(skeleton) if qweights & set(keys)]
    if tied:
        raise ExportError(
            f"the model ties {', '.join(tied[0])}, one of them quantized: compressed-tensors would load one "
            "tensor for both; keep those layers float with ignore=[...]"
        )
    return skeleton


def _check_layout(
    skeleton: nn.Module, qlayers: dict[str, QuantizedLayer], floats: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The float tensors to write, checked against the consumer's model; `ExportError` where they differ."""
    expected = skeleton.state_dict(keep_vars=True)
    for name, layer in qlayers.items():
        module = skeleton.get_submodule(name) if f"{name}.weight" in expected else None
        if not isinstance(module, nn.Linear):
            what = "has no such layer" if module is None else f"has a {type(module).__name__} there"
            raise ExportError(
                f"layer {name!r}: the Hugging Face model built from the config {what}, and compressed-tensors "
                "quantizes nn.Linear layers only (postquant rebuilds GPT-2's Conv1D as Linear); keep it float "
                "with ignore=[...]"
            )
        if tuple(module.weight.shape) != tuple(layer.codes.shape):
            raise ExportError(
                f"layer {name!r}: weight shape {tuple(layer.codes.shape)} but {tuple(module.weight.shape)} in the "
                "model built from the config; the config does not describe this model"
            )
    aliases = {key for keys in _tied_groups(skeleton) for key in keys[1:]}
    want = {key for key in expected if key not in aliases and key.removesuffix(".weight") not in qlayers}
    extra = [key for key in floats if key not in expected]
    missing = [key for key in want if key not in floats]
    if extra or missing:
        what = f"has {extra[0]!r}" if extra else f"lacks {missing[0]!r}"
        raise ExportError(
            f"the quantized model {what}, unlike the model transformers builds from its config "
            f"({len(extra)} extra, {len(missing)} missing tensors): was its structure changed after loading "
            "(e.g. BatchNorm folding, a replaced module)? Export a model loaded with from_pretrained"
        )
    out = {}
    for key in expected:  # the consumer's order
        if key in want:
            t = floats[key]
            if tuple(t.shape) != tuple(expected[key].shape):
                raise ExportError(
                    f"tensor {key!r}: shape {tuple(t.shape)} but {tuple(expected[key].shape)} in the model built "
                    "from the config"
                )
            out[key] = t.detach().cpu().contiguous()
    return out


def _groups(schemes: dict[str, LayerScheme]) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Config groups (``group_0``... by first use) and the layers of each."""
    members: dict[LayerScheme, list[str]] = {}
    for name, scheme in schemes.items():
        members.setdefault(scheme, []).append(name)
    single = len(members) == 1
    groups, layers = {}, {}
    for i, (scheme, names) in enumerate(members.items()):
        key = f"group_{i}"
        groups[key] = scheme.config(["Linear"] if single else names)
        layers[key] = names
    return groups, layers


def quantization_config(schemes: dict[str, LayerScheme], float_linears: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for layers with `schemes`; `float_linears` are ignored."""
    groups, _ = _groups(schemes)
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": float_linears,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class CompressedTensorsExport:
    """What `export_compressed_tensors` wrote.

    ``bytes``: the directory; ``weights_bytes``: ``model.safetensors``; ``float_bytes``: the same tensors with
    every quantized weight in the model's float dtype (what ``save_pretrained`` of the float model writes,
    headers aside); ``groups``: ``{group name: (scheme, layer names)}``; ``ignore``: the float Linear layers;
    ``check``: the comparison in transformers (None when no inputs were given).
    """

    path: Path
    bytes: int
    weights_bytes: int
    float_bytes: int
    groups: dict[str, tuple[LayerScheme, list[str]]]
    ignore: list[str]
    check: ConsumerCheck | None = None
    files: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """``float_bytes / weights_bytes``."""
        return self.float_bytes / self.weights_bytes


# ------------------------------------------------------------------------------------------------ export


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Raise `OutputError` unless `out_dir` may be written: absent, or (with `overwrite`) an empty directory
    or a model directory (it holds a config.json); never a file or any other directory."""
    if out_dir.is_symlink() or out_dir.is_file():
        raise OutputError(f"{out_dir} exists and is not a directory; choose another output path")
    if not out_dir.exists():
        return
    if not overwrite:
        raise OutputError(
            f"{out_dir} exists; choose another output path or pass overwrite=True (--overwrite)"
        )
    if any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
        shown = ", ".join(sorted(p.name for p in out_dir.iterdir())[:3])
        raise OutputError(
            f"{out_dir} holds {shown}..., not a model directory (no {CONFIG_FILE}): overwrite replaces only a "
            "model directory; choose another output path"
        )


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `out_dir` (an existing one is replaced only with `overwrite`)."""
    _check_target(out_dir, overwrite)
    replace_dir(tmp, out_dir)


def _copy_source(source: Any, directory: Path, qmodel: nn.Module) -> None:
    """Tokenizer files, chat template and generation config: from a directory or a tokenizer object; the
    model's own generation config when it has one and `source` brings none."""
    if source is not None:
        if isinstance(source, str | Path):
            src = Path(source).expanduser()
            if not src.is_dir():
                raise OutputError(
                    f"source {src} is not a directory; pass the float model's directory or its tokenizer"
                )
            copied = [name for name in SOURCE_FILES if (src / name).is_file()]
            for name in copied:
                shutil.copyfile(src / name, directory / name)
            if not copied:
                log.warning(
                    "source %s has no tokenizer or generation files (%s)", src, ", ".join(SOURCE_FILES[:3])
                )
        elif hasattr(source, "save_pretrained"):
            source.save_pretrained(str(directory))
        else:
            raise ExportError(
                f"source is a model directory or a tokenizer (with save_pretrained), not {type(source).__name__}"
            )
    generation = getattr(qmodel, "generation_config", None)
    if generation is not None and not (directory / "generation_config.json").exists():
        generation.save_pretrained(str(directory))


def export_compressed_tensors(
    qmodel: nn.Module,
    out_dir: str | Path,
    *,
    source: Any = None,
    overwrite: bool = False,
    verify_inputs: Any = None,
    tolerance: float | None = None,
    route: str | None = None,
) -> CompressedTensorsExport:
    """Write a quantized Hugging Face model as a compressed-tensors checkpoint, checked in transformers.

    The directory is written beside `out_dir` under a temporary name, verified there, then renamed: an error or
    an interruption at any point leaves nothing at `out_dir` (and no temporary directory).

    Args:
        qmodel: a model returned by `postquant.quantize` from a transformers ``PreTrainedModel``.
        out_dir: the directory to create.
        source: the float model's directory (its tokenizer files, chat template and generation config are
            copied) or a tokenizer object (saved with ``save_pretrained``); None: only the model's generation
            config.
        overwrite: replace an existing `out_dir` (only an empty directory or a model directory).
        verify_inputs: inputs to compare transformers' load of the export with `qmodel` on (see
            `verify_compressed_tensors`): a tensor of token ids, a tokenizer's dict, or a list of those.
            None skips the check.
        tolerance, route: see `verify_compressed_tensors`.

    Returns:
        A `CompressedTensorsExport` (sizes, config groups, ignored layers, the check).

    Raises:
        ExportError: not a transformers model, no quantized layer, a quantized embedding table, or a layer the
            format cannot express (the message names it and why: a power grid, a non-Linear layer, zero points
            outside the stored range).
        OutputError: `out_dir` exists (without `overwrite`) or cannot be written.
        ExportMismatchError: transformers' outputs differ from `qmodel`'s beyond `tolerance`; nothing is written.
    """
    _check_hf_model(qmodel)
    tables = quantized_embeddings(qmodel)
    if tables:
        raise ExportError(
            f"embedding {next(iter(tables))!r} is quantized (recipe embeddings): the compressed-tensors export "
            "writes quantized Linear layers only (its consumers load embeddings as float tables); quantize "
            "without the recipe's embeddings for this format, or export with postquant.io.save / export_onnx"
        )
    out_dir = Path(out_dir).expanduser()
    _check_target(out_dir, overwrite)  # before any work; again before the rename
    qlayers = quantized_layers(qmodel)
    if not qlayers:
        raise ExportError(
            f"{type(qmodel).__name__} has no quantized layer: quantize it with postquant.quantize first (a float "
            "model is saved with save_pretrained)"
        )
    schemes = {name: layer_scheme(name, layer) for name, layer in qlayers.items()}
    dtype = model_dtype(qmodel)
    config = _export_config(qmodel, dtype)
    skeleton = _untie_if_needed(qmodel, config, _skeleton(qmodel, config), {f"{n}.weight" for n in qlayers})
    floats = _check_layout(skeleton, qlayers, _float_tensors(qmodel, qlayers))
    float_linears = [
        name for name, m in skeleton.named_modules() if isinstance(m, nn.Linear) and name not in qlayers
    ]
    tensors: dict[str, torch.Tensor] = dict(floats)
    for name, layer in qlayers.items():
        tensors.update(_layer_tensors(name, layer, schemes[name], dtype))
    qconfig = quantization_config(schemes, float_linears)
    groups, members = _groups(schemes)
    for key, names in members.items():
        log.info("%s: %s on %d layers", key, schemes[names[0]].describe(), len(names))
    if verify_inputs is not None and route is None:
        route = transformers_route(qconfig)  # before writing: an export transformers cannot load fails fast

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(
            f"cannot write to {out_dir}: {exc.strerror or exc}. Choose a writable path"
        ) from exc
    try:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        config_dict = config.to_diff_dict()
        config_dict["quantization_config"] = qconfig
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        _copy_source(source, tmp, qmodel)
        check = None
        if verify_inputs is not None:
            try:
                check = verify_compressed_tensors(
                    qmodel, tmp, verify_inputs, tolerance=tolerance, route=route
                )
            except ExportMismatchError as exc:
                raise ExportMismatchError(f"{exc} Nothing was written to {out_dir}.", exc.metrics) from None
        files = sorted(p.name for p in tmp.iterdir())
        size = sum((tmp / name).stat().st_size for name in files)
        weights_bytes = (tmp / TENSORS_FILE).stat().st_size
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError | SafetensorError):  # e.g. a full disk (safetensors: a SafetensorError)
            raise OutputError(
                f"cannot write {out_dir}: {getattr(exc, 'strerror', None) or exc}; nothing was written there"
            ) from exc
        raise
    float_bytes = sum(t.numel() * t.element_size() for t in floats.values())
    float_bytes += sum(layer.codes.numel() for layer in qlayers.values()) * torch.finfo(dtype).bits // 8
    result = CompressedTensorsExport(
        path=out_dir,
        bytes=size,
        weights_bytes=weights_bytes,
        float_bytes=float_bytes,
        groups={key: (schemes[names[0]], names) for key, names in members.items()},
        ignore=float_linears,
        check=check,
        files=files,
    )
    log.info(
        "exported %s: %d quantized layers in %d config groups, %d float Linear layers; weights %d bytes "
        "(%.2fx smaller than float)",
        out_dir,
        len(qlayers),
        len(groups),
        len(float_linears),
        weights_bytes,
        result.compression,
    )
    return result
