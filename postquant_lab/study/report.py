"""Study reports: per axis a markdown table (mean +/- std over seeds, delta, wall time, verdict) and a plot.

Verdict rule (stated in every table footer): a variant *helps* (or *hurts*) when its mean differs from the
baseline's mean by more than the larger of the two seed-to-seed standard deviations, and is *within
noise* otherwise. With fewer than two seeds on either side there is no spread to compare with, so the
table says "1 seed: no verdict".
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postquant_lab.study.axes import Axis
from postquant_lab.study.runner import PlannedRun
from postquant_lab.study.settings import StudySettings

log = logging.getLogger(__name__)

VERDICT_RULE = (
    "Verdict: 'helps' / 'hurts' when |mean - baseline mean| > max(std baseline, std variant) (sample std over "
    "seeds), else 'within noise'; fewer than 2 seeds: no verdict. Higher metric is better."
)
HELPS, HURTS, NOISE, NO_VERDICT = "helps", "hurts", "within noise", "1 seed: no verdict"


@dataclass
class Row:
    """One variant of an axis, summarised over seeds."""

    label: str
    values: list[float]
    wall: list[float]
    status: str = ""  # "" when results exist, else "unavailable: ..." / "failed: ..." / "missing"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def verdict(baseline: list[float], variant: list[float]) -> str:
    """'helps' / 'hurts' / 'within noise' for a variant's values against the baseline's (see module doc)."""
    if len(baseline) < 2 or len(variant) < 2:
        return NO_VERDICT
    diff = statistics.fmean(variant) - statistics.fmean(baseline)
    spread = max(statistics.stdev(baseline), statistics.stdev(variant))
    if abs(diff) <= spread:
        return NOISE
    return HELPS if diff > 0 else HURTS


def summarize(
    axis: Axis,
    runs: list[PlannedRun],
    records: list[dict[str, Any]],
    failures: dict[str, str] | None = None,
) -> list[Row]:
    """One `Row` per planned variant, in the axis's order, from the finished `records` of these runs."""
    failures = failures or {}
    by_variant: dict[str, Row] = {}
    done = {(r["variant"], r["seed"]): r for r in records if r["axis"] == axis.name}
    for run in runs:
        row = by_variant.setdefault(run.variant.label, Row(run.variant.label, [], []))
        rec = done.get((run.variant.label, run.seed))
        if rec is None and run.recipe is not None:  # reused from another axis (identical recipe)
            rec = next((r for r in records if r["run_hash"] == run.run_hash), None)
        if rec is not None:
            row.values.append(rec["value"])
            row.wall.append(rec["wall_s"])
        elif run.unavailable is not None:
            row.status = f"unavailable: {run.unavailable}"
        elif run.key in failures:
            row.status = f"failed: {failures[run.key]}"
    for row in by_variant.values():
        if not row.status and len(row.values) < sum(r.variant.label == row.label for r in runs):
            row.status = "missing runs"
    return list(by_variant.values())


