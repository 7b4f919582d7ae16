#!/usr/bin/env bash
# Regenerate every results table, then copy them into the README and docs/. Each benchmark keeps its rows in
# benchmarks/results/*.json and skips rows already there (delete a JSON file to measure it again).
# Several hours on a 2-core CPU; run on an otherwise idle machine for meaningful times.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
python3 benchmarks/accuracy.py --suite all --models resnet20-cifar10 resnet56-cifar10 minilm-l6
python3 benchmarks/accuracy.py --suite all --models efficientnet-lite0 --limit 500 \
    --json benchmarks/results/accuracy_lite0.json --out benchmarks/results/accuracy_lite0.md
python3 benchmarks/squant_speed.py --threads 1 --repeats 9 --out benchmarks/results/squant_speed.md
python3 benchmarks/export_bench.py --out benchmarks/results/export.md
python3 benchmarks/onnx_sts.py --limit 400 --out benchmarks/results/onnx_sts.md
# power grid vs uniform grid (lite0 in its own JSON, then merged into power_grid.md)
python3 benchmarks/power_grid.py --models resnet20-cifar10
python3 benchmarks/power_grid.py --models efficientnet-lite0 --limit 500 --json benchmarks/results/power_grid_lite0.json
python3 benchmarks/power_grid.py --models --merge benchmarks/results/power_grid_lite0.json
# the default recipe against QDrop at 10x its iterations, in one run (benchmarks/results/default_vs_qdrop/)
python3 benchmarks/learned_bench.py --threads 1 --models resnet20-cifar10 --bits W4A4 --methods learned qdrop \
    --classic-iters 2000 --out benchmarks/results/default_vs_qdrop
# learned rounding: the commands that produced benchmarks/results/learned.md
while read -r cmd; do [ -n "$cmd" ] && eval "python3 ${cmd#python }"; done < benchmarks/results/learned_commands.txt
# study findings at the default's full budget (benchmarks/results/default_check/)
python3 benchmarks/default_check.py --seeds 3 --settings W2A4
python3 benchmarks/default_check.py --seeds 1 --settings W4A4
python3 benchmarks/default_check.py --seeds 2 --settings "lite0 W4A8" \
    --variants "default (MSE ranges, selection auto)" \
    "default + learned steps (STE grid codes, weight and activation step sizes)"
# chained caching of unit inputs vs model prefixes: time ratio in one run, identical codes
python3 benchmarks/chain_cache.py --models resnet20-cifar10
# mixed precision vs uniform W3 (resumable by row)
python3 benchmarks/mixed_bench.py --models resnet20-cifar10
python3 benchmarks/mixed_bench.py --models minilm-l6
python3 benchmarks/mixed_bench.py --models efficientnet-lite0 --limit efficientnet-lite0=500 --importances loss datafree --calib-size 32
# the study: every model and bits of the issue, breadth first, resumed from results.json; two processes (one per
# core) split the runs by claims; then STUDY.md and verdicts.md from the cache
OMP_NUM_THREADS=1 postquant study all --out benchmarks/results/study &
OMP_NUM_THREADS=1 postquant study all --out benchmarks/results/study &
wait
postquant study all --out benchmarks/results/study --no-run  # seeds per model (3 CIFAR, 2 Lite0/MiniLM)
python3 benchmarks/update_docs.py
