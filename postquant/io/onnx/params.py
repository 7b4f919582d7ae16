"""The ONNX form of a quantized layer's parameters: 8-bit weight codes, their DequantizeLinear, the input QDQ.

A grid's ``w_hat = (q + Z)/S`` is ONNX's ``(q - zp) * scale`` with ``scale = 1/S`` per output channel (axis 0)
and ``zp = -Z``; an input quantizer becomes a ``QuantizeLinear``/``DequantizeLinear`` pair (uint8 when
``qmin == 0``, else int8). Codes of fewer than 8 bits are stored on their own grid and activations of fewer
than 8 bits get a ``Clip`` to their range before the 8-bit quantizer: the low bit width is simulated, the
arithmetic is 8-bit.

Weight storage, one fixed rule whatever CPU exports or runs the model: a layer whose codes all lie in
``[-64, 63]`` (every layer of 7 bits or fewer, and 8-bit layers that do not use the full range) stores int8
codes; any other layer stores uint8 codes ``q + 128`` with zero point ``-Z + 128``, which dequantize to the
same float weights exactly. The reason: onnxruntime runs u8 activations x s8 weights (QLinearConv, QGemm,
MatMulInteger after its QDQ fusion) on x86 CPUs without AVX-512 VNNI with ``vpmaddubsw``, which adds pairs
of u8*s8 products into a *saturating* int16: ``2 * 255 * 127 = 64770 > 32767``. With 7-bit codes a pair is at
most ``2 * 255 * 64 = 32640`` and cannot saturate; u8 x u8 runs on a kernel that widens to int16 before
multiplying and cannot saturate either. Full-range int8 weights gave 25 % top-1 agreement (SQNR 8.9 dB)
with the simulation on an AVX2 CPU for a small W8A8 CNN, uint8 ones 100 % (98 dB), with the same integer
kernels. The alternatives were rejected: 7-bit weights for every layer (onnxruntime's ``reduce_range``)
change the quantized model; uint8 for every layer would move 4- to 7-bit layers off the faster u8 x s8
kernels (VNNI's ``vpdpbusd``) for no gain; choosing by the exporting CPU gives graphs that break on another.
The export result's ``weight_dtypes`` says which storage each layer got. For a known deployment CPU with VNNI
(x86 with AVX-512 VNNI, AVX-VNNI or AMX), ``int8_weights="signed"`` (`Int8Weights`) stores every 8-bit layer
int8: the fast u8 x s8 kernels for full-range W8A8 too, which that CPU computes exactly (``vpdpbusd`` sums
u8*s8 products into int32); on an x86 CPU without VNNI the same file can saturate, so the export warns when
its own CPU lacks VNNI, and its verification (``verify_batches``) measures what that CPU computes.

Grids DequantizeLinear (opset < 21) cannot express directly, per-group grids and zero points outside int8,
are dequantized as rows (one scale per row, an ``Add`` of ``Z/S`` when needed) and reshaped: exact, but the
layer runs in float.

4-bit storage (opset 21, ``plan_layers(qmodel, int4=True)``): a layer whose codes and zero points ``-Z`` all lie
in [-8, 7] (every uniform grid of 4 bits or fewer, but for channels or groups whose weights all have one sign
on an asymmetric grid) stores int4 codes, two to a byte, with opset 21's ``DequantizeLinear``: per tensor,
per output channel (axis 0) or, for groups, ``block_size`` blocks along axis 1 of the (OC, IC*k) codes
(reshaped to a conv's 4-d shape after dequantizing). uint4 is never needed: ``q + 8`` and ``-Z + 8`` fit
[0, 15] exactly when ``q`` and ``-Z`` fit [-8, 7]. The saturation above cannot happen on 4-bit codes (a pair
of u8 x s4 products is at most ``2 * 255 * 8 = 4080``), and onnxruntime 1.32 fuses no int4
``DequantizeLinear`` into QLinearConv/QGemm: an int4 layer runs in float on its dequantized weight (with its
input QDQ, so the same function as the simulation; a small W4A8 CNN went from 2 integer kernels to 0). So
`plan_layers` stores int4 only for layers without an input quantizer (`Int4Weights.WEIGHT_ONLY`, which run in
float whatever their storage) unless asked for every layer (`Int4Weights.ALL`): a W4A8 layer keeps int8 codes
and its integer kernel.

Quantized embedding tables (recipe ``embeddings``) take the same storage rules: their ``DequantizeLinear``
(per row: axis 0; per group: blocks along axis 1 when int4, else rows reshaped) feeds the graph's ``Gather``
(`plan_embeddings`). A lookup has no input quantizer, so a table stores int4 whenever its codes and zero points
fit and ``int4`` is not ``"none"``.
"""

