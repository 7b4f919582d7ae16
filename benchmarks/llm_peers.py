"""The peers of `benchmarks/llm.py`: llm-compressor GPTQ, HQQ and AutoRound on the same model, calibration
windows and grid (asymmetric, groups of 64 along the input, every Linear but ``lm_head``, weight-only).

Imported only by `llm.py --row <peer row>` running under the peers' own Python (`--peer-python`, the
virtualenv `benchmarks/setup_peers.sh` makes): the peers pin their own `transformers` and must never be
installed into the environment postquant runs in. Each function takes the float model and returns it with
its Linear weights replaced by the peer's quantize-dequantized weights (or the peer's own quantized modules),
ready for the same perplexity evaluation, plus a dict of what the peer was configured with.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("llm_peers")

GROUP = 64


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def llmc_gptq(
    model: nn.Module, tokenizer: Any, calib: torch.Tensor, bits: int, *, actorder: str | None, damp: float
) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """llm-compressor's GPTQModifier through `oneshot` (sequential pipeline: one decoder layer at a time, the
    next layer's inputs from the quantized layer), min/max observer (its default for weights), static groups
    fitted to the float weight. Returns the model, the settings and each layer's integer codes and grid."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": GROUP,
        "observer": "memoryless_minmax",
    }
    modifier = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=damp,
        actorder=actorder,
    )
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=modifier,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    codes: dict[str, torch.Tensor] = {}
    for name in _linear_names(model):
        layer = model.get_submodule(name)
        scale = layer.weight_scale.detach().float()  # (out, in / g)
        zp = layer.weight_zero_point.detach().float()
        w = layer.weight.detach().float()
        s = scale.repeat_interleave(GROUP, dim=1)
        z = zp.repeat_interleave(GROUP, dim=1)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        codes[name] = torch.round(w / s + z).clamp(lo, hi).to(torch.int8)
        codes[name + ".inv_scale"] = 1.0 / scale
        codes[name + ".zero"] = zp
    settings = {
        "weights": weights,
        "block_size": 128,
        "dampening_frac": damp,
        "actorder": actorder,
        "pipeline": "sequential",
        "calibration": f"{calib.shape[0]}x{calib.shape[1]}, batch 1, not shuffled",
    }
    return model, settings, codes


def hqq(model: nn.Module, bits: int) -> tuple[nn.Module, dict[str, Any]]:
    """HQQ (half-quadratic optimisation of the zero point and scale, no data) at `bits`, groups of 64 along
    the input (``axis=1``: the grid of the other rows), its default optimiser settings; the dequantized weight
    written back into each Linear (HQQ's CPU path, float32)."""
    from hqq.core.quantize import Quantizer

    settings = {"nbits": bits, "group_size": GROUP, "axis": 1, "optimize": True, "round_zero": False}
    with torch.no_grad():
        for name in _linear_names(model):
            layer = model.get_submodule(name)
            w = layer.weight.detach().float()
            wq, meta = Quantizer.quantize(
                w,
                nbits=bits,
                channel_wise=True,
                group_size=GROUP,
                optimize=True,
                round_zero=False,
                axis=1,
                bitpack=False,
                compute_dtype=torch.float32,
                device="cpu",
            )
            deq = Quantizer.dequantize(wq, meta).reshape(w.shape)
            layer.weight.copy_(deq.to(layer.weight.dtype))
    _check_fake_quantized(model, bits)
    return model, settings


def autoround(
    model: nn.Module,
    tokenizer: Any,
    calib: torch.Tensor,
    bits: int,
    *,
    preset: str,
    sym: bool,
    amp: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """AutoRound (signed-gradient rounding and range tuning per decoder layer) with its `preset` (its CLI's
    ``default``: 200 iterations, lr 1/iters; ``light``: 50 iterations, lr 5e-3), batch 8, on the same
    calibration windows; the fake-quantized model kept in memory for evaluation. `amp`: its mixed precision
    (its default True: bfloat16 steps where the CPU has bf16 instructions, else float32)."""
    from auto_round import AutoRound

    presets = {"default": {"iters": 200, "lr": None}, "light": {"iters": 50, "lr": 5e-3}}
    cfg = presets[preset]
    settings = {
        "bits": bits,
        "group_size": GROUP,
        "sym": sym,
        "iters": cfg["iters"],
        "lr": cfg["lr"],
        "batch_size": 8,
        "nsamples": calib.shape[0],
        "seqlen": calib.shape[1],
        "device": "cpu",
        "amp": amp,
    }
    ar = AutoRound(
        model,
        tokenizer,
        bits=bits,
        group_size=GROUP,
        sym=sym,
        iters=cfg["iters"],
        lr=cfg["lr"],
        batch_size=8,
        nsamples=calib.shape[0],
        seqlen=calib.shape[1],
        dataset=[row.unsqueeze(0) for row in calib],  # the same token windows, not re-tokenized text
        device_map="cpu",
        amp=amp,
    )
    model, _ = ar.quantize()
    settings["amp_dtype"] = str(getattr(getattr(ar, "model_context", None), "amp_dtype", "?"))
    settings["lr_used"] = cfg["lr"] if cfg["lr"] is not None else 1.0 / cfg["iters"]
    _check_fake_quantized(model, bits)
    return model.float(), settings


def _check_fake_quantized(model: nn.Module, bits: int) -> None:
    """Raise unless every quantized Linear's weight holds at most 2^bits values per group of 64 (the model a
    peer hands back must be the quantized one, not its float copy)."""
    for name in _linear_names(model):
        w = model.get_submodule(name).weight.detach().float().reshape(-1, GROUP)[:256]
        distinct = max(len(torch.unique(row)) for row in w)
        if distinct > 2**bits:
            raise RuntimeError(f"{name}: {distinct} distinct values in a group of {GROUP}: not quantized")
