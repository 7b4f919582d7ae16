"""A self-contained HTML report of a quantization run: per-layer weight SQNR and bits, accuracy vs bits, recipe.

Plots are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend
switch) and embedded as base64 PNGs, so the one HTML file can be mailed or attached to a CI run.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

from torch import nn

from postquant.errors import OutputError
from postquant.eval.metrics import sqnr_db
from postquant.model import fold_batchnorm, quantized_layers
from postquant.outcome import find_result

__all__ = ["layer_table", "write_report"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"


def _reference(qmodel: nn.Module, float_model: nn.Module, example_inputs: Any) -> nn.Module:
    """`float_model` with its BatchNorms folded when `qmodel`'s were (so weights compare like for like)."""
    q_modules = dict(qmodel.named_modules())
    folded_bn = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(q_modules.get(name), nn.Identity)
        for name, m in float_model.named_modules()
    )
    if not folded_bn:
        return float_model
    folded, _ = fold_batchnorm(float_model, example_inputs)
    return folded


def layer_table(
    qmodel: nn.Module, float_model: nn.Module | None = None, example_inputs: Any = None
) -> list[dict[str, Any]]:
    """One row per quantized layer: name, weight/input bits, granularity and weight SQNR (dB).

    Args:
        qmodel: the quantized model.
        float_model: the float model it came from; without it the SQNR is NaN.
        example_inputs: a batch for verifying the BatchNorm fold of `float_model` (optional).

    Returns:
        Rows ``{"layer", "w_bits", "a_bits", "granularity", "params", "sqnr_db"}`` where ``sqnr_db`` is
        ``10 log10(sum w^2 / sum (w - w_hat)^2)`` of the (folded) float weight `w` against the dequantized
        weight `w_hat`.
    """
    reference = _reference(qmodel, float_model, example_inputs) if float_model is not None else None
    rows = []
    for name, layer in quantized_layers(qmodel).items():
        sqnr = math.nan
        if reference is not None:
            w = reference.get_submodule(name).weight.detach()
            if w.shape == layer.weight.shape:
                sqnr = sqnr_db(w, layer.weight)
        act = layer.act_quant
        rows.append(
            {
                "layer": name,
                "w_bits": layer.bits,
                "a_bits": act.bits if act is not None else None,
                "granularity": layer.grid_config.granularity.value,
                "params": layer.codes.numel(),
                "sqnr_db": sqnr,
            }
        )
    return rows


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _layer_plot(rows: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure  # optional dependency (the report extra)

    names = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(6.0, 0.22 * len(rows) + 2), 5.5))
    ax_sqnr, ax_bits = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax_sqnr.bar(range(len(rows)), [r["sqnr_db"] for r in rows], color="tab:blue")
    ax_sqnr.set_ylabel("weight SQNR (dB)")
    ax_sqnr.grid(axis="y", alpha=0.3)
    ax_bits.bar(range(len(rows)), [r["w_bits"] for r in rows], color="tab:orange", label="weights")
    a_bits = [r["a_bits"] if r["a_bits"] is not None else 0 for r in rows]
    ax_bits.plot(range(len(rows)), a_bits, "k.", label="input (0 = float)")
    ax_bits.set_ylabel("bits")
    ax_bits.set_ylim(0, 11)
    ax_bits.legend(loc="upper right", fontsize=7, ncol=2)
    ax_bits.set_xticks(range(len(rows)), names, rotation=90, fontsize=6)
    return _png(fig)


def _weight_bits(result: dict[str, Any]) -> float | None:
    """A result's weight bits: ``w_bits``, or a mixed-precision run's ``avg_w_bits`` (its ``w_bits`` is null)."""
    bits = result.get("w_bits")
    return int(bits) if bits is not None else result.get("avg_w_bits")


def _results_plot(results: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure  # optional dependency (the report extra)

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    series: dict[str, list[tuple[float, float]]] = {}
    results = [r for r in results if _weight_bits(r) is not None]
    for r in results:
        label = (
            f"{r['method']} A{r['a_bits']}"
            if r.get("a_bits") is not None
            else f"{r['method']} (float inputs)"
        )
        series.setdefault(label, []).append((float(_weight_bits(r)), float(r["quantized"])))  # type: ignore[arg-type]
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    fps = {float(r["fp"]) for r in results if r.get("fp") is not None}
    for fp in sorted(fps):
        ax.axhline(fp, color="gray", linestyle="--", linewidth=1)
    if fps:
        ax.plot([], [], color="gray", linestyle="--", label="float")
    metric = results[0].get("metric", "metric") if results else "metric"
    ax.set_xlabel("weight bits")
    ax.set_ylabel(str(metric))
    ax.set_xticks(sorted({_weight_bits(r) for r in results}))  # type: ignore[type-var]
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}"
        return html.escape("-" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}pre{background:#f6f6f6;padding:1em}
img{max-width:100%}"""


def write_report(
    run_dir: str | Path,
    qmodel: nn.Module | None = None,
    float_model: nn.Module | None = None,
    results: list[dict[str, Any]] | None = None,
    example_inputs: Any = None,
) -> Path:
    """Write ``<run_dir>/report.html``: one self-contained file with embedded PNG plots.

    Args:
        run_dir: the folder to write into (created).
        qmodel: a quantized model: per-layer bits, weight SQNR (needs `float_model`) and its recipe as YAML.
        float_model: the float model `qmodel` came from.
        results: accuracy rows ``{"method", "w_bits", "a_bits", "metric", "fp", "quantized"}`` for the
            accuracy-vs-bits plot and table.
        example_inputs: a batch to verify the BatchNorm fold of `float_model` (optional).

    Returns:
        The path of the HTML file.

    Raises:
        OutputError: `run_dir` cannot be written.
    """
    run_dir = Path(run_dir).expanduser()
    parts = ["<h1>postquant report</h1>"]
    if qmodel is not None:
        rows = layer_table(qmodel, float_model, example_inputs)
        finite = [r["sqnr_db"] for r in rows if math.isfinite(r["sqnr_db"])]
        summary = f"{len(rows)} quantized layers, {sum(r['params'] for r in rows):,} weights"
        if finite:
            summary += (
                f"; weight SQNR median {sorted(finite)[len(finite) // 2]:.1f} dB, min {min(finite):.1f} dB"
            )
        parts += ["<h2>Layers</h2>", f"<p>{html.escape(summary)}</p>"]
        if rows:
            parts += [
                _img(_layer_plot(rows), "per-layer weight SQNR and bits"),
                _table(rows, ["layer", "w_bits", "a_bits", "granularity", "params", "sqnr_db"]),
            ]
        done = find_result(qmodel)
        recipe = done.recipe if done is not None else None
        text = recipe.to_yaml() if recipe is not None else "(the model carries no recipe)"
        parts += ["<h2>Recipe</h2>", f"<pre>{html.escape(text)}</pre>"]
    if results:
        parts += [
            "<h2>Accuracy vs bits</h2>",
            _img(_results_plot(results), "accuracy vs weight bits"),
            _table(results, ["method", "w_bits", "a_bits", "metric", "fp", "quantized"]),
        ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>postquant report</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    path = run_dir / REPORT_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise OutputError(
            f"cannot write the report to {path}: {exc.strerror or exc}; choose a writable run_dir"
        ) from exc
    log.info("wrote report %s", path)
    return path
