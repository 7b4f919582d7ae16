"""Check study findings against the learned-rounding default at its full budget (resnet20, the CLI's defaults).

    OMP_NUM_THREADS=1 python benchmarks/default_check.py            # run what is missing, write the table
    OMP_NUM_THREADS=1 python benchmarks/default_check.py --no-run   # only rewrite the table

The study (`postquant study`) measures each choice at a reduced budget (100 iterations per unit, 256
calibration samples). Before a study finding changes the default recipe, the same change is run here with
`postquant quantize resnet20-cifar10 --method learned` at the default's full budget (200 iterations per unit,
1024 calibration samples), one JSON per (variant, bits, seed) in ``benchmarks/results/default_check/``
(existing JSONs are kept, so an interrupted run resumes). Writes ``default_check/table.md``: mean over the
seeds run, and each seed's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("benchmarks.default_check")
OUT = Path(__file__).parent / "results" / "default_check"
MODEL = "resnet20-cifar10"
# label -> (file prefix, recipe YAML in OUT or None for the CLI default). The YAMLs pin every field that the
# default has changed since they were run (observer, selection), so each row means the same thing tomorrow.
VARIANTS: dict[str, tuple[str, str | None]] = {
    "default (MSE ranges, selection auto)": ("default", None),
    "MSE ranges, all weights learned": ("mse_all", "mse_all.yaml"),
    "MSE ranges, random 0.5 selection at every bit width": ("random_half_mse", "random_half_mse.yaml"),
    "MSE ranges, all weights, 2 blocks per unit": ("two_blocks_mse", "two_blocks_mse.yaml"),
    "MSE ranges, all weights, no start guard": ("no_guard", "no_guard.yaml"),
    "default + learned steps (STE grid codes, weight and activation step sizes)": (
        "auto_act_scales",
        "auto_act_scales.yaml",
    ),
    "min/max ranges, all weights (the default before 2026-12-03)": (
        "minmax_observer",
        "minmax_observer.yaml",
    ),
    "min/max ranges, random 0.5 selection": ("random_half", "random_half.yaml"),
    "min/max ranges, all weights, 2 blocks per unit": ("two_blocks", "two_blocks.yaml"),
    "min/max ranges, all weights, no start guard": ("no_guard_minmax", "no_guard_minmax.yaml"),
}
BITS = {"W4A4": (4, 4), "W2A4": (2, 4)}


def json_path(label: str, bits: str, seed: int) -> Path:
    return OUT / f"{VARIANTS[label][0]}_{bits}_seed{seed}.json"


def run_one(label: str, bits: str, seed: int) -> None:
    w, a = BITS[bits]
    cmd = ["postquant", "quantize", MODEL, "--method", "learned", "--w-bits", str(w), "--a-bits", str(a)]
    cmd += ["--seed", str(seed), "--json", str(json_path(label, bits, seed))]
    recipe = VARIANTS[label][1]
    if recipe is not None:
        cmd += ["--recipe", str(OUT / recipe)]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=OUT)


def table() -> str:
    lines = [
        f"{MODEL}, `postquant quantize --method learned` at the full default budget; top-1 (%), mean over seeds",
        "(each seed in brackets).",
        "",
        "| variant | " + " | ".join(BITS) + " |",
        "|---|" + "---|" * len(BITS),
    ]
    for label in VARIANTS:
        cells = []
        for bits in BITS:
            values = [
                json.loads(p.read_text())["quantized"]
                for seed in range(3)
                if (p := json_path(label, bits, seed)).exists()
            ]
            cells.append(
                f"{statistics.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})" if values else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    parser.add_argument("--no-run", action="store_true", help="only rewrite the table from the JSONs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.no_run:
        for label in args.variants:
            for bits in args.bits:
                for seed in range(args.seeds):
                    if not json_path(label, bits, seed).exists():
                        run_one(label, bits, seed)
    (OUT / "table.md").write_text(table())
    log.info("wrote %s", OUT / "table.md")


if __name__ == "__main__":
    main()