from __future__ import annotations

import enum
import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from postquant.choices import Granularity, GridKind
from postquant.errors import UnsupportedModelError
from postquant.model import quantized_embeddings, quantized_layers
from postquant.nn import QuantizedEmbedding, QuantizedLayer

__all__ = [
    "INT4_CODES",
    "INT8_SAFE_CODES",
    "UINT8_SHIFT",
    "ActQDQ",
    "Int4Weights",
    "LayerQDQ",
    "WeightQDQ",
    "act_qdq",
    "plan_embeddings",
    "plan_layers",
    "weight_qdq",
]

log = logging.getLogger(__name__)

INT8_SAFE_CODES = (-64, 63)  # int8 weight codes u8 x s8 kernels cannot saturate on (see the module docstring)
UINT8_SHIFT = 128  # uint8 storage: codes q + 128, zero point -Z + 128
INT4_CODES = (-8, 7)  # int4 storage (opset 21): codes and zero points in this range
INT4_WHY_FLOAT = (
    "int4 weights: onnxruntime fuses no int4 DequantizeLinear into an integer kernel (int4='weight-only' keeps "
    "int8 codes, and the integer kernel, for layers with an input quantizer)"
)


class Int8Weights(enum.StrEnum):
    """How 8-bit layers whose codes leave [-64, 63] store them (the module docstring says why)."""

    PORTABLE = "portable"  # uint8 q + 128: exact on every CPU, on onnxruntime's slower u8 x u8 kernels
    # int8: the fast u8 x s8 kernels, exact on x86 CPUs with VNNI (and CPUs without vpmaddubsw)
    SIGNED = "signed"


@functools.cache
def _proc_cpuinfo() -> str:
    """``/proc/cpuinfo``, read once per process ("" where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_vnni(cpuinfo: str | None = None, machine: str | None = None) -> bool | None:
    """Whether this CPU has VNNI (AVX-512 VNNI, AVX-VNNI or AMX-INT8): True / False on x86 Linux, from the
    flags of ``/proc/cpuinfo`` (or the text `cpuinfo`); None where unknown, or not x86 (`machine`, default
    ``platform.machine()``: Arm has no ``vpmaddubsw`` to saturate)."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    cpuinfo = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(line.split(":", 1)[-1].split()))
    return None


class Int4Weights(enum.StrEnum):
    """Which layers whose codes and zero points fit [-8, 7] store int4 codes (opset 21)."""

    WEIGHT_ONLY = "weight-only"  # layers without an input quantizer: they run in float whatever the storage
    ALL = "all"  # every layer that fits: the smallest file, but W4A8 layers lose their integer kernels
    NONE = "none"  # none: 4-bit codes stored as int8 (opset 17 graphs)


@dataclass
class WeightQDQ:
    """Codes on the layer's own grid and the ``DequantizeLinear`` that gives back ``(q + Z) / S``.

    The codes are int8 when they lie in `INT8_SAFE_CODES`, else uint8 ``q + 128`` (zero point ``-Z + 128``),
    or int4 (`int4`: stored two to a byte, opset 21) when codes and zero points lie in `INT4_CODES`.
    The direct form (``shape`` None) dequantizes the weight tensor itself, per output channel (axis 0) or per
    tensor: onnxruntime fuses it into integer kernels. Grids it cannot express go through rows: the codes as
    (G, n), one scale per row, an ``Add`` of ``Z/S`` when ``-Z`` does not fit int8, then a ``Reshape``.
    int4 groups are blocks (``block_size``) along axis 1 of the (OC, IC*k) codes, reshaped when the weight
    has another shape.
    """

    codes: np.ndarray  # int8 or uint8 (int4 codes held as int8): the weight's shape, (G, n) rows, (OC, IC*k)
    scale: np.ndarray  # float32: (OC,) per channel, () per tensor, (G,) rows, (OC, IC*k/block_size) blocks
    zero_point: np.ndarray | None  # the codes' dtype, like `scale`; None: 0, and `offset` instead
    offset: np.ndarray | None  # float32 (G, 1): Z/S, added after dequantizing rows
    shape: tuple[int, ...] | None  # the weight's shape when dequantized as rows or blocks of another shape
    why_float: str = ""  # why onnxruntime cannot run the layer with integer kernels
    int4: bool = False  # store the codes (and zero points) as ONNX INT4
    block_size: int = 0  # > 0: blocked DequantizeLinear along axis 1 (opset 21)

    @property
    def dtype(self) -> str:
        """``"int8"``, ``"uint8"`` or ``"int4"``: how the codes are stored."""
        return "int4" if self.int4 else str(self.codes.dtype)

    @property
    def axis(self) -> int | None:
        """The ``axis`` attribute of the ``DequantizeLinear`` (None: per tensor)."""
        if self.block_size:
            return 1
        return None if self.scale.ndim == 0 else 0


