"""The two entry points of the study: one axis on one model (`study_axis`), or everything (`study_all`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from postquant.errors import OutputError
from postquant.study.axes import Axis
from postquant.study.report import axis_section, missing_runs, study_markdown
from postquant.study.runner import StudyRunner, plan_axis, run_axis
from postquant.study.settings import StudySettings

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
    section, summary = axis_section(axis, settings, runs, records, out_dir, runner.failures)
    commands = _remember(out_dir, command)
    listed = "".join(f"    {c}\n" for c in commands)
    head = f"Produced by (resumable; results accumulate in results.json):\n\n{listed}\n" if commands else ""
    _write(out_dir / f"{settings.model}_{settings.bits}_{axis.name}.md", head + section)
    done = {r["run_hash"] for r in records}  # a shared baseline may be cached under another axis's label
    labels_done = {run.variant.label for run in runs if run.recipe is not None and run.run_hash in done}
    measured = axis.baseline in labels_done and len(labels_done) > 1
    return AxisReport(section, summary, missing_runs(runs, records), measured)


def study_all(
    settings_list: list[StudySettings],
    axes: list[Axis],
    seeds: list[int] | None,
    runner: StudyRunner,
    command: str | None = None,
    run: bool = True,
) -> Path:
    """Every axis on every (model, bits) of `settings_list`, then ``OUT/STUDY.md`` from all cached results.

    `seeds` ``None``: each settings' own ``seeds`` (0..seeds-1). Missing runs (time budget, failures,
    interrupted earlier sessions) are listed in STUDY.md; running the same command again adds them.
    """
    out_dir = runner.store.path.parent
    commands = _remember(out_dir, command)
    sections, summary, missing, measured = [], [], [], []
    for settings in settings_list:
        sections.append(f"## {settings.model} {settings.bits}\n")
        for axis in axes:
            chosen = seeds if seeds is not None else list(range(settings.seeds))
            report = study_axis(settings, axis, chosen, runner, run=run and not runner.out_of_time)
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


def _remember(out_dir: Path, command: str | None) -> list[str]:
    path = out_dir / COMMANDS_FILE
    commands = path.read_text().splitlines() if path.is_file() else []
    if command and command not in commands:
        commands.append(command)
        _write(path, "\n".join(commands) + "\n")
    return commands


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable --out") from exc
