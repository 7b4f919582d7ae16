"""SmolLM2-135M-Instruct quantized block by block: perplexity, wall time and peak RSS per method.

Perplexity on the first 16 non-overlapping windows of 512 tokens of ``handbook-eval.txt`` (8,176 predicted
tokens, as ``$POSTQUANT_SHARED/data/text/README.md``); calibration for learned rounding: `--calib-size`
seeded random windows of `--seqlen` tokens of ``pydocs-calib.txt``. Every Linear but ``lm_head`` is quantized,
asymmetric min/max groups of 64 (SmolLM2's hidden size 576 is not a multiple of 128). Caveat: the weights
come from a Q4_1 GGUF (4-bit, groups of 32), so W4 g32 would be lossless; g64 is not.

Each row runs in its own process (`--row`), so its peak RSS (``ru_maxrss``) is its own; rows are appended to
``benchmarks/results/llm.json`` as they finish and skipped when present (rerun the same command to resume;
a failed row, its error recorded, is tried again).
The dequantized float model is cached once as safetensors in `--cache` (loading the GGUF takes minutes).

Example:
    python benchmarks/llm.py                      # every row
    python benchmarks/llm.py --rows fp32 rtn-w4   # some rows
    python benchmarks/llm.py --rows autoround-light-w4 --calib-seed 1   # other calibration windows
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from postquant.store.files import write_text_atomic

log = logging.getLogger("llm_bench")

RESULTS = Path(__file__).parent / "results"
GROUP = 64
LEARNED_ITERS = 20
GPTQ = {"damp": 0.01, "act_order": False, "block_size": 128}
# 2, 3, 4 or 8 bits per Linear at an average of 3, by diagonal Fisher importance on the calibration windows
MIXED3 = {"w_bits_budget": 3.0, "importance": "fisher", "bit_choices": [2, 3, 4, 8], "calib_size": 32}


def _row(method: str, bits: int, learned: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A postquant row's recipe fields: `learned` with LEARNED_ITERS steps per decoder layer, both learned
    presets on batches of 4 windows (`learned`: fields on top), GPTQ with `GPTQ`."""
    spec: dict[str, Any] = {"method": method, "w_bits": bits, **extra}
    if method == "learned":
        spec["learned"] = {"iters": LEARNED_ITERS, "batch_size": 4, "progress": False, **(learned or {})}
    elif method == "learned-fast":  # the fastest preset (signed gradient, 25 steps, no QDrop mixing)
        spec["learned"] = {"batch_size": 4, "progress": False, **(learned or {})}
    elif method == "gptq":
        spec["gptq"] = dict(GPTQ)
    return spec


# learned-fast fields of the rows measured against AutoRound light: its budget (50 steps of 8 windows), that budget
# at its step size (5e-3 on offsets and range multipliers), learned group steps, learned group ranges
AR_BUDGET = {"iters": 50, "batch_size": 8}
AR_LIGHT = {**AR_BUDGET, "lr": 5e-3}
SCALES = {"learn_weight_scales": True, "scale_lr": 5e-3}
RANGES = {"learn_weight_range": True}