def _as_uint8(w: WeightQDQ) -> WeightQDQ:
    """The same weight with uint8 codes ``q + 128`` and zero point ``zp + 128`` (``(q - zp) * scale`` unchanged)."""
    zp = np.zeros(w.scale.shape, np.int16) if w.zero_point is None else w.zero_point.astype(np.int16)
    return WeightQDQ(
        codes=(w.codes.astype(np.int16) + UINT8_SHIFT).astype(np.uint8),
        scale=w.scale,
        zero_point=(zp + UINT8_SHIFT).astype(np.uint8),
        offset=w.offset,
        shape=w.shape,
        why_float=w.why_float,
    )


def saturating_int8_layers(plans: dict[str, LayerQDQ]) -> list[str]:
    """The layers of `plans` that store int8 codes outside `INT8_SAFE_CODES` (``int8_weights="signed"``),
    on which onnxruntime's u8 x s8 kernels can saturate on x86 CPUs without VNNI."""
    lo, hi = INT8_SAFE_CODES
    return [
        name
        for name, p in plans.items()
        if p.weight.dtype == "int8"
        and p.weight.codes.size
        and (p.weight.codes.min() < lo or p.weight.codes.max() > hi)
    ]


def _fits_int8_safely(codes: torch.Tensor) -> bool:
    lo, hi = INT8_SAFE_CODES
    return codes.numel() == 0 or (int(codes.min()) >= lo and int(codes.max()) <= hi)


@dataclass
class ActQDQ:
    scale: np.ndarray  # float32 ()
    zero_point: np.ndarray  # uint8 or int8 ()
    clip: tuple[float, float] | None  # the float range of a < 8-bit quantizer


@dataclass
class LayerQDQ:
    name: str
    weight: WeightQDQ
    act: ActQDQ | None


def weight_qdq(
    name: str,
    layer: QuantizedLayer | QuantizedEmbedding,
    *,
    int4: bool = False,
    int8: Int8Weights = Int8Weights.PORTABLE,
) -> WeightQDQ:
    """ONNX parameters for a layer's codes: ``w_hat = (q + Z)/S = (q - zp) * scale``, ``scale = 1/S``, ``zp = -Z``.

    With `int4`, stored as int4 when codes and zero points lie in `INT4_CODES` (`_int4_weight_qdq`); else as
    int8 when every code lies in `INT8_SAFE_CODES` or `int8` is ``"signed"``, else as uint8 (`_as_uint8`).
    """
    w = _int8_weight_qdq(name, layer)  # first: refuses grids ONNX cannot express
    if int4:
        packed = _int4_weight_qdq(layer)
        if packed is not None:
            return packed
    return w if int8 is Int8Weights.SIGNED or _fits_int8_safely(layer.codes) else _as_uint8(w)


def _int4_weight_qdq(layer: QuantizedLayer | QuantizedEmbedding) -> WeightQDQ | None:
    """`weight_qdq` with int4 codes, or None when a code or a zero point ``-Z`` lies outside `INT4_CODES`."""
    lo, hi = INT4_CODES
    codes = layer.codes.detach()
    z = layer.grid_zero_point.detach().reshape(-1).double()  # (G,) Z
    if codes.numel() == 0 or not torch.equal(z, z.round()):
        return None
    if int(codes.min()) < lo or int(codes.max()) > hi or float((-z).min()) < lo or float((-z).max()) > hi:
        return None
    config = layer.grid_config
    scale = (1.0 / layer.grid_inv_scale.detach().reshape(-1).double()).float()  # (G,)
    zp = (-z).to(torch.int8)
    codes = codes.to(torch.int8)
    if config.granularity is Granularity.GROUP:  # blocks along the flattened inputs: (OC, IC*k)
        oc = codes.shape[0]
        return WeightQDQ(
            codes=codes.reshape(oc, -1).numpy(),
            scale=scale.reshape(oc, -1).numpy(),
            zero_point=zp.reshape(oc, -1).numpy(),
            offset=None,
            shape=None if codes.dim() == 2 else tuple(codes.shape),
            int4=True,
            block_size=config.group_size,
        )
    return _whole_weight(codes, scale, zp, config.granularity is Granularity.TENSOR, int4=True)


