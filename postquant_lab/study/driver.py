"""The two entry points of the study: one axis on one model (`study_axis`), or everything (`study_all`).

In a torch.distributed process group every rank calls them alike (the runner splits the runs over the ranks);
rank 0 alone writes the tables, plots and lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from postquant.distributed import is_main
from postquant.errors import OutputError
from postquant_lab.study.axes import Axis, Variant, combined_axis
from postquant_lab.study.report import Row, axis_section, best_helping, missing_runs, study_markdown
from postquant_lab.study.runner import PlannedRun, StudyRunner, plan_axis, run_axis
from postquant_lab.study.settings import StudySettings

log = logging.getLogger(__name__)

STUDY_FILE = "STUDY.md"
VERDICTS_FILE = "verdicts.md"  # the verdict lines alone (copied into the README)
COMMANDS_FILE = "commands.txt"


@dataclass
class AxisReport:
    """What `study_axis` produced: the markdown section, its one-line verdicts, the runs still missing."""

    section: str
    summary: str
    missing: list[str]
    measured: bool  # the baseline and at least one other variant have results
    best: Variant | None = None  # the variant that helps most (verdict 'helps'), if any
    rows: list[Row] = field(default_factory=list)  # per variant, over seeds, in the axis's order
    baseline: str = ""

    def gain(self, label: str) -> float | None:
        """Mean of variant `label` minus the baseline's, or None unless both have every seed's result."""
        base = next((r for r in self.rows if r.label == self.baseline), None)
        row = next((r for r in self.rows if r.label == label), None)
        if base is None or row is None or base.status or row.status:
            return None
        return row.mean - base.mean


def study_axis(
    settings: StudySettings,
    axis: Axis,
    seeds: list[int],
    runner: StudyRunner,
    labels: list[str] | None = None,
    run: bool = True,
    command: str | None = None,
) -> AxisReport:
    """Run one axis (unless `run` is false: cached results only) and write its table and plot.

    Writes ``OUT/<model>_<bits>_<axis>.md`` (headed by the commands remembered in ``OUT/commands.txt``,
    `command` added) and ``OUT/plots/<model>_<bits>_<axis>.png``.

    Returns:
        The markdown section, the one-line verdicts and the runs still missing.
    """
    out_dir = runner.store.path.parent
    if run:
        runs, records = run_axis(settings, axis, seeds, runner, labels)
    else:
        runs = plan_axis(settings, axis, seeds, labels)
        records = runner.cached(runs)
    section, summary, rows = axis_section(
        axis, settings, runs, records, out_dir, runner.failures, write=is_main()
    )
    commands = _remember(out_dir, command)
    listed = "".join(f"    {c}\n" for c in commands)
    head = f"Produced by (resumable; results accumulate in results.json):\n\n{listed}\n" if commands else ""
    _write(out_dir / f"{settings.model}_{settings.bits}_{axis.name}.md", head + section)
    done = {r["run_hash"] for r in records}  # a shared baseline may be cached under another axis's label
    labels_done = {run.variant.label for run in runs if run.recipe is not None and run.run_hash in done}
    measured = axis.baseline in labels_done and len(labels_done) > 1
    best = best_helping(axis, rows)
    return AxisReport(
        section,
        summary,
        missing_runs(runs, records),
        measured,
        None if best is None else axis.variant(best),
        rows,
        axis.baseline,
    )


def study_all(
    settings_list: list[StudySettings],
    axes: list[Axis],
    seeds: list[int] | None,
    runner: StudyRunner,
    command: str | None = None,
    run: bool = True,
) -> Path:
    """Every axis on every (model, bits) of `settings_list`, then ``OUT/STUDY.md`` from all cached results.

    `seeds` ``None``: each settings' own ``seeds`` (0..seeds-1). The runs go breadth first over the axes
    (`breadth_first`): the baseline, then every axis's first variant, then the second..., so that a time
    budget leaves every axis measured rather than the last ones empty. Missing runs (time budget, failures,
    interrupted earlier sessions) are listed in STUDY.md; running the same command again adds them. Once
    every axis of a (model, bits) is measured, the variants that help are run together against the base
    (`combined_axis`): the best combination found.
    """
    out_dir = runner.store.path.parent
    commands = _remember(out_dir, command)
    sections, summary, missing, measured = [], [], [], []
    for settings in settings_list:
        sections.append(f"## {settings.model} {settings.bits}\n")
        chosen = seeds if seeds is not None else list(range(settings.seeds))
        if run and not runner.out_of_time:  # waits for the runs that other processes sharing OUT are on
            runner.run(settings, breadth_first([plan_axis(settings, axis, chosen) for axis in axes]))
        reports = [(axis, study_axis(settings, axis, chosen, runner, run=False)) for axis in axes]
        combined = _best_combination(settings, reports, chosen, runner, run)
        if combined is not None:
            reports.append(combined)
        for _, report in reports:
            sections.append(report.section)
            summary.append(report.summary)
            measured += [report.summary] if report.measured else []
            missing += [f"{settings.model} {settings.bits} {gap}" for gap in report.missing]
    path = out_dir / STUDY_FILE
    _write(path, study_markdown(sections, summary, missing, commands))
    gaps = f"{len(missing)} runs of these axes are still missing (listed in {STUDY_FILE})." if missing else ""
    _write(out_dir / VERDICTS_FILE, "\n".join([*measured, "", gaps]).strip() + "\n")
    log.info("wrote %s (%d runs missing)", path, len(missing))
    return path


def breadth_first(plans: list[list[PlannedRun]]) -> list[PlannedRun]:
    """The runs of several axes, variant by variant across the axes: every axis's k-th variant (all its seeds
    together) before any axis's (k+1)-th. A run planned twice (a shared baseline) is kept once."""
    by_variant = []
    for runs in plans:
        labels = list(dict.fromkeys(r.variant.label for r in runs))
        by_variant.append([[r for r in runs if r.variant.label == label] for label in labels])
    ordered, seen = [], set()
    for k in range(max((len(v) for v in by_variant), default=0)):
        for variants in by_variant:
            for run in variants[k] if k < len(variants) else []:
                if run.key not in seen and (run.run_hash == "" or run.run_hash not in seen):
                    ordered.append(run)
                    seen.update({run.key, run.run_hash} - {""})
    return ordered


