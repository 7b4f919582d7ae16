"""Speed of SQuant rounding (``postquant.rounding.squant_codes``) against nearest rounding on whole models.

Random weights with the exact layer shapes of torchvision's ResNet-18 and ResNet-50, and of
EfficientNet-Lite0 (if ``efficientnet_lite_pytorch`` is installed), are put on the per-channel min/max grid
of the SQuant reference (``postquant.grids.fit_uniform_grid``). The integer-domain values x are then rounded
by full SQuant (mode "ekc") and by nearest rounding, on the same x. Times are the best of several repeats
in one run: wall time (``time.perf_counter``), or with ``--clock cpu`` this process's CPU time
(``time.process_time``, less disturbed by other processes on a shared machine; equal to the wall time of a
single-threaded run on an idle one). The grid fit is not timed. ``--baseline FILE`` also times another version
of ``squant.py`` (e.g. ``git show main:postquant/rounding/squant.py > /tmp/squant_main.py``) in the same run,
after checking that it gives the same codes.

    python benchmarks/squant_speed.py --out benchmarks/results/squant_speed.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from postquant.grids import fit_uniform_grid
from postquant.rounding import SquantMode, nearest_codes, squant_codes
from postquant.store.files import write_text_atomic

log = logging.getLogger("squant_speed")

Shape = tuple[int, ...]


def resnet18_shapes() -> list[tuple[str, Shape]]:
    """Conv2d and Linear weight shapes of torchvision's resnet18, in module order."""
    layers: list[tuple[str, Shape]] = [("conv1", (64, 3, 7, 7))]
    c_in = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            layers.append((f"layer{i}.{b}.conv1", (width, c_in, 3, 3)))
            layers.append((f"layer{i}.{b}.conv2", (width, width, 3, 3)))
            if b == 0 and c_in != width:
                layers.append((f"layer{i}.{b}.downsample.0", (width, c_in, 1, 1)))
            c_in = width
    layers.append(("fc", (1000, 512)))
    return layers


def resnet50_shapes() -> list[tuple[str, Shape]]:
    """Conv2d and Linear weight shapes of torchvision's resnet50 (bottleneck, expansion 4), in module order."""
    layers: list[tuple[str, Shape]] = [("conv1", (64, 3, 7, 7))]
    c_in = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            layers.append((f"layer{i}.{b}.conv1", (width, c_in, 1, 1)))
            layers.append((f"layer{i}.{b}.conv2", (width, width, 3, 3)))
            layers.append((f"layer{i}.{b}.conv3", (4 * width, width, 1, 1)))
            if b == 0:
                layers.append((f"layer{i}.{b}.downsample.0", (4 * width, c_in, 1, 1)))
            c_in = 4 * width
    layers.append(("fc", (1000, 2048)))
    return layers


