"""One short summary table per capability, computed from the benchmark results in ``benchmarks/results/``.

`benchmarks/update_docs.py` writes ``SUMMARIES[NAME](results)`` between ``<!-- summary:NAME -->`` and
``<!-- /summary:NAME -->`` in the README, so that no number in the README is typed by hand. Each table ends
with the files it was computed from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------ helpers


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _table(header: Iterable[str], rows: Iterable[Iterable[object]], source: str) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join([*lines, "", f"Computed from {source}."])


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def md_table(markdown: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `markdown` whose header starts with `first_header`."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(
                    dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")), strict=False))
                )
            return rows
    raise ValueError(f"no table starting with column {first_header!r}")


def _bits(w_bits: int, a_bits: int | None) -> str:
    return f"W{w_bits}A{a_bits}" if a_bits else f"W{w_bits}"


# ------------------------------------------------------------------------------------------ capabilities


def squant(results: Path) -> str:
    """RTN vs SQuant (data-free) and GPTQ, per model: weight-only W4/W3 and W4A4, plus SQuant's rounding time."""
    rows = []
    for name in ("accuracy", "accuracy_lite0"):
        table = _json(results / f"{name}.json")
        models = dict.fromkeys(r["model"] for r in table.values())
        for model in models:
            fp = table[f"{model}:fp32"]["value"]
            got: dict[tuple[str, str], float] = {}
            for r in table.values():
                if r["model"] == model and r.get("suite") == "gptq" and r["method"] == "gptq":
                    got[(_bits(r["w_bits"], r["a_bits"]), "gptq")] = r["value"]
                if r["model"] != model or r.get("suite") != "squant":
                    continue
                if r["a_bits"] and r.get("act_ranges") == "calib":  # data-free activation ranges only
                    continue
                if r["label"] in ("rtn", "squant", "rtn (data-free acts)", "squant (data-free acts)"):
                    got[(_bits(r["w_bits"], r["a_bits"]), r["method"])] = r["value"]
            for bits in ("W4", "W3", "W4A4"):
                if (bits, "squant") in got:
                    values = [got.get((bits, m)) for m in ("rtn", "squant", "gptq")]
                    best = max(v for v in values if v is not None)
                    cells = [f"**{_f(v)}**" if v == best else _f(v) for v in values]
                    rows.append((model, bits, _f(fp), *cells))
    speed = md_table((results / "squant_speed.md").read_text(), "model")
    text = _table(
        ("model", "bits", "FP32", "RTN", "SQuant", "GPTQ"),
        rows,
        "`benchmarks/results/accuracy.json`, `accuracy_lite0.json` (top-1; MiniLM: Spearman x100; Lite0 on 500 images)",
    )
    times = ", ".join(f"{r['model']} {float(r['SQuant (s)']):.3f} s" for r in speed)
    return text + f"\n\nSQuant rounding of a whole model on one CPU thread: {times} (`squant_speed.md`)."


def learned(results: Path) -> str:
    """Learned rounding (the default recipe and the fast preset) beside RTN, SQuant and the best classic
    preset."""
    table = _json(results / "learned.json")
    fp = {r["model"]: r["value"] for r in table if r["method"] == "fp32"}
    cases: dict[tuple[str, str], dict[str, float]] = {}
    for r in table:
        if r["method"] != "fp32":
            cases.setdefault((r["model"], r["bits"]), {})[r["method"]] = r["value"]

    rows = []
    for (model, bits), got in cases.items():
        if "learned" not in got:
            continue
        classic = [(got[m], m) for m in ("adaround", "brecq", "qdrop") if m in got]
        best = f"{_f(max(classic)[0])} ({max(classic)[1]})" if classic else "-"
        rows.append(
            (
                model,
                bits,
                _f(fp.get(model)),
                _f(got.get("rtn")),
                _f(got.get("squant")),
                best,
                f"**{_f(got['learned'])}**",
                _f(got.get("learned-fast")),
            )
        )
    return _table(
        (
            "model",
            "bits",
            "FP32",
            "RTN",
            "SQuant",
            "best classic preset",
            "learned (default)",
            "learned-fast",
        ),
        rows,
        "`benchmarks/results/learned.json` (classic presets at reduced iteration counts: see `docs/learned.md`; "
        "learned-fast's time: [learned.md](docs/learned.md#fast-preset))",
    )