ROWS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    **{f"{m}-w{b}": _row(m, b) for b in (4, 3) for m in ("rtn", "squant", "learned", "learned-fast", "gptq")},
    # W2 g64: where RTN collapses
    **{f"{m}-w2": _row(m, 2) for m in ("rtn", "squant", "gptq", "learned", "learned-fast")},
    # data-free, as HQQ: each group's range searched for the least squared weight error instead of min/max
    **{f"{m}-w{b}-mse": _row(m, b, w_range="mse") for b in (4, 3) for m in ("rtn", "squant")},
    # data-free: each group's step and integer zero point searched around min/max's for the least l8 norm of
    # the weight error (a soft maximum: `w_range: lp`), the grid that SQuant then rounds on
    **{f"{m}-w{b}-lp": _row(m, b, w_range="lp") for b in (4, 3) for m in ("rtn", "squant")},
    # mixed precision at an average of 3 weight bits, allocated before the block walk: against the W3 rows
    "rtn-mixed3": _row("rtn", 3, mixed=MIXED3),
    "learned-fast-mixed3": _row("learned-fast", 3, mixed=MIXED3),
    # W4 g64 with 8-bit inputs to every quantized Linear (per-tensor ranges from the calibration windows):
    # the block path takes no static ranges, so these rows run `postquant.quantize` on the whole model
    "rtn-w4a8": _row("rtn", 4, a_bits=8),
    "learned-fast-w4a8": _row("learned-fast", 4, a_bits=8),
    # the same with dynamic per-token 8-bit inputs (each token's step absmax/127 at run time, as vLLM's int8
    # W8A8): no ranges to calibrate, so they run on the block path
    **{f"{m}-w4a8dyn": _row(m, 4, a_bits=8, act_ranges="dynamic") for m in ("rtn", "learned-fast", "gptq")},
    # learned-fast with AutoRound light's budget (50 signed-gradient steps per layer, batches of 8 windows):
    # is the gap to autoround-light-w4 the step budget, or AutoRound's learned weight ranges?
    "learned-fast-w4-50x8": _row("learned-fast", 4, AR_BUDGET),
    # learned-fast also learning each group's step (`learn_weight_scales`, signed steps of 5e-3 on its log, as
    # AutoRound's light preset tunes its min/max): does a learned range close the gap to autoround-light-w4?
    "learned-fast-w4-scales": _row("learned-fast", 4, SCALES),
    # both: AutoRound light's step budget and learned steps
    "learned-fast-w4-scales-50x8": _row("learned-fast", 4, {**AR_BUDGET, **SCALES}),
    # learned-fast also learning each group's range (`learn_weight_range`: multipliers on its two ends, step
    # and integer zero point following, AutoRound's min/max tuning), at the rounding offsets' learning rate
    **{f"learned-fast-w{b}-range": _row("learned-fast", b, RANGES) for b in (4, 3, 2)},
    # the same, ending each layer on its lowest-loss step (`keep_best_step`, as AutoRound keeps its best iterate)
    **{
        f"learned-fast-w{b}-range-best": _row("learned-fast", b, {**RANGES, "keep_best_step": True})
        for b in (4, 3)
    },
    # learned ranges started from the data-free `lp` grid instead of min/max
    **{f"learned-fast-w{b}-range-lp": _row("learned-fast", b, RANGES, w_range="lp") for b in (4, 3)},
    # learned ranges with AutoRound light's budget (50 signed-gradient steps per layer, batches of 8 windows)
    **{f"learned-fast-w{b}-range-50x8": _row("learned-fast", b, {**AR_BUDGET, **RANGES}) for b in (4, 3)},
    # AutoRound light's recipe in postquant's loop: nearest-rounding start, 50 signed-gradient steps of 5e-3 on the
    # offsets and the range multipliers, batches of 8 windows
    **{
        f"learned-fast-w{b}-range-ar": _row("learned-fast", b, {**AR_LIGHT, **RANGES, "init": "nearest"})
        for b in (4, 3, 2)
    },
    # the same with each step's forward in bfloat16 autocast (`autocast: bfloat16`), as AutoRound runs by default:
    # matmuls in bf16 with float32 sums, the loss and the before/after check in float32
    **{
        f"learned-fast-w{b}-range-ar-bf16": _row(
            "learned-fast", b, {**AR_LIGHT, **RANGES, "init": "nearest", "autocast": "bfloat16"}
        )
        for b in (4, 3, 2)
    },
    # the same from SQuant's codes (postquant's start) instead of nearest rounding
    "learned-fast-w4-range-ar-squant": _row("learned-fast", 4, {**AR_LIGHT, **RANGES}),
    # gptq-w4 again with the same windows fed one at a time: only the order of float sums changes (noise).
    "gptq-w4-b1": _row("gptq", 4),
}

