"""Issue 17 on a GPU: learned rounding of resnet20 on CUDA with CUDA calibration batches, against the CPU.

    python -m pytest -m cuda -q                      # the cuda-parametrized tests (skip without a GPU)
    python benchmarks/device_check.py --iters 200    # the issue's case, about a minute on one GPU

For each method (the default ``learned`` and the ``qdrop`` preset, W4A4) the model is quantized on the device
from calibration batches on the device, then evaluated; with ``--cpu`` the same run on the CPU is added (same
seeds: the accuracies should agree within a point or so, float rounding may flip a few codes). Prints one line
per run: top-1, the devices of the result's tensors, the wall time.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import postquant
from postquant.eval import evaluate
from postquant.zoo import load_model

log = logging.getLogger("benchmarks.device_check")


class InMemory:
    """Evaluation batches decoded once (`evaluate`'s ``data``)."""

    def __init__(self, data: object) -> None:
        self.task, self.path = data.task, data.path  # type: ignore[attr-defined]
        self.items = list(data)  # type: ignore[call-overload]
        self.n = sum(len(y) for _, y in self.items)

    def __iter__(self):
        return iter(self.items)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20-cifar10")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--cpu", action="store_true", help="also run on the CPU, for comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("postquant").setLevel(logging.WARNING)

    zoo = load_model(args.model)
    data = InMemory(zoo.eval_batches(limit=args.limit))
    calib = zoo.calib_batches(limit=args.calib_size)
    devices = [torch.device(args.device)] + ([torch.device("cpu")] if args.cpu else [])
    for device in devices:
        model = zoo.model.to(device)
        batches = [b.to(device) for b in calib]
        fp = evaluate(model, zoo, data=data, progress=False).value
        log.info("%s float: top-1 %.2f", device, fp)
        for method in ("learned", "qdrop"):
            recipe = {
                "method": method,
                "w_bits": 4,
                "a_bits": 4,
                "learned": {"iters": args.iters, "progress": False},
            }
            start = time.perf_counter()
            q = postquant.quantize(model, recipe, calib=batches)
            seconds = time.perf_counter() - start
            top1 = evaluate(q, zoo, data=data, progress=False).value
            where = sorted({str(t.device) for t in [*q.parameters(), *q.buffers()]})
            log.info("%s %s W4A4: top-1 %.2f, tensors on %s, %.1f s", device, method, top1, where, seconds)


if __name__ == "__main__":
    main()