def _whole_weight(
    codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, per_tensor: bool, int4: bool = False
) -> WeightQDQ:
    """A weight stored in its own shape, with one scale and zero point (per tensor) or one per channel."""
    shape = () if per_tensor else -1
    return WeightQDQ(
        codes.numpy(), scale.numpy().reshape(shape), zp.numpy().reshape(shape), None, None, int4=int4
    )


def _int8_weight_qdq(name: str, layer: QuantizedLayer | QuantizedEmbedding) -> WeightQDQ:
    """`weight_qdq` with int8 codes, whatever their range."""
    config = layer.grid_config
    if config.kind.is_gguf:
        raise UnsupportedModelError(
            f"layer {name!r}: grid kind {config.kind.value!r} is llama.cpp's block format (an fp16 scale per "
            "block of 32 inputs); export it with postquant.io.export_gguf (CLI `postquant export gguf`), or "
            "quantize with grid: uniform for ONNX"
        )
    if config.kind is not GridKind.UNIFORM:
        raise UnsupportedModelError(
            f"layer {name!r}: grid kind {config.kind.value!r} has no ONNX QDQ form (DequantizeLinear is affine: "
            "(q - zero_point) * scale, a power grid is not); quantize with the recipe field grid: uniform "
            "(CLI --grid uniform) for ONNX, exclude the layer with ignore=[...], or save it with "
            "postquant.io.save instead"
        )
    inv_scale = layer.grid_inv_scale.detach().reshape(-1).double()  # (G,) S
    z = layer.grid_zero_point.detach().reshape(-1).double()  # (G,) Z
    codes = layer.codes.detach().to(torch.int8)  # weight shape
    scale = (1.0 / inv_scale).float()  # (G,)
    fits = bool(torch.equal(z, z.round()) and (-z).min() >= -128 and (-z).max() <= 127)
    why = []
    if config.granularity is Granularity.GROUP:
        why.append(f"per-group grid (group_size {config.group_size}): dequantized per group, then reshaped")
    if not fits:
        why.append(
            f"zero point -Z in [{-z.max():.0f}, {-z.min():.0f}] does not fit int8 (channels whose weights all "
            "have one sign): dequantized with zero point 0, then Z/S added; symmetric=True avoids it"
        )
    if not why:
        return _whole_weight(codes, scale, (-z).to(torch.int8), config.granularity is Granularity.TENSOR)
    rows = codes.reshape(z.numel(), -1)  # (G, n)
    return WeightQDQ(
        codes=rows.numpy(),
        scale=scale.numpy(),
        zero_point=(-z).to(torch.int8).numpy() if fits else None,
        offset=None if fits else (z / inv_scale).float().reshape(-1, 1).numpy(),
        shape=tuple(codes.shape),
        why_float="; ".join(why),
    )


def plan_embeddings(
    qmodel: nn.Module,
    *,
    int4: Int4Weights | str = Int4Weights.NONE,
    int8: Int8Weights | str = Int8Weights.PORTABLE,
) -> dict[str, WeightQDQ]:
    """The ONNX parameters of every quantized embedding table of `qmodel`, by name.

    A table stores int4 codes (opset 21) when they and its zero points fit [-8, 7], unless `int4` is
    ``"none"``; else int8, or uint8 for codes outside [-64, 63] unless `int8` is ``"signed"`` (the rule of
    `weight_qdq`, kept for one rule although a lookup feeds no integer kernel).
    """
    int4, int8 = Int4Weights(int4), Int8Weights(int8)
    tables = {}
    for name, table in quantized_embeddings(qmodel).items():
        tables[name] = weight_qdq(name, table, int4=int4 is not Int4Weights.NONE, int8=int8)
        tables[name].why_float = ""  # a lookup runs no Conv/Gemm: nothing to say about integer kernels
        log.info(
            "embedding %s: %d-bit codes stored as %s (DequantizeLinear -> Gather)",
            name,
            table.bits,
            tables[name].dtype,
        )
    return tables