# Calibration windows per forward batch (4 unless listed).
CALIB_BATCH = {"gptq-w4-b1": 1}
# Rows quantized by another tool, run under `--peer-python` (benchmarks/llm_peers.py, benchmarks/setup_peers.sh).
PEERS: dict[str, dict[str, Any]] = {
    "fp32-peer-env": {"peer": "none"},
    "llmc-gptq-w4": {"peer": "llmc-gptq", "w_bits": 4, "actorder": None},
    "llmc-gptq-w3": {"peer": "llmc-gptq", "w_bits": 3, "actorder": None},
    "hqq-w4": {"peer": "hqq", "w_bits": 4},
    "hqq-w3": {"peer": "hqq", "w_bits": 3},
    "hqq-w2": {"peer": "hqq", "w_bits": 2},
    "llmc-gptq-w2": {"peer": "llmc-gptq", "w_bits": 2, "actorder": None},
    "autoround-light-w3": {"peer": "autoround", "w_bits": 3, "preset": "light"},
    "autoround-light-w4": {"peer": "autoround", "w_bits": 4, "preset": "light"},
    "autoround-light-w2": {"peer": "autoround", "w_bits": 2, "preset": "light"},
    "autoround-w3": {"peer": "autoround", "w_bits": 3, "preset": "default"},
    "autoround-w4": {"peer": "autoround", "w_bits": 4, "preset": "default"},
    # AutoRound light with `amp=False`: float32 steps on a CPU where its default runs bfloat16 (AMX, AVX-512 BF16)
    "autoround-light-w4-fp32": {"peer": "autoround", "w_bits": 4, "preset": "light", "amp": False},
}
# Pairs of GPTQ rows whose codes are compared: postquant against llm-compressor with the same settings, and
# postquant against itself with only the batching of the same windows changed (the noise floor).
AGREEMENT = [("gptq-w4", "llmc-gptq-w4"), ("gptq-w3", "llmc-gptq-w3"), ("gptq-w4", "gptq-w4-b1")]
SAVES_CODES = {row for pair in AGREEMENT for row in pair}


def recipe_for(row: str, calib_size: int) -> dict[str, Any]:
    base = ROWS[row]
    assert base is not None
    return {
        **base,
        "granularity": "group",
        "group_size": GROUP,
        "symmetric": False,
        "ignore": ["lm_head"],
        "calib_size": calib_size,
    }


def load_float(cache: Path) -> tuple[Any, Any]:
    """SmolLM2-135M as float32 and its tokenizer, from the safetensors cache (made from the GGUF once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache / "config.json").is_file():
        from postquant_lab.zoo.causal_lm import smollm2_135m

        zoo = smollm2_135m()
        tmp = cache.with_name(cache.name + ".tmp")
        zoo.model.save_pretrained(tmp)
        zoo.tokenizer.save_pretrained(tmp)
        tmp.rename(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(cache)


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process: load, quantize block by block (or by a peer), evaluate."""
    import torch

    from postquant.calib.text import eval_windows, random_windows, tokenize_file
    from postquant.eval.perplexity import perplexity
    from postquant.paths import shared_path

    torch.set_num_threads(args.threads)
    model, tokenizer = load_float(args.cache)
    rss = {"after_load": _peak_rss_mb()}
    text = shared_path("data", "text")
    windows = eval_windows(tokenize_file(text / "handbook-eval.txt", tokenizer), 512, 16)
    calib = random_windows(
        tokenize_file(text / "pydocs-calib.txt", tokenizer),
        args.calib_size,
        args.seqlen,
        seed=args.calib_seed,
    )
    seconds = 0.0
    spec = ROWS.get(row) or {}
    static_inputs = spec.get("a_bits") is not None and spec.get("act_ranges") != "dynamic"
    uses_calib = row.startswith(("learned", "gptq", "llmc", "autoround")) or static_inputs or "mixed" in spec
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if row in PEERS:
        model, extra = _run_peer(row, model, tokenizer, calib, args)
        seconds = time.perf_counter() - start
    elif ROWS[row] is not None:
        from postquant.blockwise import quantize_blocks

        batches = list(calib.split(CALIB_BATCH.get(row, 4)))
        recipe = recipe_for(row, args.calib_size)
        if not static_inputs:  # weight-only or dynamic per-token inputs: the block path
            model = quantize_blocks(model, recipe, batches, inplace=True)
        else:  # static activation ranges: the whole-model path (`postquant.quantize`)
            import postquant

            model = postquant.quantize(model, recipe, calib=batches)
        seconds = time.perf_counter() - start
        if row in SAVES_CODES:
            _save_codes(_postquant_codes(model), args.cache / f"codes-{row}.safetensors")
    rss["after_quantize"] = _peak_rss_mb()
    start = time.perf_counter()
    ppl = perplexity(model, windows)
    import transformers

    return {
        "row": row_key(row, args.calib_seed),
        "calib_seed": args.calib_seed,
        "recipe": recipe_for(row, args.calib_size) if ROWS.get(row) is not None else None,
        **extra,
        "ppl": ppl.value,
        "tokens": ppl.tokens,
        "quantize_s": round(seconds, 1),
        "eval_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_after_load_mb": rss["after_load"],
        "peak_rss_after_quantize_mb": rss["after_quantize"],
        "threads": args.threads,
        "calib": f"{args.calib_size}x{args.seqlen}" if uses_calib else None,
        "calib_batch": CALIB_BATCH.get(row, 4) if uses_calib and row not in PEERS else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load": os.getloadavg()[0],
        "cpu": _cpu(),
    }