def power(results: Path) -> str:
    """Uniform vs power grid, weight-only, min/max ranges, exponent searched on the weights."""
    rows = []
    for name in ("power_grid", "power_grid_lite0"):
        table = _json(results / f"{name}.json")
        for key, r in table.items():
            parts = key.split(":")
            if len(parts) != 4 or parts[3] != "uniform":
                continue
            model, bits, method = parts[:3]
            pw = table.get(f"{model}:{bits}:{method}:power")
            rows.append(
                (
                    model,
                    bits,
                    method,
                    _f(table[f"{model}:fp32"]["value"]),
                    _f(r["value"]),
                    _f(pw and pw["value"]),
                )
            )
    return _table(
        ("model", "bits", "rounding", "FP32", "uniform grid", "power grid"),
        rows,
        "`benchmarks/results/power_grid.json`, `power_grid_lite0.json`",
    )


def mixed(results: Path) -> str:
    """Uniform W3 vs the best mixed-precision allocation at an average of 3 weight bits."""
    table = _json(results / "mixed.json")
    rows = []
    for r in table:
        if r["config"] != "W3":
            continue
        same = [m for m in table if (m["model"], m["method"]) == (r["model"], r["method"]) and m is not r]
        best = max(same, key=lambda m: m["value"])
        low = min(same, key=lambda m: m["out_err"])
        rows.append(
            (
                r["model"],
                r["method"],
                _f(r["value"]),
                f"{_f(best['value'])} ({best['config'].removeprefix('mixed-')})",
                f"{r['out_err']:.3f} -> {low['out_err']:.3f}",
            )
        )
    return _table(
        ("model", "rounding", "uniform W3", "mixed, 3 bits avg (best importance)", "output error (lowest)"),
        rows,
        "`benchmarks/results/mixed.json` (MiniLM: Spearman x100; output error: KL of logits or token MSE)",
    )


VERDICT = re.compile(r"^(.*): (helps|hurts|within noise|unavailable)(?: \(([+-][\d.]+)\))?$")


def study(results: Path) -> str:
    """Per model and bits: how many variants help, hurt or are within seed noise, and the best of them."""
    counts: dict[str, dict[str, Any]] = {}
    for line in (results / "study" / "verdicts.md").read_text().splitlines():
        m = re.match(r"^- (\S+ \S+), \*\*([\w-]+)\*\* vs [^:]+: (.*)$", line)
        if not m:
            continue
        case, axis, rest = m.groups()
        c = counts.setdefault(
            case, {"helps": 0, "hurts": 0, "within noise": 0, "best": None, "combined": None}
        )
        for item in rest.split("; "):
            v = VERDICT.match(item)
            if not v or v.group(2) == "unavailable":
                continue
            variant, verdict, gain = v.group(1), v.group(2), float(v.group(3))
            if axis == "combined":
                c["combined"] = max(gain, c["combined"] if c["combined"] is not None else gain)
                continue
            c[verdict] += 1
            if verdict == "helps" and (c["best"] is None or gain > c["best"][0]):
                c["best"] = (gain, f"{axis}: {variant}")
    rows = [
        (
            case,
            c["helps"],
            c["hurts"],
            c["within noise"],
            "-" if c["best"] is None else f"{c['best'][1]} ({c['best'][0]:+.2f})",
            "-" if c["combined"] is None else f"{c['combined']:+.2f}",
        )
        for case, c in counts.items()
    ]
    return _table(
        ("model, bits", "helps", "hurts", "within noise", "best helping variant", "greedy combination"),
        rows,
        "`benchmarks/results/study/verdicts.md` (gains in points over the study's base, mean over seeds)",
    )