def axis_table(axis: Axis, settings: StudySettings, rows: list[Row], metric: str, plot: str | None) -> str:
    """The markdown section of one axis: header, table, footer with the verdict rule, plot link."""
    base = next((r for r in rows if r.label == axis.baseline), None)
    lines = [
        f"### {axis.title} (`{axis.name}`): {settings.model} {settings.bits}",
        "",
        axis.description,
        "",
        f"Base: {settings.header()}. Metric: {metric}.",
        "",
        "| variant | seeds | mean +/- std | delta vs baseline | wall time (s, mean) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(_row_line(axis, row, base))
    lines += ["", VERDICT_RULE]
    if plot is not None:
        lines += ["", f"![{axis.name}]({plot})"]
    return "\n".join(lines) + "\n"


def _row_line(axis: Axis, row: Row, base: Row | None) -> str:
    name = f"**{row.label}** (baseline)" if row.label == axis.baseline else row.label
    if not row.values:
        return f"| {name} | 0 | - | - | - | {row.status or 'missing'} |"
    stat = f"{row.mean:.2f} +/- {row.std:.2f}"
    wall = f"{statistics.fmean(row.wall):.0f}"
    if row.label == axis.baseline:
        verdict_text, delta = "-", "-"
    elif base is None or not base.values:
        verdict_text, delta = "no baseline", "-"
    else:
        verdict_text, delta = verdict(base.values, row.values), f"{row.mean - base.mean:+.2f}"
    if row.status:
        verdict_text += f" ({row.status})"
    return f"| {name} | {len(row.values)} | {stat} | {delta} | {wall} | {verdict_text} |"


def axis_plot(
    axis: Axis, settings: StudySettings, rows: list[Row], metric: str, path: Path, write: bool = True
) -> Path | None:
    """A PNG of each variant's mean with std error bars (baseline dashed); ``None`` when nothing is finished.
    `write` false: nothing is drawn, the path is returned all the same (a rank other than 0 of a study)."""
    if not write:
        return path if any(r.values for r in rows) else None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.values]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(done), 3.2))
    try:
        xs = range(len(done))
        colors = ["tab:gray" if r.label == axis.baseline else "tab:blue" for r in done]
        ax.bar(xs, [r.mean for r in done], yerr=[r.std for r in done], color=colors, capsize=4)
        base = next((r for r in done if r.label == axis.baseline), None)
        if base is not None:
            ax.axhline(base.mean, color="black", linestyle="--", linewidth=0.8)
        lo = min(r.mean - r.std for r in done)
        hi = max(r.mean + r.std for r in done)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(list(xs), [r.label for r in done], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{axis.title}: {settings.model} {settings.bits}", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def verdict_summary(axis: Axis, settings: StudySettings, rows: list[Row]) -> str:
    """One markdown list line: every variant's verdict and delta against the axis's baseline."""
    base = next((r for r in rows if r.label == axis.baseline), None)
    parts = []
    for row in rows:
        if row.label == axis.baseline:
            continue
        if not row.values:
            parts.append(f"{row.label}: {row.status.partition(':')[0] or 'missing'}")
        elif base is None or not base.values:
            parts.append(f"{row.label}: no baseline")
        else:
            parts.append(f"{row.label}: {verdict(base.values, row.values)} ({row.mean - base.mean:+.2f})")
    return f"- {settings.model} {settings.bits}, **{axis.name}** vs {axis.baseline}: " + "; ".join(parts)


def best_helping(axis: Axis, rows: list[Row]) -> str | None:
    """The label of the axis's variant that helps most (verdict 'helps', every seed finished), or None."""
    base = next((r for r in rows if r.label == axis.baseline), None)
    if base is None or len(base.values) < 2 or base.status:
        return None
    helping = [
        row
        for row in rows
        if row.label != axis.baseline and not row.status and verdict(base.values, row.values) == HELPS
    ]
    return max(helping, key=lambda row: row.mean).label if helping else None


def axis_section(
    axis: Axis,
    settings: StudySettings,
    runs: list[PlannedRun],
    records: list[dict[str, Any]],
    out_dir: Path,
    failures: dict[str, str] | None = None,
    write: bool = True,
) -> tuple[str, str, list[Row]]:
    """Summarise one axis and write its plot under ``out_dir/plots/`` (unless `write` is false).

    Returns:
        The markdown section (table, rule, plot link), the one-line verdict summary and the rows.
    """
    rows = summarize(axis, runs, records, failures)
    metric = records[0]["metric"] if records else "metric"
    name = f"{settings.model}_{settings.bits}_{axis.name}.png".replace(" ", "_")
    plot = axis_plot(axis, settings, rows, metric, Path(out_dir) / "plots" / name, write)
    section = axis_table(axis, settings, rows, metric, None if plot is None else f"plots/{name}")
    return section, verdict_summary(axis, settings, rows), rows


def missing_runs(runs: list[PlannedRun], records: list[dict[str, Any]]) -> list[str]:
    """Human-readable list of the available runs that have no result yet."""
    hashes = {r["run_hash"] for r in records}
    return [
        f"{r.axis}: {r.variant.label} seed {r.seed}"
        for r in runs
        if r.recipe is not None and r.run_hash not in hashes
    ]


def study_markdown(sections: list[str], summary: list[str], missing: list[str], commands: list[str]) -> str:
    """The whole STUDY.md: how it was made, the verdicts, every axis section, then the runs still missing."""
    lines = [
        "# Study: the choices of gradient-based PTQ, one axis at a time",
        "",
        "Each table changes one choice of learned rounding (docs/algorithms.md 2.4 and 3) on the same model, bits "
        "and calibration data, repeated over seeds (the seed fixes every random choice: QDrop, batch order, "
        "random selection, synthetic data). Wall time is quantization plus evaluation on a shared 2-core CPU "
        "(1 thread; other jobs running), so it is indicative only.",
        "",
        "Produced by:",
        "",
        *[f"    {c}" for c in commands],
        "",
        VERDICT_RULE,
        "",
        "## Verdicts",
        "",
        *summary,
        "",
        *sections,
        "## Missing runs",
        "",
    ]
    if missing:
        lines += [f"- {m}" for m in missing]
    else:
        lines.append("None: every available run of the requested axes has a result.")
    return "\n".join(lines) + "\n"
