"""How many learned-rounding codes a last-bit change of the calibration data moves (resnet20, learned W4A4).

    POSTQUANT_SHARED=../shared python benchmarks/learned_sensitivity.py

Two runs of the `learned` default on the same 1024 calibration images, the second on the images scaled by
1 + 1e-7 (a change of the last float bit, as another summation order makes), one thread each; logs the
share of codes that differ (docs/distributed.md: 2.27 %, as many as 2 data-parallel ranks change).
"""

from __future__ import annotations

import logging
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

import torch

import postquant
from postquant.model import quantized_layers
from postquant_lab import load_model

log = logging.getLogger("benchmarks.learned_sensitivity")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    zoo = load_model("resnet20-cifar10")
    calib = zoo.calib_batches(limit=1024)
    recipe = {"method": "learned", "w_bits": 4, "a_bits": 4}
    runs = {}
    for tag, scale in (("base", 1.0), ("scaled by 1 + 1e-7", 1.0 + 1e-7)):
        start = time.perf_counter()
        qmodel = postquant.quantize(zoo.model, recipe, calib=[b * scale for b in calib])
        runs[tag] = {name: layer.codes.clone() for name, layer in quantized_layers(qmodel).items()}
        log.info("%s: %.1f s", tag, time.perf_counter() - start)
    base, scaled = runs.values()
    diff = sum(int((base[n] != scaled[n]).sum()) for n in base)
    total = sum(c.numel() for c in base.values())
    log.info("codes differing: %d of %d (%.2f %%)", diff, total, 100 * diff / total)


if __name__ == "__main__":
    main()