def export(results: Path) -> str:
    """ONNX in onnxruntime: the fastest fully integer W8A8 graph vs FP32 and quantize_static, sizes."""
    text = (results / "export.md").read_text()
    speed = {
        r["model"]: r for r in md_table(text, "model") if r.get("threads") == "1" and r.get("batch") == "32"
    }
    top1 = md_table(text.split("## Top-1 and agreement")[1], "model")
    sizes = {r["model"]: r for r in md_table(text.split("checkpoint sizes")[1], "model")}
    cpu = re.search(r"CPUs: .*?\((.*?)\), torch", text)
    host = "VNNI CPU" if cpu and cpu.group(1).endswith("; VNNI") else "x86 CPU without VNNI"
    ours, portable = "full-sim-s8-in8", "full-sim"  # int8 weights, stem input 8-bit; uint8 weights

    def acc(model: str, graph: str) -> dict[str, str]:
        return next(r for r in top1 if r["model"] == model and r["graph"] == graph)

    def ratio(cell: str) -> str:
        return cell.split(" ")[0]

    rows = [
        (
            model,
            f"{acc(model, 'fp32')['top-1 ONNX']} / {acc(model, ours)['top-1 ONNX']} "
            f"(ort {acc(model, 'ort-s8')['top-1 ONNX']})",
            f"{ratio(r[ours])} / {ratio(r[portable])} (ort {ratio(r['ort-s8'])})",
            acc(model, ours)["agreement with the simulation"],
            sizes[model]["FP32"],
            sizes[model]["W4"],
        )
        for model, r in speed.items()
    ]
    return _table(
        (
            "model",
            "top-1 FP32 / W8A8 ONNX",
            "W8A8 speed-up, batch 32: int8 / uint8 weights",
            "agrees with the simulation",
            "FP32 size",
            "W4 checkpoint",
        ),
        rows,
        f"`export.md` (`{ours}` / `{portable}`, 1 thread, {host}; ort: quantize_static)",
    )


def gpu(results: Path) -> str:
    """SQuant's speed and learned rounding on a CUDA device."""
    table = _json(results / "gpu.json")
    total = table["squant"]["total_s"]
    published = next(r for r in md_table((results / "gpu.md").read_text(), "") if "published" in r[""])[
        "whole model (ms)"
    ]
    learned = {r["method"]: r for r in table["learned"]}
    cpu = md_table((results / "gpu.md").read_text().split("## Learned")[1], "method")
    cpu_row = next(r for r in cpu if r["method"] == "learned")
    device = re.search(r"on (NVIDIA [^(]+?) \(", (results / "gpu.md").read_text()).group(1)
    rows = [
        (
            "SQuant, ResNet-18 shapes at 4 bits (whole model)",
            f"{total['squant_many'] * 1e3:.1f} ms (`squant_codes_many`, layers batched)",
            f"published CUDA kernel: {published} ms",
        ),
        (
            "learned rounding, resnet20 W4A4 (default recipe)",
            f"top-1 {_f(learned['learned']['value'])} in {learned['learned']['quantize_s']:.0f} s",
            f"2-core CPU: {cpu_row['CPU top-1']} in {cpu_row['CPU quantize s']} s",
        ),
    ]
    return _table(("", device.strip(), "reference"), rows, "`benchmarks/results/gpu.json` and `gpu.md`")


