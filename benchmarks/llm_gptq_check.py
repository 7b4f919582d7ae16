"""Why postquant's GPTQ and llm-compressor's GPTQ codes differ on SmolLM2-135M: noise or method?

Run after `benchmarks/llm.py --rows gptq-w4 llmc-gptq-w4` (which save both tools' codes and grids in the
float cache). Decoder layer 0 sees the same inputs in both runs; layer 1 sees the output of each tool's
quantized layer 0. For each tool's layer 0 in turn, this script installs that tool's dequantized layer 0 in
the float model, accumulates the Hessians of layer 1's Linears on the same calibration windows, recomputes
layer 1's codes with `postquant.rounding.gptq.gptq_codes` on postquant's grid (which equals llm-compressor's,
see llm_gptq_agreement.json), and reports how far the recomputed codes are from each tool's codes and each
code set's GPTQ objective ``tr((W - Q) H (W - Q)^T)`` under that Hessian (and RTN's, for scale).

If the recomputed codes match the tool whose layer 0 fed them, the two GPTQ implementations make the same
decisions on the same inputs, and the differences come from the inputs (the few layer-0 codes that differ).

    POSTQUANT_SHARED=... python benchmarks/llm_gptq_check.py [--bits 4]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from postquant.calib.text import random_windows, tokenize_file
from postquant.paths import shared_path
from postquant.rounding.gptq import HessianAccumulator, gptq_codes
from postquant.store.files import write_text_atomic

GROUP = 64
NAMES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def dequantize(t: dict[str, torch.Tensor], key: str, postquant_convention: bool) -> torch.Tensor:
    """Weight from saved codes: postquant ``(q + Z) / S``; compressed-tensors ``(q - zp) * scale``."""
    q = t[key].double()
    s = t[key + ".inv_scale"].double().repeat_interleave(GROUP, 1)
    z = t[key + ".zero"].double().repeat_interleave(GROUP, 1)
    return ((q + z) / s if postquant_convention else (q - z) / s).float()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "postquant-smollm2"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm_gptq_check.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours = load_file(str(args.cache / f"codes-gptq-w{args.bits}.safetensors"))
    theirs = load_file(str(args.cache / f"codes-llmc-gptq-w{args.bits}.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(args.cache)
    calib = random_windows(
        tokenize_file(shared_path("data", "text") / "pydocs-calib.txt", tokenizer), 32, 256, 0
    )
    qmax = 2 ** (args.bits - 1) - 1
    lines = [
        f"# GPTQ W{args.bits} g64: layer 1 recomputed from each tool's layer 0 (`benchmarks/llm_gptq_check.py`)",
        "",
        "Codes of decoder layer 1 recomputed by postquant's `gptq_codes` from the Hessians that each tool's",
        "quantized layer 0 produces (same 32x256 calibration windows); fraction of codes that differ from",
        "each tool's own layer-1 codes, and the GPTQ objective tr((W-Q) H (W-Q)^T) of each code set under",
        "that Hessian.",
        "",
        "| layer 0 from | layer 1 Linear | recomputed vs postquant | recomputed vs llm-compressor |"
        " objective: postquant / llm-compressor / recomputed / RTN |",
        "|---|---|---|---|---|",
    ]
    for label, source, convention in (("postquant", ours, True), ("llm-compressor", theirs, False)):
        model = AutoModelForCausalLM.from_pretrained(args.cache, dtype="float32").eval()
        with torch.no_grad():
            for n in NAMES:
                key = f"model.layers.0.{n}"
                model.get_submodule(key).weight.copy_(dequantize(source, key, convention))
        accs = {}
        for n in NAMES:
            layer = model.get_submodule(f"model.layers.1.{n}")
            acc = accs[n] = HessianAccumulator(layer)
            layer.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0]))
        model.model.layers = model.model.layers[:2]  # nothing after layer 1 is needed
        with torch.no_grad():
            for batch in calib.split(8):
                model.model(batch)
        for n in NAMES:
            key = f"model.layers.1.{n}"
            w = model.get_submodule(key).weight.detach()
            h = accs[n].h[0]
            s = ours[key + ".inv_scale"].repeat_interleave(GROUP, 1)
            z = ours[key + ".zero"].repeat_interleave(GROUP, 1)
            recomputed = gptq_codes(w, h, s, z, -qmax - 1, qmax)
            rtn = torch.round(s * w - z).clamp(-qmax - 1, qmax)

            def objective(codes: torch.Tensor, w: torch.Tensor = w, h: torch.Tensor = h, s=s, z=z) -> float:
                d = w.double() - (codes.double() + z.double()) / s.double()
                return float(torch.einsum("ij,jk,ik->", d, h, d))

            diff_ours = float((recomputed != ours[key]).float().mean())
            diff_theirs = float((recomputed != theirs[key]).float().mean())
            lines.append(
                f"| {label} | {n} | {diff_ours:.4%} | {diff_theirs:.4%} | {objective(ours[key]):.4g} / "
                f"{objective(theirs[key]):.4g} / {objective(recomputed):.4g} / {objective(rtn):.4g} |"
            )
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
