"""SmolLM2-135M-Instruct quantized block by block: perplexity, wall time and peak RSS per method.

Perplexity on the first 16 non-overlapping windows of 512 tokens of ``handbook-eval.txt`` (8,176 predicted
tokens, as ``$POSTQUANT_SHARED/data/text/README.md``); calibration for learned rounding: `--calib-size`
seeded random windows of `--seqlen` tokens of ``pydocs-calib.txt``. Every Linear but ``lm_head`` is quantized,
asymmetric min/max groups of 64 (SmolLM2's hidden size 576 is not a multiple of 128). Caveat: the weights
come from a Q4_1 GGUF (4-bit, groups of 32), so W4 g32 would be lossless; g64 is not.

Each row runs in its own process (`--row`), so its peak RSS (``ru_maxrss``) is its own; rows are appended to
``benchmarks/results/llm.json`` as they finish and skipped when present (rerun the same command to resume).
The dequantized float model is cached once as safetensors in `--cache` (loading the GGUF takes minutes).

Example:
    python benchmarks/llm.py                      # every row
    python benchmarks/llm.py --rows fp32 rtn-w4   # some rows
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from postquant.store.files import write_text_atomic

log = logging.getLogger("llm_bench")

RESULTS = Path(__file__).parent / "results"
GROUP = 64
LEARNED_ITERS = 20
ROWS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "rtn-w4": {"method": "rtn", "w_bits": 4},
    "rtn-w3": {"method": "rtn", "w_bits": 3},
    "squant-w4": {"method": "squant", "w_bits": 4},
    "squant-w3": {"method": "squant", "w_bits": 3},
    "learned-w3": {
        "method": "learned",
        "w_bits": 3,
        "learned": {"iters": LEARNED_ITERS, "batch_size": 4, "progress": False},
    },
}


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
    """One row, in this process: load, quantize block by block, evaluate."""
    import torch

    from postquant.blockwise import quantize_blocks
    from postquant.calib.text import eval_windows, random_windows, tokenize_file
    from postquant.eval.perplexity import perplexity
    from postquant.paths import shared_path

    torch.set_num_threads(args.threads)
    model, tokenizer = load_float(args.cache)
    rss = {"after_load": _peak_rss_mb()}
    text = shared_path("data", "text")
    windows = eval_windows(tokenize_file(text / "handbook-eval.txt", tokenizer), 512, 16)
    seconds = 0.0
    if ROWS[row] is not None:
        calib = random_windows(
            tokenize_file(text / "pydocs-calib.txt", tokenizer), args.calib_size, args.seqlen, seed=0
        )
        start = time.perf_counter()
        model = quantize_blocks(model, recipe_for(row, args.calib_size), list(calib.split(4)), inplace=True)
        seconds = time.perf_counter() - start
    rss["after_quantize"] = _peak_rss_mb()
    start = time.perf_counter()
    ppl = perplexity(model, windows)
    return {
        "row": row,
        "recipe": recipe_for(row, args.calib_size) if ROWS[row] is not None else None,
        "ppl": ppl.value,
        "tokens": ppl.tokens,
        "quantize_s": round(seconds, 1),
        "eval_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_after_load_mb": rss["after_load"],
        "peak_rss_after_quantize_mb": rss["after_quantize"],
        "threads": args.threads,
        "calib": f"{args.calib_size}x{args.seqlen}" if row.startswith("learned") else None,
    }


def _peak_rss_mb() -> int:
    """This process's peak resident set so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def write_markdown(rows: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# SmolLM2-135M-Instruct, quantized block by block (`benchmarks/llm.py`)",
        "",
        "Perplexity on the first 16 windows of 512 tokens of `handbook-eval.txt` (8,176 predicted tokens);",
        f"weight-only, asymmetric min/max groups of {GROUP}, every Linear but `lm_head`; `postquant.blockwise.",
        "quantize_blocks(..., inplace=True)`. Learned rounding: the `learned` preset (SQuant start, QDrop",
        f"p=0.5, lr 1e-2) with {LEARNED_ITERS} iterations per decoder layer, batch 4, calibration windows from",
        "`pydocs-calib.txt`. Peak RSS: the row's own process, after loading, quantizing and evaluating (the first",
        "row to run also dequantizes the GGUF into the cache). The weights come from a Q4_1",
        "GGUF (4-bit groups of 32): W4 g32 would be lossless, g64 is not. Times on a shared, loaded 2-core CPU.",
        "",
        "| row | perplexity | quantize (s) | eval (s) | peak RSS (MB): load / +quantize / +eval | calibration |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['ppl']:.2f} | {r['quantize_s']} | {r['eval_s']} | "
            f"{r.get('peak_rss_after_load_mb', '-')} / {r.get('peak_rss_after_quantize_mb', '-')} / {r['peak_rss_mb']} | "
            f"{r['calib'] or '-'} |"
        )
    missing = [name for name in ROWS if not any(r["row"] == name for r in rows)]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (rerun the command: finished rows are skipped)."]
    write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--row", choices=list(ROWS), help="run one row in this process and print it as JSON")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "postquant-smollm2"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    json_path = args.out / "llm.json"
    rows = json.loads(json_path.read_text()) if json_path.is_file() else []
    for row in args.rows:
        if any(r["row"] == row for r in rows):
            log.info("%s: already in %s, skipped", row, json_path)
            continue
        cmd = [sys.executable, __file__, "--row", row, "--calib-size", str(args.calib_size),
               "--seqlen", str(args.seqlen), "--threads", str(args.threads), "--cache", str(args.cache)]  # fmt: skip
        log.info("running %s", row)
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        write_text_atomic(json_path, json.dumps(rows, indent=1))
        write_markdown(rows, args.out / "llm.md")
        log.info("%s: %s", row, rows[-1])
    write_markdown(rows, args.out / "llm.md")


if __name__ == "__main__":
    main()
