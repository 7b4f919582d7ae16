"""Cost of activation calibration against plain forward passes of the same samples (issue targets printed).

For each model: the calibration batches (256 samples, batches of 32) run once through the weight-quantized
model with no hooks (the plain pass), then `calibrate_from_data` observes every layer input over the same
batches with each observer (minmax, percentile, mse); 256 Gaussian noise images run once through the float
model, then `bn_noise_ranges` (percentile) observes them through the BN-matched float model. Each ratio is
calibration time / plain-pass time of the same samples, measured in one process (the plain pass is timed
before each round of the observers and after the last; `--rounds` interleaved rounds, the fastest run of each
used). Then whole `quantize` calls: SQuant W8A8 with the
data-free default (the README's first command), SQuant W4A4 with bn-noise ranges, RTN W8A8 from 256
calibration images.

    python benchmarks/calib_speed.py --out benchmarks/results/calib_speed.md
    python benchmarks/calib_speed.py --models resnet20-cifar10 --threads 1
    python benchmarks/calib_speed.py --reuse-memory   # malloc keeps freed memory, as the CLI may

The machine's load average is printed with the results: compare ratios, or times taken in one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

import torch

import postquant
from postquant.calib.act_ranges import bn_noise_ranges, calibrate_from_data
from postquant.calib.data import forward_all
from postquant.model import quantized_layers
from postquant.plan import make_plan
from postquant.recipe import Recipe
from postquant.store.files import write_text_atomic
from postquant_lab.zoo import load_model

log = logging.getLogger("calib_speed")
RESULTS = Path(__file__).parent / "results"
CALIB_SIZE = 256
# Targets of issue 21 (item 2) and issue 15, on an idle 2-core CPU.
TARGETS = {
    "ratio": 2.0,  # calibration / plain forward passes of the same samples
    "efficientnet-lite0 squant W4A4 bn-noise": 20.0,  # seconds
    "efficientnet-lite0 rtn W8A8 calib": 15.0,  # seconds
}


def _timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def measure(
    name: str,
    quantize_threads: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Ratios and quantize times of one zoo model (rows of the result table).

    ``quantize_threads``: torch threads for the whole `quantize` calls only (None: the current setting, which
    the ratio rows use too); the previous setting is restored after them. ``clock``: what the ratio rows
    time (`time.process_time` on one thread: the process's CPU time, which other processes sharing the cores
    do not lengthen); the whole `quantize` calls are always timed by the wall clock. ``rounds``: the plain
    pass and the observers run in turn this many times (the plain pass once more at the end); each ratio is
    the fastest observer run over the fastest plain pass, the least disturbed runs on a shared machine.
    """
    zoo = load_model(name)
    calib = zoo.calib_batches(limit=CALIB_SIZE)
    rows: list[dict[str, Any]] = []

    qmodel = postquant.quantize(zoo.model, {"method": "rtn", "w_bits": 8}, calib=calib)
    layers = quantized_layers(qmodel)
    a_bits = dict.fromkeys(layers, 8)
    kinds = ("minmax", "percentile", "mse")
    plain, observed = [], {kind: [] for kind in kinds}
    for _ in range(rounds):  # interleaved: a slow spell of the host hits both sides
        plain.append(_timed(lambda: forward_all(qmodel, calib), clock))
        for kind in kinds:
            observed[kind].append(
                _timed(
                    lambda kind=kind: calibrate_from_data(
                        qmodel, layers, a_bits, calib, kind, progress=False
                    ),
                    clock,
                )
            )
    plain.append(_timed(lambda: forward_all(qmodel, calib), clock))
    for kind, seconds in observed.items():
        rows.append(_ratio_row(name, f"calibrate_from_data {kind}", min(seconds), min(plain), plain))

    float_model = copy.deepcopy(zoo.model).eval()
    example = zoo.example_inputs
    noise = list(torch.randn(CALIB_SIZE, *example.shape[1:], generator=torch.Generator()).split(64))
    plan = make_plan(zoo.model, Recipe.coerce({"method": "squant", "w_bits": 8, "a_bits": 8}))
    names = {n: 8 for n, lp in plan.items() if lp.a_bits is not None}
    plain, noise_runs = [], []
    for _ in range(rounds):
        plain.append(_timed(lambda: forward_all(float_model, noise), clock))
        noise_runs.append(
            _timed(
                lambda: bn_noise_ranges(
                    copy.deepcopy(float_model), names, example, "percentile", progress=False
                ),
                clock,
            )
        )
    plain.append(_timed(lambda: forward_all(float_model, noise), clock))
    rows.append(_ratio_row(name, "bn_noise_ranges percentile", min(noise_runs), min(plain), plain))

    recipes = {
        "squant W8A8 data-free (README's first command)": (
            {"method": "squant", "w_bits": 8, "a_bits": 8},
            None,
        ),
        "squant W4A4 bn-noise": (
            {"method": "squant", "w_bits": 4, "a_bits": 4, "act_ranges": "bn-noise"},
            None,
        ),
        "rtn W8A8 calib": ({"method": "rtn", "w_bits": 8, "a_bits": 8, "act_ranges": "calib"}, calib),
    }
    ratio_threads = torch.get_num_threads()
    if quantize_threads:
        torch.set_num_threads(quantize_threads)
    threads = torch.get_num_threads()
    for label, (recipe, data) in recipes.items():
        seconds = _timed(
            lambda recipe=recipe, data=data: postquant.quantize(
                zoo.model, recipe, calib=data, example_inputs=example
            )
        )
        target = TARGETS.get(f"{name} {label}")
        rows.append(
            {
                "model": name,
                "case": f"quantize {label}",
                "seconds": seconds,
                "target_s": target,
                "threads": threads,
            }
        )
        log.info("%s quantize %s: %.1f s (%d threads)", name, label, seconds, threads)
    torch.set_num_threads(ratio_threads)
    return rows


def _ratio_row(model: str, case: str, seconds: float, base: float, plain: list[float]) -> dict[str, Any]:
    log.info("%s %s: %.1f s, %.2fx the plain pass (%s s)", model, case, seconds, seconds / base, plain)
    return {
        "model": model,
        "case": case,
        "seconds": seconds,
        "plain_pass_s": base,
        "ratio": seconds / base,
        "target_ratio": TARGETS["ratio"],
    }


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    out = [
        header,
        "",
        "| model | case | seconds | plain pass | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain = f"{r['plain_pass_s']:.1f} s" if "plain_pass_s" in r else ""
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        target = (
            f"<= {r['target_ratio']:.0f}x"
            if "target_ratio" in r
            else f"<= {r['target_s']:.0f} s"
            if r.get("target_s")
            else ""
        )
        out.append(f"| {r['model']} | {r['case']} | {r['seconds']:.1f} | {plain} | {ratio} | {target} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=["resnet20-cifar10", "efficientnet-lite0"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "calib_speed.md")
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved plain/observer rounds (fastest used)"
    )
    parser.add_argument(
        "--reuse-memory", action="store_true", help="malloc keeps freed memory (postquant.allocator)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    reused = False
    if args.reuse_memory:
        from postquant.allocator import reuse_freed_memory  # here: the script also measures older versions

        reused = reuse_freed_memory()
    load_before = os.getloadavg()
    rows = [row for name in args.models for row in measure(name, rounds=args.rounds)]
    load_after = os.getloadavg()
    header = (
        f"Activation calibration cost ({postquant.__file__}): {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, freed memory reused: {reused}; "
        "load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after."
    )
    text = markdown(rows, header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