def efficientnet_lite0_shapes() -> list[tuple[str, Shape]] | None:
    """Conv2d and Linear weight shapes of EfficientNet-Lite0 (random init, no download), or None."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    model = EfficientNet.from_name("efficientnet-lite0")
    return [
        (name, tuple(m.weight.shape))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds (on `clock`)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def load_baseline(path: Path) -> Callable[..., torch.Tensor]:
    """`squant_codes` of another version of ``postquant/rounding/squant.py`` (a file)."""
    spec = importlib.util.spec_from_file_location("squant_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.squant_codes


def bench_model(
    layers: list[tuple[str, Shape]],
    bits: int,
    repeats: int,
    seed: int,
    baseline: Callable[..., torch.Tensor] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], list[dict[str, object]]]:
    """Whole-model and per-layer times of SQuant and nearest rounding (and of the baseline's SQuant, whole
    model only); share of codes SQuant changes."""
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for name, shape in layers:
        w = torch.randn(shape, generator=gen) * 0.05
        grid = fit_uniform_grid(w, bits)
        inputs.append((name, shape, grid.to_int(w), grid.qmin, grid.qmax))

    def run_all(round_fn: Callable[..., torch.Tensor]) -> None:
        for _, _, x, qmin, qmax in inputs:
            round_fn(x, qmin, qmax)

    def squant(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        return squant_codes(x, qmin, qmax, SquantMode.EKC)

    runs = {"squant": squant, "nearest": nearest_codes}
    if baseline is not None:
        for name, _, x, qmin, qmax in inputs:
            if not torch.equal(baseline(x, qmin, qmax, SquantMode.EKC), squant(x, qmin, qmax)):
                raise SystemExit(f"--baseline gives other codes than this version on {name}")
        runs["baseline"] = lambda x, a, b: baseline(x, a, b, SquantMode.EKC)
    run_all(squant)  # warm-up
    total = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):  # interleaved, so that a change of load hits all alike
        for key, fn in runs.items():
            total[key] = min(total[key], best_time(lambda fn=fn: run_all(fn), 1, clock))
    rows: list[dict[str, object]] = []
    for name, shape, x, qmin, qmax in inputs:
        changed = (squant(x, qmin, qmax) != nearest_codes(x, qmin, qmax)).float().mean().item()
        rows.append(
            {
                "name": name,
                "shape": shape,
                "weights": x.numel(),
                "squant": best_time(lambda x=x, a=qmin, b=qmax: squant(x, a, b), repeats, clock),
                "nearest": best_time(lambda x=x, a=qmin, b=qmax: nearest_codes(x, a, b), repeats, clock),
                "changed": changed,
            }
        )
    return total, rows


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def report(
    results: dict[str, tuple[dict[str, float], list[dict[str, object]]]], args: argparse.Namespace
) -> str:
    """The markdown report."""
    lines = [
        "# SQuant rounding speed",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `benchmarks/squant_speed.py`: "
        f"random weights (randn * 0.05) with each model's exact layer shapes, per-channel min/max grid at "
        f"{args.bits} bits, full SQuant (mode `ekc`) vs nearest rounding (`torch.round` + clamp) on the same x. "
        f"Best of {args.repeats} repeats in one run ({'process CPU time' if args.clock == 'cpu' else 'wall time'}); "
        "the grid fit is not timed.",
        "",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- load average (1 / 5 / 15 min) at start: {args.load_start}; at end: {load_average()} "
        "(other processes on the machine slow both columns down)",
        "",
        "## Whole models",
        "",
        "| model | layers | weights | SQuant (s) | nearest (s) | SQuant / nearest | codes changed |"
        + (" baseline SQuant (s) | SQuant / baseline |" if args.baseline else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.baseline else ""),
    ]
    for model, (total, rows) in results.items():
        weights = sum(int(r["weights"]) for r in rows)
        changed = sum(float(r["changed"]) * int(r["weights"]) for r in rows) / weights
        lines.append(
            f"| {model} | {len(rows)} | {weights:,} | {total['squant']:.4f} | {total['nearest']:.4f} "
            f"| {total['squant'] / total['nearest']:.1f} | {changed:.2%} |"
            + (
                f" {total['baseline']:.4f} | {total['squant'] / total['baseline']:.2f} |"
                if "baseline" in total
                else ""
            )
        )
    if args.baseline:
        lines += [
            "",
            f"Baseline: `{args.baseline.name}` ({args.baseline_note or 'another version of squant.py'}).",
        ]
    for model, (_, rows) in results.items():
        lines += [
            "",
            f"## {model}: per layer",
            "",
            "| layer | shape | weights | SQuant (ms) | nearest (ms) | ratio | codes changed |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            sq, rtn = float(r["squant"]), float(r["nearest"])
            shape = "x".join(str(d) for d in r["shape"])
            lines.append(
                f"| {r['name']} | {shape} | {int(r['weights']):,} | {sq * 1e3:.2f} | {rtn * 1e3:.3f} "
                f"| {sq / rtn:.0f} | {float(r['changed']):.2%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/squant_speed.md"))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "efficientnet_lite0"])
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time or process CPU time"
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another squant.py to time in the same run"
    )
    parser.add_argument("--baseline-note", default="", help="what the baseline is, for the report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline) if args.baseline else None
    args.load_start = load_average()

    shapes = {
        "resnet18": resnet18_shapes,
        "resnet50": resnet50_shapes,
        "efficientnet_lite0": efficientnet_lite0_shapes,
    }
    results = {}
    for model in args.models:
        layers = shapes[model]()
        if layers is None:
            log.info("%s skipped: efficientnet_lite_pytorch is not installed", model)
            continue
        results[model] = bench_model(layers, args.bits, args.repeats, args.seed, baseline, CLOCKS[args.clock])
        total = results[model][0]
        log.info("%s: SQuant %.4f s, nearest %.4f s", model, total["squant"], total["nearest"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, report(results, args))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