def _cpu() -> str:
    sys.path.insert(0, str(Path(__file__).parent))  # the sibling module benchmarks/host.py
    from host import cpu_model

    return cpu_model(("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


def _run_peer(
    row: str, model: Any, tokenizer: Any, calib: Any, args: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    """Quantize with the peer of `row` (benchmarks/llm_peers.py, importable only under --peer-python)."""
    import importlib.metadata as md

    sys.path.insert(0, str(Path(__file__).parent))
    import llm_peers

    spec = PEERS[row]
    kind = spec["peer"]
    if kind == "none":
        return model, {"peer": "none (float model under the peers' Python)"}
    if kind == "llmc-gptq":
        model, settings, codes = llm_peers.llmc_gptq(
            model, tokenizer, calib, spec["w_bits"], actorder=spec["actorder"], damp=0.01
        )
        _save_codes(codes, args.cache / f"codes-{row}.safetensors")
        return model, {"peer": f"llmcompressor {md.version('llmcompressor')}", "settings": settings}
    if kind == "hqq":
        model, settings = llm_peers.hqq(model, spec["w_bits"])
        return model, {"peer": f"hqq {md.version('hqq')}", "settings": settings}
    if kind == "autoround":
        model, settings = llm_peers.autoround(
            model,
            tokenizer,
            calib,
            spec["w_bits"],
            preset=spec["preset"],
            sym=False,
            amp=spec.get("amp", True),
        )
        return model, {"peer": f"auto-round {md.version('auto-round')}", "settings": settings}
    raise ValueError(f"unknown peer {kind}")


def _postquant_codes(model: Any) -> dict[str, Any]:
    """Every QuantizedLayer's int8 codes and grid (inverse step S and offset Z per group)."""
    from postquant.nn.layer import QuantizedLayer

    out: dict[str, Any] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLayer):
            out[name] = layer.codes.to(layer.codes.dtype).contiguous()
            grid = layer.grid
            rows = layer.weight_shape[0]
            out[name + ".inv_scale"] = grid.inv_scale.reshape(rows, -1).contiguous()
            out[name + ".zero"] = grid.zero_point.reshape(rows, -1).contiguous()
    return out


def _save_codes(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.rename(path)


def agreement(ours: Path, theirs: Path, same_convention: bool = False) -> dict[str, Any]:
    """Per layer: the fraction of codes that differ, the largest code difference, the largest relative
    difference of the two grids' inverse steps (postquant's S against 1/scale of compressed-tensors) and the
    largest difference of their offsets (postquant codes round ``S w - Z``, compressed-tensors ``w / scale + zp``:
    Z against -zp, or against Z when both files are postquant's, `same_convention`)."""
    from safetensors.torch import load_file

    a, b = load_file(str(ours)), load_file(str(theirs))
    layers = {}
    total = differ = 0
    for name in sorted(k for k in a if not k.endswith((".inv_scale", ".zero"))):
        ca, cb = a[name].to(int), b[name].to(int)
        n = ca.numel()
        d = int((ca != cb).sum())
        total, differ = total + n, differ + d
        rel = ((a[name + ".inv_scale"] - b[name + ".inv_scale"]).abs() / a[name + ".inv_scale"].abs()).max()
        zb = b[name + ".zero"] if same_convention else -b[name + ".zero"]
        zdiff = (a[name + ".zero"] - zb).abs().max()
        layers[name] = {
            "differ": d / n,
            "max_code_diff": int((ca - cb).abs().max()),
            "step_rel_diff": float(rel),
            "zero_diff": float(zdiff),
        }
    return {"differ": differ / total, "codes": total, "layers": layers}


def _peak_rss_mb() -> int:
    """This process's peak resident set so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _by_decoder_layer(layers: dict[str, dict[str, Any]]) -> dict[int, float]:
    """Mean fraction of differing codes over the Linears of each decoder layer (``...layers.K.*``)."""
    groups: dict[int, list[float]] = {}
    for name, v in layers.items():
        parts = name.split(".")
        k = int(parts[parts.index("layers") + 1])
        groups.setdefault(k, []).append(v["differ"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def row_key(row: str, calib_seed: int) -> str:
    """The row's key in llm.json: its name, and ``@calib<seed>`` for calibration windows drawn with another
    seed than the tables' 0."""
    return row if calib_seed == 0 else f"{row}@calib{calib_seed}"


def _base(key: str) -> str:
    return key.split("@calib")[0]


def seed_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A table of the rows also run on other calibration seeds: each seed's perplexity, mean and spread."""
    by_base: dict[str, dict[int, float]] = {}
    for r in rows:
        if "@calib" in r["row"] and r.get("ppl") is not None:
            by_base.setdefault(_base(r["row"]), {})[r["calib_seed"]] = r["ppl"]
    for r in rows:
        if r["row"] in by_base and r.get("ppl") is not None:
            by_base[r["row"]][r.get("calib_seed", 0)] = r["ppl"]
    if not by_base:
        return []
    seeds = sorted({s for v in by_base.values() for s in v})
    lines = [
        "",
        "## Calibration seeds",
        "",
        "The same rows on calibration windows drawn with other seeds (`--calib-seed N`, keys `<row>@calib<N>`;",
        "seed 0 is the table above). Only the windows change: each method's own seed stays fixed. Mean and",
        "spread (max - min) over the seeds run.",
        "",
        "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for base, ppl in by_base.items():
        cells = [f"{ppl[s]:.2f}" if s in ppl else "-" for s in seeds]
        values = list(ppl.values())
        mean = sum(values) / len(values)
        lines.append(
            f"| {base} | " + " | ".join(cells) + f" | {mean:.2f} | {max(values) - min(values):.2f} |"
        )
    return lines


def cpu_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Which rows ran on which recorded CPU (times, and AutoRound's precision, depend on it)."""
    by_cpu: dict[str, list[str]] = {}
    for r in rows:
        if r.get("cpu"):
            by_cpu.setdefault(r["cpu"], []).append(r["row"])
    if not by_cpu:
        return []
    lines = ["", "CPUs (recorded since 2026-12-05; rows not listed predate the record):", ""]
    lines += [f"- {cpu}: {', '.join(names)}" for cpu, names in by_cpu.items()]
    return lines


def write_markdown(rows: list[dict[str, Any]], path: Path, cache: Path) -> None:
    lines = [
        "# SmolLM2-135M-Instruct, quantized block by block (`benchmarks/llm.py`)",
        "",
        "Perplexity on the first 16 windows of 512 tokens of `handbook-eval.txt` (8,176 predicted tokens);",
        f"weight-only, asymmetric min/max groups of {GROUP}, every Linear but `lm_head`; `postquant.blockwise.",
        "quantize_blocks(..., inplace=True)`. Learned rounding: the `learned` preset (SQuant start, QDrop",
        f"p=0.5, lr 1e-2) with {LEARNED_ITERS} iterations per decoder layer, batch 4; `learned-fast`: its preset",
        "(signed gradient, 25 iterations, no QDrop mixing), batch 4. Rows that use data",
        "(learned, GPTQ, llm-compressor, AutoRound) all use the same seeded calibration windows of",
        "`pydocs-calib.txt` (column calibration). GPTQ (postquant and llm-compressor): damping 0.01 of the mean",
        "Hessian diagonal, blocks of 128 columns, no act-order, static groups fitted by min/max to the float",
        "weight, sequential one decoder layer at a time with the next layer's inputs from the quantized layer.",
        "Peers (`benchmarks/llm_peers.py`) run under their own virtualenv (`benchmarks/setup_peers.sh`,",
        "`--peer-python`), which pins its own `transformers` (column `tf`); the float model is checked there",
        "(`fp32-peer-env`). llm-compressor: `GPTQModifier` through `oneshot(pipeline='sequential')`, its",
        "default weight observer (`memoryless_minmax`; its range always contains 0, as it does for every group",
        "here), `actorder=None` to match postquant's default (llm-compressor's own default is `static`).",
        "HQQ: data-free, its optimiser (`optimize=True`), groups of 64 along the input (`axis=1`): its grid",
        "keeps a float, unrounded zero point (`round_zero=False`), so it is not the integer-offset grid of the",
        "other rows. AutoRound: its CLI presets (`default` 200 iterations lr 1/200, `light` 50 iterations",
        "lr 5e-3), batch 8, asymmetric (`sym=False`; its default scheme W4A16 is symmetric), on the same",
        "token windows, CPU; `amp` left at its default: float32 on a CPU without bf16 instructions,",
        "bfloat16 autocast (and `torch.compile`) on one with AMX or AVX-512 BF16 (see CPUs below).",
        "`*-w4a8` rows: 8-bit inputs to every quantized Linear, one static range per Linear from the",
        "calibration windows (min/max for RTN, MSE search for learned-fast); the block path takes no static",
        "ranges, so they run `postquant.quantize` on the whole model (learned-fast: one unit per decoder layer).",
        "`*-w4a8dyn` rows: the same inputs quantized per token at run time (`act_ranges: dynamic`, step",
        "absmax/127 of each token, vLLM's int8 W8A8 scheme), on the block path; as in the static rows the first",
        "Linear (layer 0's q_proj, the recipe's `@first` default) keeps a float input.",
        "`*-mixed3` rows: 2, 3, 4 or 8 bits per Linear at an average of 3 (diagonal-Fisher importance on the",
        "calibration windows, allocated before the block walk); compare them with the uniform W3 rows.",
        "`learned-fast-w4-50x8`: learned-fast with AutoRound light's budget (50 steps, batches of 8 windows);",
        "`learned-fast-w4-scales`: learned-fast also learning each group's step (`learn_weight_scales`, signed",
        "steps of 5e-3 on its logarithm, AutoRound light's rate for its min/max); `-scales-50x8`: both.",
        "`*-mse` rows: data-free, each group's range shrunk to the least squared weight error under nearest",
        "rounding (`w_range: mse`) instead of min/max: the data-free setting of the HQQ rows.",
        "",
        "Peak RSS: the row's own process, after loading, quantizing and evaluating. The weights come from a",
        "Q4_1 GGUF (4-bit groups of 32): W4 g32 would be lossless, g64 is not. **Times are from a shared,",
        "loaded 2-core CPU** (other sessions ran at the same time; `load` is the 1-minute load average when",
        "the row finished); compare them only roughly.",
        "",
        "| row | tool | perplexity | quantize (s) | eval (s) | threads | load | peak RSS (MB): load / +quantize / +eval"
        " | calibration | tf |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in rows if "@calib" not in r["row"]]:
        if r.get("ppl") is None:
            tool = PEERS[r["row"]]["peer"] if r["row"] in PEERS else "postquant"
            lines.append(f"| {r['row']} | {tool} | not measured: {r.get('error', '?')} |"
                         " - | - | - | - | - | - | - |")  # fmt: skip
            continue
        load = r.get("load")
        lines.append(
            f"| {r['row']} | {r.get('peer', 'postquant')} | {r['ppl']:.2f} | {r['quantize_s']} | {r['eval_s']} | "
            f"{r.get('threads', '-')} | {f'{load:.1f}' if load is not None else '-'} | "
            f"{r.get('peak_rss_after_load_mb', '-')} / {r.get('peak_rss_after_quantize_mb', '-')} / "
            f"{r['peak_rss_mb']} | {r['calib'] or '-'} | {r.get('transformers', '-')} |"
        )
    agreements = {}
    for ours, theirs in AGREEMENT:
        a, b = cache / f"codes-{ours}.safetensors", cache / f"codes-{theirs}.safetensors"
        if a.is_file() and b.is_file():
            both_ours = theirs in ROWS  # postquant's codes on both sides: Z against Z, not against -zp
            agreements[f"{ours} / {theirs}"] = agreement(a, b, same_convention=both_ours)
    if agreements:
        write_text_atomic(path.with_name("llm_gptq_agreement.json"), json.dumps(agreements, indent=1))
        lines += [
            "",
            "## GPTQ against llm-compressor's GPTQ, code by code",
            "",
            "Fraction of integer codes that differ (all quantized layers; per layer in",
            "`llm_gptq_agreement.json`; mean over each decoder layer's Linears for layers 0, 1, 2 and the last),",
            "the largest relative difference of the two grids' steps and of offsets (offsets are integers: 1 is",
            "a rounding tie of Z in some group). Layer 0 sees the same inputs in both runs; later layers see each",
            "run's own quantized chain. `benchmarks/llm_gptq_check.py` (`llm_gptq_check.md`) recomputes layer 1",
            "from each tool's layer 0 with postquant's `gptq_codes`.",
            "",
            "| rows | codes | differ | decoder layers 0 / 1 / 2 / 29 | worst layer | differ there |"
            " max step rel. diff | max offset diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pair, ag in agreements.items():
            worst = max(ag["layers"], key=lambda n: ag["layers"][n]["differ"])
            step = max(v["step_rel_diff"] for v in ag["layers"].values())
            zero = max(v["zero_diff"] for v in ag["layers"].values())
            by_block = _by_decoder_layer(ag["layers"])
            profile = " / ".join(f"{by_block[k]:.2%}" for k in (0, 1, 2, max(by_block)))
            lines.append(
                f"| {pair} | {ag['codes']:,} | {ag['differ']:.4%} | {profile} | {worst} | "
                f"{ag['layers'][worst]['differ']:.4%} | {step:.2e} | {zero:.2e} |"
            )
    lines += seed_lines(rows)
    lines += cpu_lines(rows)
    missing = [name for name in [*ROWS, *PEERS] if not any(r["row"] == name for r in rows)]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (rerun the command: finished rows are skipped)."]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _run_subprocess(row: str, cmd: list[str], env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    """Run one row's process; its stderr is passed through (progress) and its tail kept for the record. A
    row that fails or runs past `timeout` seconds is recorded with its error and last progress line."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    tail: list[str] = []

    def pump_err() -> None:
        for chunk in iter(lambda: proc.stderr.read(4096), ""):  # type: ignore[union-attr]
            sys.stderr.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
            del tail[:-8]

    def pump_out() -> None:
        out.append(proc.stdout.read())  # type: ignore[union-attr]

    readers = [threading.Thread(target=f, daemon=True) for f in (pump_err, pump_out)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for t in readers:
        t.join(timeout=10)
    lines = [ln for ln in "".join(out).splitlines() if ln.startswith("{")]
    if lines and not timed_out:
        return json.loads(lines[-1])
    last = "".join(tail).replace("\r", "\n").strip().splitlines()
    progress = last[-1][-200:] if last else ""
    seconds = round(time.perf_counter() - start)
    why = f"stopped after {seconds} s (--timeout)" if timed_out else f"exit {proc.returncode}"
    return {"row": row, "error": f"{why}; last output: {progress}", "ppl": None, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [*ROWS, *PEERS]
    parser.add_argument("--rows", nargs="+", choices=names, default=names)
    parser.add_argument("--row", choices=names, help="run one row in this process and print it as JSON")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--calib-seed",
        type=int,
        default=0,
        help="seed of the calibration windows (0: the tables'); other seeds are stored as <row>@calib<N>",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "postquant-smollm2"
    )
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("POSTQUANT_PEER_PYTHON", "/work/venv-peers/bin/python"),
        help="the Python of the peers' virtualenv (benchmarks/setup_peers.sh); env POSTQUANT_PEER_PYTHON",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a row may run; past it, it is stopped and recorded",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.row:
        try:
            result = run_row(args.row, args)
        except Exception as exc:  # a peer that cannot run here: its error goes into the table
            if args.row not in PEERS:
                raise
            log.exception("%s failed", args.row)
            result = {
                "row": row_key(args.row, args.calib_seed),
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "ppl": None,
            }
        print(json.dumps(result))
        return
    json_path = args.out / "llm.json"
    for row in args.rows:
        rows = json.loads(json_path.read_text()) if json_path.is_file() else []
        key = row_key(row, args.calib_seed)
        if any(r["row"] == key and r.get("ppl") is not None for r in rows):
            log.info("%s: already in %s, skipped", key, json_path)
            continue
        python = args.peer_python if row in PEERS else sys.executable
        cmd = [python, __file__, "--row", row, "--calib-size", str(args.calib_size),
               "--seqlen", str(args.seqlen), "--threads", str(args.threads), "--cache", str(args.cache),
               "--calib-seed", str(args.calib_seed)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        log.info("running %s with %s", row, python)
        result = _run_subprocess(row, cmd, env, args.timeout)
        result["row"] = key  # an error record too
        result.setdefault("calib_seed", args.calib_seed)
        rows = json.loads(json_path.read_text()) if json_path.is_file() else []  # other runs may have added
        rows = [r for r in rows if r["row"] != key] + [result]  # a failed try is replaced
        write_text_atomic(json_path, json.dumps(rows, indent=1))
        write_markdown(rows, args.out / "llm.md", args.cache)
        log.info("%s: %s", row, result)
    rows = json.loads(json_path.read_text()) if json_path.is_file() else []
    write_markdown(rows, args.out / "llm.md", args.cache)


if __name__ == "__main__":
    main()