def act_qdq(layer: QuantizedLayer) -> ActQDQ | None:
    act = layer.act_quant
    if act is None:
        return None
    scale = float(act.scale)
    zp = int(act.zero_point)
    dtype = np.uint8 if act.qmin == 0 else np.int8
    clip = None
    # an 8-bit QuantizeLinear saturates at 0/255 or -128/127: clip to the narrower range first
    if act.bits < 8:
        clip = ((act.qmin - zp) * scale, (act.qmax - zp) * scale)
    return ActQDQ(np.array(scale, dtype=np.float32), np.array(zp, dtype=dtype), clip)


def plan_layers(
    qmodel: nn.Module,
    *,
    int4: Int4Weights | str = Int4Weights.NONE,
    int8: Int8Weights | str = Int8Weights.PORTABLE,
) -> dict[str, LayerQDQ]:
    """The ONNX parameters of every quantized layer of `qmodel`, by name (what the export will say, logged).

    Args:
        qmodel: the quantized model.
        int4: which layers whose codes and zero points fit [-8, 7] store int4 codes (opset 21, `Int4Weights`).
        int8: how 8-bit layers with codes outside [-64, 63] store them (`Int8Weights`).
    """
    int4, int8 = Int4Weights(int4), Int8Weights(int8)
    plans = {}
    for name, layer in quantized_layers(qmodel).items():
        packed = int4 is Int4Weights.ALL or (int4 is Int4Weights.WEIGHT_ONLY and layer.act_quant is None)
        weight = weight_qdq(name, layer, int4=packed, int8=int8)
        if weight.int4 and layer.act_quant is not None:
            weight.why_float = INT4_WHY_FLOAT
        plans[name] = LayerQDQ(name, weight, act_qdq(layer))
        if weight.why_float:
            log.warning("layer %s runs in float in onnxruntime: %s", name, weight.why_float)
        if layer.bits < 8 and not weight.int4:
            log.info(
                "layer %s: W%d codes stored as %s on their own grid (simulated low-bit)",
                name,
                layer.bits,
                weight.dtype,
            )
        act = layer.act_quant
        if act is not None and act.bits < 8:
            log.info("layer %s: A%d input as an 8-bit QDQ after a Clip (simulated low-bit)", name, act.bits)
    wide = [n for n, p in plans.items() if p.weight.dtype == "uint8"]
    if wide:
        log.info(
            "%d of %d layers store uint8 weights (codes q + 128): they use codes outside [%d, %d], on which "
            "onnxruntime's u8 x s8 kernels can saturate on x86 CPUs without VNNI",
            len(wide),
            len(plans),
            *INT8_SAFE_CODES,
        )
        log.debug("layers with uint8 weights: %s", ", ".join(wide))
        if cpu_has_vnni():
            log.warning(
                "%d layers store uint8 weights, which onnxruntime runs on its slow u8 x u8 kernels; this CPU has "
                "VNNI: for CPUs with VNNI export with int8_weights='signed' (CLI --int8-weights signed; ResNet-56 "
                "W8A8 2.14x the float speed instead of 0.78x, docs/export.md)",
                len(wide),
            )
    full_range = saturating_int8_layers(plans)
    if full_range and cpu_has_vnni() is False:
        log.warning(
            "int8_weights='signed': %d layers store int8 codes outside [%d, %d], on which onnxruntime's u8 x s8 "
            "kernels can saturate on x86 CPUs without VNNI, such as this one: the file is meant for a CPU with "
            "VNNI (AVX-512 VNNI, AVX-VNNI, AMX); use int8_weights='portable' for any CPU",
            len(full_range),
            *INT8_SAFE_CODES,
        )
    asymmetric = [
        n
        for n, p in plans.items()
        if p.weight.zero_point is not None
        and np.any(p.weight.zero_point.astype(np.int16) != (UINT8_SHIFT if p.weight.dtype == "uint8" else 0))
    ]
    if asymmetric:
        log.info(
            "%d layers have weight zero points other than 0: onnxruntime's integer convolutions are several times "
            "slower with them than with symmetric weights (quantize with symmetric=True for deployment)",
            len(asymmetric),
        )
    return plans