def llm(results: Path) -> str:
    """SmolLM2-135M perplexity at 4 bits where it runs: postquant's simulation, transformers, llama.cpp."""
    sim = {r["row"]: r["ppl"] for r in _json(results / "llm.json")}
    ct = _json(results / "compressed_tensors.json")
    gguf = _json(results / "gguf.json")["rows"]

    def mb(n: int) -> str:
        return f"{n / 1e6:.0f} MB"

    learned = {
        label: sim[row]
        for row, label in (
            ("learned-w4", ""),
            ("learned-fast-w4", " (fast)"),
            ("learned-fast-w4-range", " (fast, ranges)"),
        )
        if sim.get(row)
    }
    best = min(learned, key=learned.__getitem__) if learned else None
    rows = [
        (
            "PyTorch (postquant)",
            "W4 g64 asym",
            _f(sim["fp32"]),
            _f(sim["rtn-w4"]),
            _f(sim["squant-w4"]),
            f"**{_f(learned[best])}**{best}" if best is not None else "-",
            "-",
        ),
        (
            "transformers",
            f"compressed-tensors {ct['scheme']}",
            _f(ct["perplexity"]["float"]),
            _f(ct["perplexity"]["transformers"]),
            "-",
            "-",
            f"{mb(ct['bytes']['float_safetensors'])} -> {mb(ct['bytes']['export_safetensors'])}",
        ),
        (
            "llama.cpp",
            f"GGUF Q4_0 (llama.cpp's own: {_f(gguf['llama.cpp-q4_0']['ppl'])})",
            _f(gguf["f32"]["ppl"]),
            _f(gguf["rtn-minmax"]["ppl"]),
            _f(gguf["squant-mse"]["ppl"]),
            f"**{_f(gguf['learned-mse']['ppl'])}**",
            f"{mb(gguf['f32']['bytes'])} -> {mb(gguf['learned-mse']['bytes'])}",
        ),
    ]
    return _table(
        ("runs in", "format", "FP32", "RTN", "SQuant", "learned", "size"),
        rows,
        "`benchmarks/results/llm.json`, `compressed_tensors.json`, `gguf.json` (perplexity, lower is better)",
    )


LLM_AUTOROUND_COLUMNS = (
    ("learned-fast", "learned-fast-w{b}"),
    ("+ learned ranges", "learned-fast-w{b}-range"),
    ("+ ranges, 50 steps x 8 windows", "learned-fast-w{b}-range-50x8"),
    ("+ ranges, AutoRound light's recipe", "learned-fast-w{b}-range-ar"),
    ("AutoRound light", "autoround-light-w{b}"),
    ("AutoRound default", "autoround-w{b}"),
)


def _ppl_cell(r: dict[str, Any] | None, best: float | None) -> str:
    """An llm.json row as "perplexity (time, load)", bold when it is the `best` perplexity; "-" when absent."""
    if r is None:
        return "-"
    text = f"{r['ppl']:.2f}" if r["ppl"] < 1000 else f"{r['ppl']:.3g}"
    load = f", load {r['load']:.1f}" if r.get("load") is not None else ""
    return f"{f'**{text}**' if r['ppl'] == best else text} ({r['quantize_s']:.0f} s{load})"


def llm_autoround(results: Path) -> str:
    """SmolLM2-135M perplexity (quantize time) of learned-fast with learned ranges against AutoRound's presets;
    the lowest perplexity of each setting in bold."""
    rows = {r["row"]: r for r in _json(results / "llm.json") if r.get("ppl") is not None}
    table = []
    for bits in (4, 3, 2):
        cells = {label: rows.get(row.format(b=bits)) for label, row in LLM_AUTOROUND_COLUMNS}
        best = min((r["ppl"] for r in cells.values() if r is not None), default=None)
        table.append((f"W{bits} g64", *(_ppl_cell(r, best) for r in cells.values())))
    return _table(
        ("setting", *(label for label, _ in LLM_AUTOROUND_COLUMNS)),
        table,
        "`benchmarks/results/llm.json` (perplexity, lower is better; quantize time on 1 thread of a shared 2-core "
        "CPU at the 1-minute load average given: compare times only roughly)",
    )


SUMMARIES: dict[str, Callable[[Path], str]] = {
    "squant": squant,
    "learned": learned,
    "power": power,
    "mixed": mixed,
    "study": study,
    "export": export,
    "gpu": gpu,
    "llm": llm,
    "llm_autoround": llm_autoround,
}
