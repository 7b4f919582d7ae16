"""Quantization on 1 vs N processes (torch.distributed, gloo, one thread each): wall time and the result.

    python benchmarks/distributed.py                       # resnet20-cifar10, the learned default, W4A4
    python benchmarks/distributed.py --method squant --a-bits 8 --worlds 1 2
    python benchmarks/distributed.py --model smollm2-135m --method gptq --w-bits 4 --calib-size 16
    python benchmarks/distributed.py --model smollm2-135m --method learned --w-bits 4 --calib-size 16 \
        --seqlen 128 --iters 25                           # learned rounding, 25 steps per decoder layer
    python benchmarks/distributed.py --method rtn --a-bits 8 --w-bits 4 --mixed loss   # importance split
    python benchmarks/distributed.py --model tiny-llama --method learned --iters 5 --dry-run   # a check

SmolLM2-135M (``--model smollm2-135m``) runs the block path (`postquant.quantize_blocks`, weight-only, groups
of 64 as ``benchmarks/llm.py``, its float cache ``--cache``) on `--calib-size` random windows of `--seqlen`
tokens of ``pydocs-calib.txt`` in batches of 4 (learned rounding: batches of 4 windows per step); rank 0
reports the perplexity on the first `--limit` windows of 512 tokens of ``handbook-eval.txt``. ``tiny-llama``
is the same path on a random 2-layer Llama and random tokens (eval windows of 64 tokens): seconds, to check
the script (with ``--dry-run``, which writes no table) before an hour on SmolLM2.

For each world size the script starts that many processes of itself on this machine (a file store in a
temporary directory, ``OMP_NUM_THREADS=1``), each quantizing the zoo model with the same recipe and calibration
data, as ``torchrun --nproc-per-node N -m postquant quantize`` does. Rank 0 reports the wall time of
`postquant.quantize`, its stages, the seconds its collectives waited (communication plus waiting for slower
ranks), the top-1 on `--limit` test images, and the codes; the table compares them with one process.
Writes ``benchmarks/results/distributed.json`` and ``.md`` (rows of other settings are kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.distributed")


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "method": args.method,
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "calib_size": args.calib_size,
    }
    if args.method in ("learned", "adaround", "brecq", "qdrop"):
        recipe["learned"] = {"progress": False, **({"iters": args.iters} if args.iters else {})}
    if args.mixed:  # an average of --w-bits bits, allocated from the importance measure
        recipe["mixed"] = {"w_bits_budget": float(args.w_bits), "importance": args.mixed}
    return recipe


def worker(args: argparse.Namespace) -> None:
    """One rank: quantize, time it, and (rank 0) evaluate and save what the parent compares."""
    import postquant
    import postquant.distributed as pqdist
    from postquant.model import quantized_layers
    from postquant_lab.evaluate import evaluate
    from postquant_lab.zoo import load_model

    torch.set_num_threads(1)
    waited = [0.0]
    if args.world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{args.store}/store", rank=args.rank, world_size=args.world
        )
        real_wait = pqdist.Ranks._wait

        def timed_wait(self: pqdist.Ranks, work: Any, what: str) -> None:
            start = time.perf_counter()
            try:
                real_wait(self, work, what)
            finally:
                waited[0] += time.perf_counter() - start

        pqdist.Ranks._wait = timed_wait  # type: ignore[method-assign]  # measurement only
    if args.model in LMS:
        qmodel, seconds, score = _lm_run(args)
    else:
        zoo = load_model(args.model)
        recipe = _recipe(args)
        calib = zoo.calib_batches(limit=args.calib_size)
        start = time.perf_counter()
        qmodel = postquant.quantize(zoo.model, recipe, calib=calib, example_inputs=zoo.example_inputs)
        seconds = time.perf_counter() - start
        score = (
            (lambda: evaluate(qmodel, zoo, data=zoo.eval_batches(limit=args.limit)).value)
            if args.rank == 0
            else None
        )
    if args.rank == 0:
        learned = postquant.result(qmodel).learned
        torch.save(
            {
                "seconds": seconds,
                # the data-parallel phase of learned rounding: `reconstruct_unit` over every unit (its steps
                # and the errors before/after), without the walk's per-layer loading and chain passes
                "learning": sum(u.seconds for u in learned.units) if learned is not None else None,
                "stages": postquant.result(qmodel).seconds,
                "waited": waited[0],
                "metric": "perplexity" if args.model in LMS else "top-1",
                "score": score(),  # type: ignore[misc]
                "codes": {n: m.codes.clone() for n, m in quantized_layers(qmodel).items()},
            },
            Path(args.store) / "rank0.pt",
        )
    if args.world > 1:
        torch.distributed.barrier()  # rank 0 has written its results before any rank tears the group down
        torch.distributed.destroy_process_group()


LM = "smollm2-135m"
TINY_LM = "tiny-llama"  # a random Llama: checks the LM path in seconds
LMS = (LM, TINY_LM)


def _lm_recipe(args: argparse.Namespace) -> dict[str, Any]:
    from llm import GROUP  # benchmarks/llm.py: the LLM table's grid

    recipe = {**_recipe(args), "granularity": "group", "group_size": GROUP, "symmetric": False}
    recipe["ignore"] = ["lm_head"]
    recipe.pop("a_bits")
    if "learned" in recipe:
        recipe["learned"] = {**recipe["learned"], "batch_size": args.lm_batch}
    return recipe


def _tiny_llama() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A random 2-layer Llama (hidden 64, so that groups of 64 fit) and random calibration and eval tokens."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 128, (2, 8192), generator=torch.Generator().manual_seed(1))
    return model, tokens[0], tokens[1]


def _lm_run(args: argparse.Namespace) -> tuple[torch.nn.Module, float, Any]:
    """SmolLM2-135M (or the tiny Llama) by the block path: the quantized model, the seconds, and (rank 0) its
    perplexity."""
    import postquant
    from postquant.calib.text import eval_windows, random_windows, tokenize_file
    from postquant.eval.perplexity import perplexity
    from postquant.paths import shared_path

    if args.model == TINY_LM:
        model, calib_ids, eval_ids = _tiny_llama()
        eval_len = 64
    else:
        from llm import load_float  # benchmarks/llm.py: the float model from its safetensors cache

        model, tokenizer = load_float(args.cache)
        if args.layers:  # the first decoder layers only: a quick check of the speed-up, not a model
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        text = shared_path("data", "text")
        calib_ids = tokenize_file(text / "pydocs-calib.txt", tokenizer)
        eval_ids, eval_len = tokenize_file(text / "handbook-eval.txt", tokenizer), 512
    calib = list(random_windows(calib_ids, args.calib_size, args.seqlen, seed=0).split(4))
    start = time.perf_counter()
    qmodel = postquant.quantize_blocks(model, _lm_recipe(args), calib, inplace=True)
    seconds = time.perf_counter() - start
    windows = eval_windows(eval_ids, eval_len, args.limit)
    return qmodel, seconds, lambda: perplexity(qmodel, windows).value


def run_world(args: argparse.Namespace, world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as store:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]),
        }
        base = [sys.executable, __file__, *sys.argv[1:], "--worker", "--world", str(world), "--store", store]
        procs = [subprocess.Popen([*base, "--rank", str(r)], env=env) for r in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"world {world}: ranks exited with {codes}")
        return torch.load(Path(store) / "rank0.pt", weights_only=False)


def write_markdown(rows: dict[str, dict[str, Any]]) -> None:
    """``benchmarks/results/distributed.md`` from the rows of ``distributed.json``."""
    from postquant.store.files import write_text_atomic

    lines = [
        "Wall time of `postquant.quantize` (SmolLM2-135M: `postquant.quantize_blocks`, weight-only, groups of "
        "64, `lm_head` float) on N processes (gloo, 1 thread each, one 2-core machine shared with other work: "
        "`load` is the 1-minute load average before the run; at a load of 10 on 2 cores the speed-up is not "
        "meaningful, only the communication share and the result difference are). `collectives` is the share "
        "of the time rank 0 spent in collectives (communication and waiting for the other rank). Codes are "
        "compared with the 1-process run; top-1 on `n` test images spread over the test set, perplexity on "
        "the first `n` windows of 512 tokens of `handbook-eval.txt`. `learning phase`: the seconds rank 0 spent "
        "in learned rounding's data-parallel phase (`reconstruct_unit` of every unit: its optimisation steps "
        "and the reconstruction errors before and after, without the per-layer weight loading, starting codes "
        "and chain passes around it) and that phase's speed-up; rows measured before 2026-12-05 12:40 did not "
        "record it.",
        "",
        "| model | recipe | processes | quantize | stages (s) | speed-up | learning phase | collectives "
        "| codes differing | metric | score | n | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        stages = ", ".join(f"{k} {v}" for k, v in row["stages"].items() if v >= 0.1)
        learning = f"{row['learning_s']} s, {row['learning_speedup']}x" if row.get("learning_s") else "-"
        lines.append(
            f"| {row['model']} | {row['recipe']} | {row['processes']} | {row['seconds']} s | {stages} | "
            f"{row['speedup']}x | {learning} | {row['collective_share']:.1%} | {row['codes_differing']} | "
            f"{row.get('metric', 'top-1')} | {row.get('score', row.get('top1')):.2f} | {row['limit']} | "
            f"{row['load_1min']} |"
        )
    write_text_atomic(RESULTS / "distributed.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20-cifar10")
    parser.add_argument("--method", default="learned")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=None, help="learned rounding steps per unit (preset's)")
    parser.add_argument(
        "--limit", type=int, default=None, help="test images for top-1 (1000), LM windows (16)"
    )
    parser.add_argument("--seqlen", type=int, default=256, help="calibration window of the LM (tokens)")
    parser.add_argument(
        "--lm-batch", type=int, default=4, help="LM learned rounding: calibration windows per step (4)"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "postquant-smollm2",
        help="SmolLM2's float safetensors cache (benchmarks/llm.py)",
    )  # fmt: skip
    parser.add_argument(
        "--layers", type=int, default=None, help="SmolLM2: keep the first N decoder layers (a quick check)"
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--mixed", choices=["loss", "fisher", "taylor"], default=None,
        help="mixed precision at an average of --w-bits bits, from this importance measure",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="report the rows in the log, write no table (a check)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.limit is None:
        args.limit = 16 if args.model in LMS else 1000
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        worker(args)
        return

    from postquant.store.table import ResultTable

    runs, loads, rows = {}, {}, {}
    for world in args.worlds:
        loads[world] = os.getloadavg()[0]
        runs[world] = run_world(args, world)
    one = runs[min(runs)]
    n_codes = sum(c.numel() for c in one["codes"].values())
    for world, r in runs.items():
        differ = sum(int((r["codes"][n] != c).sum()) for n, c in one["codes"].items())
        key = (
            f"{args.model}|{args.method}|W{args.w_bits}A{args.a_bits}|{args.calib_size}|{args.iters}|{world}"
            + (f"|mixed-{args.mixed}" if args.mixed else "")
        )
        if args.model in LMS:
            key = f"{args.model}|{args.method}|W{args.w_bits}|{args.calib_size}x{args.seqlen}|{args.iters}|{world}"
            if args.lm_batch != 4:  # rows made before the option keep their keys
                key += f"|batch{args.lm_batch}"
            if args.layers:
                key += f"|layers{args.layers}"
        rows[key] = {
            "model": args.model,
            "recipe": (
                f"{args.method} W{args.w_bits} g64 (block path), calib {args.calib_size}x{args.seqlen}"
                if args.model in LMS
                else f"{args.method} W{args.w_bits}A{args.a_bits}, calib {args.calib_size}"
            )
            + (f", iters {args.iters}" if args.iters else "")
            + (f", batch {args.lm_batch}" if args.model in LMS and args.method != "gptq" else "")
            + (f", first {args.layers} layers" if args.layers else "")
            + (f", mixed ({args.mixed} importance)" if args.mixed else ""),
            "processes": world,
            "seconds": round(r["seconds"], 1),
            "stages": {k: round(v, 1) for k, v in r["stages"].items()},
            "speedup": round(one["seconds"] / r["seconds"], 2),
            **(
                {
                    "learning_s": round(r["learning"], 1),
                    "learning_speedup": round(one["learning"] / r["learning"], 2),
                }
                if r.get("learning") and one.get("learning")
                else {}
            ),
            "collective_share": round(r["waited"] / r["seconds"], 3),
            "codes_differing": f"{differ}/{n_codes}",
            "metric": r["metric"],
            "score": r["score"],
            "limit": args.limit,
            "load_1min": round(loads[world], 1),
            "torch": torch.__version__,
        }
    if args.dry_run:
        for key, row in rows.items():
            log.info("dry run, not written: %s %s", key, row)
        return
    table = ResultTable(RESULTS / "distributed.json", indent=2, newline=True)
    table.put_many(rows)
    write_markdown(table.rows)
    log.info("wrote %s", RESULTS / "distributed.md")


if __name__ == "__main__":
    main()
