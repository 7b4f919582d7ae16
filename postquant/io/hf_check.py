"""Checking a compressed-tensors export in its real consumer: Hugging Face transformers (+ compressed-tensors).

`verify_compressed_tensors` loads the exported directory the way a user does (``from_pretrained``, CPU) and
compares its outputs with the quantized model's, one batch at a time. transformers 5.x with compressed-tensors
0.20 has two loading routes with different limits (`transformers_route`; see `postquant.io.compressed_tensors`).

**Dynamic per-token inputs.** compressed-tensors 0.20 does fake-quantize ``dynamic: true, strategy: token``
inputs when transformers loads the export (``set_forward_quantized`` wraps every targeted Linear; its
``forward_quantize`` computes each token's scale at run time), but on another grid than postquant's (and vLLM's):
``scale = absmax / ((2^b - 1) / 2)`` (127.5 at 8 bits, ``calculate_qparams``), codes ``[-2^(b-1), 2^(b-1) - 1]``.
A token whose largest magnitude is negative then sits exactly on a rounding boundary (``-127.5``), so the
one-ulp differences of the consumer's weights flip whole steps and the logits of the two models cannot be
compared tightly. For such exports the check compares every quantized Linear instead: postquant's model runs
with the consumer's input grid (`_consumer_grid`), and each layer's output is compared with the consumer's
layer on the very same input (weights, scheme, per-token axis and input grid must all agree). The logits'
SQNR and top-1 agreement against postquant's own model are reported alongside.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from postquant.errors import ExportError, ExportMismatchError
from postquant.eval.metrics import sqnr_from_sums
from postquant.nn import DynamicActQuantizer, cached_weights

__all__ = ["TOLERANCE", "ConsumerCheck", "transformers_route", "verify_compressed_tensors"]

log = logging.getLogger(__name__)

CT_VERSION = "0.20.1"  # the compressed-tensors release whose format is written (and tested); informational
CONFIG_FILE = "config.json"
# the largest |output difference| allowed, relative to the largest |output|, by the model's dtype
TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_CONFIG_OVERRIDE_WARNING = "You passed `quantization_config` or equivalent parameters"


@dataclass(frozen=True)
class ConsumerCheck:
    """The exported model loaded by transformers vs the quantized model, on the same inputs.

    ``rel_max_diff`` is ``max_abs_diff`` over the largest |output| of the quantized model; ``top1_agreement``
    (%) compares the argmax over the last dimension (the next token) at every position; ``route`` is how
    transformers loaded the export: ``compressed`` (its default) or ``dequantize`` (``dequantize=True``).
    ``basis``: what the differences (and the tolerance) compare: ``logits``, or ``layer outputs`` for an
    export with dynamic per-token inputs (the worst quantized Linear on identical inputs, module docstring);
    ``sqnr_db`` and ``top1_agreement`` always compare the logits with the quantized model's own.
    """

    max_abs_diff: float
    rel_max_diff: float
    sqnr_db: float
    top1_agreement: float
    positions: int
    tolerance: float
    route: str
    basis: str = "logits"

    def as_dict(self) -> dict[str, float | int | str]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def model_dtype(qmodel: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without one)."""
    return next((t.dtype for t in qmodel.parameters() if t.is_floating_point()), torch.float32)


def _as_batches(inputs: Any) -> list[dict[str, torch.Tensor]]:
    """Keyword batches from a tensor of token ids, a dict of tensors, or a list of those."""
    if isinstance(inputs, torch.Tensor):
        return [{"input_ids": inputs}]
    if isinstance(inputs, Mapping):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inputs.items()):
            raise ExportError("verify inputs: a dict maps argument names to tensors (a tokenizer's output)")
        return [dict(inputs)]
    if isinstance(inputs, Iterable) and not isinstance(inputs, str | bytes):
        batches = [b for item in inputs for b in _as_batches(item)]
        if batches:
            return batches
    raise ExportError(
        "verify inputs are a tensor of token ids, a dict of tensors (a tokenizer's output) or a non-empty list "
        f"of those, not {type(inputs).__name__}"
    )


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    first = out if isinstance(out, torch.Tensor) else out[0]
    if not isinstance(first, torch.Tensor):
        raise ExportError(f"the model returns {type(out).__name__} without a tensor to compare")
    return first


