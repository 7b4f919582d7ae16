"""MiniLM-L6 W8A8 exported to ONNX QDQ: STS-B Spearman of FP32, the PyTorch simulation and onnxruntime.

A transformer's ONNX outputs and the simulation's differ by a few activation rounding flips that deep
networks amplify, so their output SQNR says little; the task metric says whether the deployed model is as
good as the simulated one. Usage:

    python benchmarks/onnx_sts.py --limit 400 --out benchmarks/results/onnx_sts.md
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from scipy.stats import spearmanr

import postquant
from postquant.io import export_onnx
from postquant.store.files import write_text_atomic
from postquant_lab.zoo import load_model

log = logging.getLogger("onnx_sts")


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=400, help="STS-B test pairs, spread over the set")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_sts.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    zoo = load_model("minilm-l6")
    recipe = {"method": "rtn", "w_bits": 8, "a_bits": 8, "symmetric": True}
    qmodel = postquant.quantize(zoo.model, recipe, calib=zoo.calib_batches(limit=args.calib_size))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        info = export_onnx(qmodel, zoo.example_inputs, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        cosines: dict[str, list[float]] = {
            "FP32 (PyTorch)": [],
            "W8A8 simulation (PyTorch)": [],
            "W8A8 onnxruntime": [],
        }
        gold: list[float] = []
        for pair, scores in zoo.eval_batches(limit=args.limit, batch_size=32):
            gold += [float(s) for s in scores]
            sides: dict[str, list[np.ndarray]] = {k: [] for k in cosines}
            for enc in pair:
                mask = enc["attention_mask"].numpy()
                with torch.no_grad():
                    sides["FP32 (PyTorch)"].append(_pool(zoo.model(**enc)[0].numpy(), mask))
                    sides["W8A8 simulation (PyTorch)"].append(_pool(qmodel(**enc)[0].numpy(), mask))
                onnx_out = session.run(None, {n: enc[n].numpy() for n in names})[0]
                sides["W8A8 onnxruntime"].append(_pool(onnx_out, mask))
            for key, (a, b) in sides.items():
                cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                cosines[key] += cos.tolist()
    rows = [f"| {key} | {100 * spearmanr(c, gold).statistic:.2f} |" for key, c in cosines.items()]
    text = "\n".join(
        [
            "# MiniLM-L6 W8A8: PyTorch simulation vs onnxruntime (STS-B test, Spearman x100)",
            "",
            f"`python benchmarks/onnx_sts.py --limit {args.limit}` on {time.strftime('%Y-%m-%d')}: rtn W8A8, "
            f"symmetric weights, {args.calib_size} calibration sentences, {len(gold)} sentence pairs; "
            f"{info['int8_weight_layers']} 8-bit layers ({info['uint8_weight_layers']} with uint8 weights), "
            f"{info['integer_kernels']} integer kernels in onnxruntime.",
            "",
            "| model | Spearman |",
            "|---|---:|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    log.info("%s", text)


if __name__ == "__main__":
    main()