def _best_combination(
    settings: StudySettings,
    reports: list[tuple[Axis, AxisReport]],
    seeds: list[int],
    runner: StudyRunner,
    run: bool,
) -> tuple[Axis, AxisReport] | None:
    """Greedy forward search over the helping variants, once every axis is measured with no run missing.

    The variant with the largest gain starts; each other helping variant (in order of gain) is added and
    kept only if the mean improves on the best so far. Every trial is a row of one `combined` table against
    the base (a single variant's trial reuses its cached runs). None when runs are missing or fewer than two
    variants help (one helping variant is its own best combination).
    """
    if any(report.missing for _, report in reports):
        return None
    parts = [(axis, r.best, r.gain(r.best.label)) for axis, r in reports if r.best is not None]
    ranked = sorted(((a, v, g) for a, v, g in parts if g is not None), key=lambda p: -p[2])
    if len(ranked) < 2:
        log.info(
            "%s %s: %d helping variants, no combination to run", settings.model, settings.bits, len(ranked)
        )
        return None
    kept: list[tuple[Axis, Variant]] = [ranked[0][:2]]
    trials = [list(kept)]
    best_gain: float | None = None  # of the kept trial, measured in the combined table (first: one variant)
    best_index = 0
    for axis_, variant, _ in ranked[1:]:
        trials.append([*kept, (axis_, variant)])
        report = study_axis(
            settings, combined_axis(trials), seeds, runner, run=run and not runner.out_of_time
        )
        if best_gain is None:
            best_gain = report.gain(report.rows[1].label)
        gain = report.gain(report.rows[-1].label)
        if best_gain is None or gain is None:
            break  # runs missing (time budget): the table lists them; the next session goes on from here
        if gain > best_gain:
            kept, best_gain, best_index = trials[-1], gain, len(trials) - 1
    axis = combined_axis(trials, kept=best_index)
    return axis, study_axis(settings, axis, seeds, runner, run=False)


def _remember(out_dir: Path, command: str | None) -> list[str]:
    path = out_dir / COMMANDS_FILE
    commands = path.read_text().splitlines() if path.is_file() else []
    if command and command not in commands:
        commands.append(command)
        _write(path, "\n".join(commands) + "\n")  # rank 0 only
    return commands


def _write(path: Path, text: str) -> None:
    """Write `path` (in a process group: rank 0 only)."""
    if not is_main():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable --out") from exc