@contextmanager
def _eval(model: nn.Module) -> Iterator[torch.device]:
    """`model` in eval and inference mode, dequantized weights kept (`cached_weights`; its modules' training
    flags restored after); yields its device."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(), cached_weights(model):
            yield next((t.device for t in model.parameters()), torch.device("cpu"))
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass
class _Agreement:
    """Running sums of the comparison of candidate outputs with reference outputs, one batch at a time."""

    max_abs: float = 0.0
    max_ref: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    agree: int = 0
    positions: int = 0

    def add(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        diff = got.double() - ref.double()
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.max_ref = max(self.max_ref, float(ref.abs().max()))
        self.signal += float(ref.double().square().sum())
        self.noise += float(diff.square().sum())
        self.agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        self.positions += ref[..., 0].numel()


class _ConsumerTokenQuant(nn.Module):
    """compressed-tensors 0.20's fake quantization of a symmetric dynamic per-token input
    (``calculate_qparams`` + ``forward_quantize``): ``s = absmax / ((2^b - 1) / 2)`` per row of the last
    dimension (eps for a zero row), ``clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) * s``, in the input's dtype."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(dim=-1, keepdim=True) / ((2**self.bits - 1) / 2)  # (..., 1)
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
        return torch.clamp(torch.round(x / scale), -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) * scale


def _dynamic_inputs(qconfig: dict[str, Any]) -> bool:
    """Whether a config group quantizes its inputs dynamically."""
    groups = qconfig["config_groups"].values()
    return any((g.get("input_activations") or {}).get("dynamic") for g in groups)


@contextmanager
def _consumer_grid(qmodel: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """`qmodel` with every dynamic input quantizer on the consumer's grid (`_ConsumerTokenQuant`); yields the
    layers concerned by name; the quantizers always come back."""
    layers = {
        n: m
        for n, m in qmodel.named_modules()
        if isinstance(getattr(m, "act_quant", None), DynamicActQuantizer)
    }
    saved = {n: m.act_quant for n, m in layers.items()}
    try:
        for n, m in layers.items():
            m.act_quant = _ConsumerTokenQuant(saved[n].bits)
        yield layers
    finally:
        for n, m in layers.items():
            m.act_quant = saved[n]


def _compare_layers(qmodel: nn.Module, consumer: nn.Module, batch: dict[str, Any], device: Any) -> _Agreement:
    """Run `qmodel` on `batch` with the consumer's input grid; every layer with a dynamic input quantizer is
    compared with the consumer's layer of the same name on the same input. Returns the worst layer's sums."""
    worst = _Agreement()

    def compare(name: str, out: torch.Tensor, x: torch.Tensor) -> None:
        nonlocal worst
        one = _Agreement()
        one.add(consumer.get_submodule(name)(x.cpu()), out.cpu())
        if one.max_abs * worst.max_ref >= worst.max_abs * one.max_ref:  # the larger relative difference
            worst = one

    with _consumer_grid(qmodel) as layers:
        handles = [
            m.register_forward_hook(lambda _m, args, out, n=n: compare(n, out, args[0]))
            for n, m in layers.items()
        ]
        try:
            qmodel(**{k: v.to(device) for k, v in batch.items()})
        finally:
            for h in handles:
                h.remove()
    return worst


def transformers_route(qconfig: dict[str, Any]) -> str:
    """How transformers (5.x, with compressed-tensors 0.20) can load an export with `qconfig`.

    ``compressed``: its default route (every scheme, per layer), unless a per-group/per-channel scheme is
    asymmetric (it cannot load the packed zero points); then ``dequantize`` (``dequantize=True``), which applies
    the first config group's scheme to every layer and drops input quantizers, so it holds for one weight-only
    scheme. Raises `ExportError` when neither route computes the export.
    """
    groups = list(qconfig["config_groups"].values())
    asymmetric = any(not g["weights"]["symmetric"] and g["weights"]["strategy"] != "tensor" for g in groups)
    if not asymmetric:
        return "compressed"
    if len(groups) == 1 and groups[0].get("input_activations") is None:
        return "dequantize"
    why = "several weight schemes (mixed precision)" if len(groups) > 1 else "input quantizers"
    raise ExportError(
        f"transformers cannot load this export as quantized: it has asymmetric per-group/per-channel weights and "
        f"{why}. transformers' default route fails on packed asymmetric zero points (compressed-tensors' own "
        "checkpoints too), and its dequantize=True route applies one scheme to every layer and drops input "
        "quantizers. Quantize with symmetric=True (the default route loads it), or export without verify "
        "inputs for another consumer (vLLM)"
    )


def _load_consumer(qmodel: nn.Module, directory: Path, route: str, dtype: torch.dtype) -> nn.Module:
    """The export as transformers loads it (CPU), with compressed-tensors, by `route`."""
    try:
        import compressed_tensors  # noqa: F401  (optional dependency, the hf extra: registers the format)
        from transformers import CompressedTensorsConfig  # optional dependency (extra: hf)
    except ImportError as exc:
        raise ImportError(
            "verifying a compressed-tensors export needs the compressed-tensors package: "
            "pip install compressed-tensors (the postquant[hf] extra), or pass verify_inputs=None"
        ) from exc
    kwargs: dict[str, Any] = {"dtype": dtype}
    if route == "dequantize":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_CONFIG_OVERRIDE_WARNING}.*")
        try:
            return type(qmodel).from_pretrained(str(directory), **kwargs).eval()
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ExportError(
                f"transformers could not load {directory} ({route} route): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}. Check the transformers and compressed-tensors versions "
                f"(the export follows compressed-tensors {CT_VERSION})"
            ) from exc


def verify_compressed_tensors(
    qmodel: nn.Module,
    directory: str | Path,
    inputs: Any,
    *,
    tolerance: float | None = None,
    route: str | None = None,
) -> ConsumerCheck:
    """Load an export with transformers (+ compressed-tensors, CPU) and compare its outputs with `qmodel`'s.

    Args:
        qmodel: the quantized model that was exported.
        directory: the export.
        inputs: a tensor of token ids, a dict of tensors (a tokenizer's output), or a list of those.
        tolerance: the largest allowed ``max |difference| / max |output|``; None: by the model's dtype
            (`TOLERANCE`: 1e-4 for float32, where the consumer's weights are within an ulp of postquant's).
        route: ``compressed`` (transformers' default) or ``dequantize`` (``CompressedTensorsConfig(
            dequantize=True)``); None: the route that can load the export (`transformers_route`).

    Returns:
        A `ConsumerCheck`.

    Raises:
        ExportError: transformers cannot load the export (by `route`, or by any route: see `transformers_route`).
        ExportMismatchError: the outputs differ beyond `tolerance` (the metrics are attached).
    """
    directory = Path(directory)
    qconfig = json.loads((directory / CONFIG_FILE).read_text())["quantization_config"]
    route = transformers_route(qconfig) if route is None else route
    if route not in {"compressed", "dequantize"}:
        raise ValueError(f"route is 'compressed', 'dequantize' or None, not {route!r}")
    dtype = model_dtype(qmodel)
    tolerance = TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    batches = _as_batches(inputs)
    dynamic = _dynamic_inputs(qconfig)
    consumer = _load_consumer(qmodel, directory, route, dtype)
    sums, layer_sums = _Agreement(), _Agreement()
    with _eval(qmodel) as device, _eval(consumer):
        for batch in batches:  # one batch's outputs at a time (an LM's logits are large)
            ref = _logits(qmodel(**{k: v.to(device) for k, v in batch.items()})).cpu()
            sums.add(_logits(consumer(**{k: v.cpu() for k, v in batch.items()})), ref)
            if dynamic:
                worst = _compare_layers(qmodel, consumer, batch, device)
                if worst.max_abs * layer_sums.max_ref >= layer_sums.max_abs * worst.max_ref:
                    layer_sums = worst
    del consumer
    basis = layer_sums if dynamic else sums
    max_abs, scale = basis.max_abs, basis.max_ref
    positions = sums.positions
    check = ConsumerCheck(
        max_abs_diff=max_abs,
        rel_max_diff=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
        sqnr_db=sqnr_from_sums(sums.signal, sums.noise),
        top1_agreement=100.0 * sums.agree / positions,
        positions=positions,
        tolerance=tolerance,
        route=route,
        basis="layer outputs" if dynamic else "logits",
    )
    log.info(
        "transformers (%s route) vs postquant on %d positions: max |diff| %.3g (%.3g of max |%s|), logits' "
        "SQNR %.1f dB, top-1 agreement %.2f %%",
        check.route,
        positions,
        max_abs,
        check.rel_max_diff,
        "layer output" if dynamic else "logit",
        check.sqnr_db,
        check.top1_agreement,
    )
    if not check.rel_max_diff <= tolerance:
        raise ExportMismatchError(
            f"transformers' load of {directory} disagrees with the quantized model: max |diff| {max_abs:.3g} is "
            f"{check.rel_max_diff:.3g} of the largest |output| (tolerance {tolerance:g}; SQNR {check.sqnr_db:.1f} dB, "
            f"top-1 agreement {check.top1_agreement:.2f} %). The checkpoint does not compute the quantized model: "
            "do not deploy it. Check the transformers and compressed-tensors versions (written for "
            f"compressed-tensors {CT_VERSION}); if it persists, report it with the model.",
            check.as_dict(),  # type: ignore[arg-type]
        )
    return check
