"""The study (postquant_lab.study): axes data, verdict rule, cached and resumable runner, reports, CLI. Tiny models."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import postquant
import postquant_lab.study.runner as runner_mod
from postquant.calib.observers import Observer
from postquant.errors import RecipeError, UnknownNameError
from postquant.store import claims
from postquant_lab.cli import app
from postquant_lab.study import (
    AXES,
    StudyRunner,
    StudySettings,
    get_axis,
    parse_bits,
    study_all,
    study_axis,
    variant_recipe,
    verdict,
)
from postquant_lab.study.axes import combined_axis, fill_bits
from postquant_lab.study.driver import breadth_first
from postquant_lab.study.report import HELPS, HURTS, NO_VERDICT, NOISE
from postquant_lab.study.runner import plan_axis
from postquant_lab.study.settings import OTHER_CALIB, default_settings
from postquant_lab.zoo import ZooModel
from postquant_lab.zoo.datasets import calibration_inputs
from tests.conftest import make_tiny_zoo, require_shared

REPO = Path(__file__).resolve().parents[2]

MODEL = "tiny-resnet"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ axes data


@pytest.mark.parametrize("axis", AXES, ids=lambda a: a.name)
def test_every_variant_validates_into_a_recipe(axis):
    """Every variant's changes make a valid Recipe that keeps the study's seed and base settings."""
    settings = StudySettings(MODEL, "W4A4", iters=5, calib_size=32)
    labels = [v.label for v in axis.variants]
    assert axis.baseline in labels and len(set(labels)) == len(labels)
    for variant in axis.variants:
        recipe = variant_recipe(settings, variant, seed=3)
        assert recipe.seed == 3 and recipe.learned is not None and recipe.learned.iters == 5


def test_variant_changes_reach_the_recipe():
    settings = StudySettings(MODEL, "W2A4", iters=7, calib_size=64)
    rec = variant_recipe(settings, get_axis("selection").variant("band 0.1"), 1)
    assert (rec.w_bits, rec.a_bits, rec.calib_size) == (2, 4, 64)
    assert rec.learned.selection.value == "band" and rec.learned.band == 0.1
    assert rec.learned.init.value == "squant"  # the rest of the `learned` preset is kept
    rec = variant_recipe(settings, get_axis("calib-size").variant("1024"), 0)
    assert rec.calib_size == 1024 and rec.learned.iters == 7


def test_mixed_budget_follows_the_study_bits():
    changes = get_axis("mixed").variant("mixed (loss)").changes
    assert fill_bits(changes, 3) == {"mixed": {"w_bits_budget": 3.0, "importance": "loss"}}


def test_unknown_axis_and_variant_suggest_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'selection'"):
        get_axis("selektion")
    with pytest.raises(UnknownNameError, match=r"band 0\.25"):
        get_axis("selection").variant("band 0.2")


@pytest.mark.parametrize("text", ["4A4", "W", "WxA4", "W4A"])
def test_bad_bits_say_the_format(text):
    with pytest.raises(RecipeError, match="W4A4"):
        parse_bits(text)


def test_parse_bits():
    assert parse_bits("w4a8") == (4, 8) and parse_bits("W3") == (3, None)


# ------------------------------------------------------------------------------------------------ verdict


@pytest.mark.parametrize(
    ("baseline", "variant", "expected"),
    [
        ([80.0, 80.2, 79.8], [81.0, 81.2, 80.8], HELPS),  # +1.0 > std 0.2
        ([80.0, 80.2, 79.8], [79.0, 79.2, 78.8], HURTS),
        ([80.0, 81.0, 79.0], [80.5, 80.6, 80.4], NOISE),  # +0.5 < std 1.0 of the baseline
        ([80.0, 80.1], [79.0, 81.4], NOISE),  # +0.15 < std 1.70 of the variant
        ([80.0], [85.0, 85.1], NO_VERDICT),
        ([80.0, 80.1], [85.0], NO_VERDICT),
    ],
    ids=["helps", "hurts", "noise-baseline-spread", "noise-variant-spread", "1-seed-base", "1-seed-variant"],
)
def test_verdict_rule(baseline, variant, expected):
    assert verdict(baseline, variant) == expected


def test_verdict_boundary_is_within_noise():
    # diff exactly equal to the spread: not larger, so within noise (std of [0, 2] = sqrt(2))
    assert verdict([0.0, 2.0], [1.0 + 2**0.5, 1.0 + 2**0.5]) == NOISE
    assert verdict([0.0, 2.0], [1.0 + 1.5, 1.0 + 1.5]) == HELPS


# ------------------------------------------------------------------------------------------------ runner


@pytest.fixture
def tiny_zoo(tmp_path) -> ZooModel:
    """A tiny residual net whose labels are its own float predictions (FP32 = 100 %), data as .npz files."""
    return make_tiny_zoo(tmp_path, MODEL)


class _Calls(dict):
    """The quantize() calls of the runners given `quantize` (``_runner(out, zoo, calls)``): ``calls["n"]``
    counts them; ``calls["fail_at"] = n`` makes the n-th call raise ``calls["error"]`` (default
    KeyboardInterrupt: Ctrl-C)."""

    def __init__(self) -> None:
        super().__init__(n=0, fail_at=None, error=KeyboardInterrupt)

    def quantize(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        self["n"] += 1
        if self["fail_at"] == self["n"]:
            raise self["error"]("simulated crash")
        return postquant.quantize(*args, **kwargs)


@pytest.fixture
def calls() -> _Calls:
    return _Calls()


SETTINGS = StudySettings(MODEL, "W4A4", iters=4, calib_size=32)
SELECTION = ["all", "random 0.5"]


def _runner(out: Path, zoo: ZooModel, calls: _Calls | None = None, **kwargs) -> StudyRunner:
    """A runner on `zoo`; with `calls`, its quantize() calls are counted there."""
    if calls is not None:
        kwargs["quantize"] = calls.quantize
    return StudyRunner(out, loader=lambda name: zoo, progress=False, **kwargs)


def _axis(*args, **kwargs) -> tuple[str, str, list[str]]:
    report = study_axis(*args, **kwargs)
    return report.section, report.summary, report.missing


def test_runs_are_cached_and_not_repeated(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    section, summary, missing = _axis(
        SETTINGS, get_axis("selection"), [0, 1], _runner(out, tiny_zoo, calls), SELECTION
    )
    assert calls["n"] == 4 and missing == []
    assert summary.startswith("- tiny-resnet W4A4, **selection** vs all: random 0.5: ")
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4
    assert {(r["variant"], r["seed"]) for r in records.values()} == {
        (v, s) for v in SELECTION for s in (0, 1)
    }
    assert all(0 <= r["value"] <= 100 and r["wall_s"] > 0 and r["n"] == 64 for r in records.values())
    assert "| **all** (baseline) | 2 |" in section and "| random 0.5 | 2 |" in section

    section2, _, _ = _axis(SETTINGS, get_axis("selection"), [0, 1], _runner(out, tiny_zoo, calls), SELECTION)
    assert calls["n"] == 4  # a second invocation re-runs nothing
    assert section2 == section
    # another axis's baseline is the same recipe: reused, not run again
    study_axis(SETTINGS, get_axis("variable"), [0, 1], _runner(out, tiny_zoo, calls), ["adaround"])
    assert calls["n"] == 4
    # other base settings are other runs
    other = StudySettings(MODEL, "W4A4", iters=3, calib_size=32)
    study_axis(other, get_axis("selection"), [0], _runner(out, tiny_zoo, calls), ["all"])
    assert calls["n"] == 5


def test_seed_fixes_the_result(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    study_axis(SETTINGS, get_axis("selection"), [0], _runner(out, tiny_zoo, calls), ["random 0.5"])
    first = {r["variant"]: r["value"] for r in json.loads((out / "results.json").read_text()).values()}
    (out / "results.json").unlink()
    study_axis(SETTINGS, get_axis("selection"), [0], _runner(out, tiny_zoo, calls), ["random 0.5"])
    again = {r["variant"]: r["value"] for r in json.loads((out / "results.json").read_text()).values()}
    assert first == again


def test_interrupted_study_resumes(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    calls["fail_at"] = 3
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        study_axis(SETTINGS, get_axis("selection"), [0, 1], _runner(out, tiny_zoo, calls), SELECTION)
    assert len(json.loads((out / "results.json").read_text())) == 2  # the two finished runs were kept
    assert not list(out.glob(".results.json.*"))  # no temporary file left behind
    calls["fail_at"] = None
    _, _, missing = _axis(SETTINGS, get_axis("selection"), [0, 1], _runner(out, tiny_zoo, calls), SELECTION)
    assert calls["n"] == 3 + 2 and missing == []


def test_a_bug_in_one_run_is_reported_and_the_study_goes_on(tmp_path, tiny_zoo, calls):
    calls["fail_at"], calls["error"] = 2, RuntimeError
    runner = _runner(tmp_path, tiny_zoo, calls)
    section, _, missing = _axis(SETTINGS, get_axis("selection"), [0, 1], runner, SELECTION)
    assert calls["n"] == 4 and len(missing) == 1  # the three other runs finished
    assert "failed: RuntimeError: simulated crash (a bug" in section
    _, _, missing = _axis(
        SETTINGS, get_axis("selection"), [0, 1], _runner(tmp_path, tiny_zoo, calls), SELECTION
    )
    assert calls["n"] == 5 and missing == []  # failures are not cached: tried again


def test_two_processes_share_one_results_file(tmp_path, tiny_zoo, calls):
    """Two runners (as two processes, one per core) on one --out: neither loses the other's records, and a
    run the other already finished is not repeated."""
    out = tmp_path / "out"
    first, second = (
        _runner(out, tiny_zoo, calls),
        _runner(out, tiny_zoo, calls),
    )  # both read the (empty) file now
    study_axis(SETTINGS, get_axis("selection"), [0], first, SELECTION)
    assert calls["n"] == 2
    study_axis(SETTINGS, get_axis("selection"), [0, 1], second, SELECTION)
    assert calls["n"] == 4  # seed 1 only: seed 0 was seen on disk although `second` was created before
    records = json.loads((out / "results.json").read_text())
    assert {(r["variant"], r["seed"]) for r in records.values()} == {
        (v, s) for v in SELECTION for s in (0, 1)
    }


def _claim_for(out: Path, run: runner_mod.PlannedRun, pid: int) -> None:
    holder = {"host": socket.gethostname(), "pid": pid, "start": claims.process_start(pid)}
    (out / "results.json.claims").write_text(json.dumps({run.run_hash: holder}))


def test_a_run_claimed_by_another_live_process_is_left_to_it(tmp_path, tiny_zoo, calls, other_process):
    """Processes sharing --out split the runs: a claimed run is skipped, and taken over if its process dies."""
    out = tmp_path / "out"
    out.mkdir()
    runs = plan_axis(SETTINGS, get_axis("selection"), [0], SELECTION)
    _claim_for(out, runs[1], other_process.pid)
    ran_before_death = []

    def die() -> None:
        ran_before_death.append(calls["n"])
        other_process.kill()  # not reaped until the fixture ends: a zombie counts as dead

    killer = threading.Timer(3.0, die)
    killer.start()
    records = _runner(out, tiny_zoo, calls, poll_seconds=0.01).run(SETTINGS, runs)
    killer.join()
    assert ran_before_death == [1]  # the baseline only: the claimed run was left to its live process
    assert calls["n"] == 2 and len(records) == 2  # then its process died: taken over and run here
    assert json.loads((out / "results.json.claims").read_text()) == {}  # every claim released


def test_waiting_picks_up_what_the_other_process_finished(tmp_path, tiny_zoo, calls, other_process):
    out = tmp_path / "out"
    out.mkdir()
    runs = plan_axis(SETTINGS, get_axis("selection"), [0], SELECTION)
    _claim_for(out, runs[1], other_process.pid)
    record = {"axis": "selection", "variant": "random 0.5", "seed": 0, "run_hash": runs[1].run_hash}
    finish = threading.Timer(
        0.5, runner_mod.ResultStore(out).put, (runs[1].key, {**record, "value": 42.0, "wall_s": 1.0})
    )
    finish.start()
    records = _runner(out, tiny_zoo, calls, poll_seconds=0.01).run(SETTINGS, runs)  # waits by default
    finish.join()
    assert calls["n"] == 1  # the baseline only: the other run was the other process's
    assert {r["variant"]: r["value"] for r in records}["random 0.5"] == 42.0


def test_a_run_finished_elsewhere_cannot_be_claimed(tmp_path):
    run = plan_axis(SETTINGS, get_axis("selection"), [0], ["all"])[0]
    mine, theirs = runner_mod.ResultStore(tmp_path), runner_mod.ResultStore(tmp_path)
    theirs.put(run.key, {"run_hash": run.run_hash, "value": 1.0})  # `mine` has not read it yet
    assert not mine.claim(run)
    assert not (tmp_path / "results.json.claims").exists()  # nothing was claimed


def test_study_all_goes_breadth_first_over_the_axes():
    sel, grid = get_axis("selection"), get_axis("grid")
    order = breadth_first([plan_axis(SETTINGS, sel, [0, 1]), plan_axis(SETTINGS, grid, [0, 1])])
    labels = [(r.axis, r.variant.label, r.seed) for r in order]
    assert labels[:6] == [
        ("selection", "all", 0),
        ("selection", "all", 1),  # grid's baseline is the same recipe: kept once
        ("selection", "band 0.25", 0),
        ("selection", "band 0.25", 1),
        ("grid", "power", 0),
        ("grid", "power", 1),
    ]
    assert len(order) == 2 * (len(sel.variants) + 1)


def test_claims_tell_a_live_process_from_a_dead_or_reused_pid(other_process):
    me = claims.this_process()
    assert claims.alive(me)
    assert not claims.alive({**me, "start": "0"})  # the pid now belongs to a process started later
    assert claims.alive({**me, "host": "another-host"})  # cannot be checked: honoured
    other_process.kill()
    other_process.wait()
    assert not claims.alive({**me, "pid": other_process.pid, "start": None})
    assert not claims.alive({**me, "pid": 0})


def test_image_only_variants_are_unavailable_on_text_models():
    text = StudySettings("minilm-l6", "W4", iters=4, calib_size=32)
    for name in ("augmentation", "calib-source"):
        runs = runner_mod.plan_axis(text, get_axis(name), [0])
        skipped = {r.variant.label for r in runs if r.recipe is None}
        assert skipped == {v.label for v in get_axis(name).variants if v.images_only} != set()
        assert all("needs image inputs" in r.unavailable for r in runs if r.recipe is None)
    image = StudySettings("resnet20-cifar10", "W4A4", iters=4, calib_size=32)
    assert all(r.recipe is not None for r in runner_mod.plan_axis(image, get_axis("augmentation"), [0]))


def test_unavailable_variants_are_reported_not_run(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    section, _, _ = _axis(
        SETTINGS, get_axis("calib-source"), [0], _runner(out, tiny_zoo, calls), ["other dataset"]
    )
    assert "unavailable: no other calibration dataset is known for 'tiny-resnet'" in section
    assert calls["n"] == 1  # the baseline only


def test_time_budget_stops_before_new_runs(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    runner = _runner(out, tiny_zoo, calls, max_seconds=0)
    section, _, missing = _axis(SETTINGS, get_axis("selection"), [0, 1], runner, SELECTION)
    assert calls["n"] == 0 and runner.out_of_time
    assert len(missing) == 4 and "missing" in section


def test_study_all_takes_each_models_own_seed_count(tmp_path, tiny_zoo, calls):
    assert (
        default_settings("minilm-l6", "W4").seeds == 2
        and default_settings("resnet20-cifar10", "W4A4").seeds == 3
    )
    assert default_settings("minilm-l6", "W4", seeds=4).seeds == 4
    two = StudySettings(MODEL, "W4A4", iters=4, calib_size=32, seeds=2)
    study_all([two], [get_axis("granularity")], None, _runner(tmp_path, tiny_zoo, calls))
    records = json.loads((tmp_path / "results.json").read_text()).values()
    assert {r["seed"] for r in records} == {0, 1} and calls["n"] == 2 * 3
    assert two.digest() == StudySettings(MODEL, "W4A4", iters=4, calib_size=32, seeds=5).digest()


def test_study_all_writes_tables_and_plots(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    axes = [get_axis("granularity"), get_axis("mixed")]
    path = study_all(
        [SETTINGS], axes, [0, 1], _runner(out, tiny_zoo, calls), command="postquant study all test"
    )
    text = path.read_text()
    assert path == out / "STUDY.md"
    assert (
        (out / "verdicts.md").read_text().startswith("- tiny-resnet W4A4, **granularity** vs block: layer: ")
    )
    assert "### Granularity (`granularity`): tiny-resnet W4A4" in text
    assert "| **block** (baseline) | 2 |" in text and "| layer | 2 |" in text and "| 2 blocks | 2 |" in text
    assert "postquant study all test" in text and "Verdict: 'helps' / 'hurts'" in text
    for name in ("granularity", "mixed"):
        png = out / "plots" / f"{MODEL}_W4A4_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{png.name})" in text
    assert "None: every available run" in text
    assert "## Verdicts\n\n- tiny-resnet W4A4, **granularity** vs block: layer: " in text
    assert calls["n"] == 3 * 2 + 2  # mixed's baseline is granularity's 'block' (the study base)
    assert "| mixed (loss) | 2 |" in text


def test_study_all_lists_missing_runs(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    path = study_all([SETTINGS], [get_axis("loss")], [0], _runner(out, tiny_zoo, calls, max_seconds=0))
    text = path.read_text()
    assert calls["n"] == 0
    for label in ("mse", "fisher", "output"):
        assert f"- tiny-resnet W4A4 loss: {label} seed 0" in text


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_list_and_unknown_axis():
    cli = CliRunner()
    res = cli.invoke(app, ["study", "list"])
    assert res.exit_code == 0
    for axis in AXES:
        assert axis.name in res.output
    res = cli.invoke(app, ["study", "selektion", "resnet20-cifar10"])
    assert res.exit_code == 2 and "Did you mean 'selection'" in res.output


def test_cli_axis_needs_one_model():
    res = CliRunner().invoke(app, ["study", "loss"])
    assert res.exit_code == 2 and "exactly one MODEL" in res.output


@pytest.mark.parametrize("model", ["resnet20-cifar10", "efficientnet-lite0"])
def test_other_calibration_dataset_fits_the_model_input(model):
    """'other dataset' calibration: ImageNet shrunk to CIFAR size, CIFAR blown up to EfficientNet's size."""
    other = OTHER_CALIB[model]
    path = require_shared(*other.parts)
    batches = calibration_inputs(path, other.preprocess, limit=4, batch_size=4)
    side = 32 if model.startswith("resnet") else 224
    assert [tuple(b.shape) for b in batches] == [(4, 3, side, side)]
    assert batches[0].std() > 0.1


def test_every_available_variant_runs(tmp_path, tiny_zoo, calls):
    """One seed of every variant of every axis on the tiny model: none crashes, none fails."""
    runner = _runner(tmp_path / "out", tiny_zoo, calls)
    settings = StudySettings(MODEL, "W4A4", iters=2, calib_size=16)
    for axis in AXES:
        runs, records = runner_mod.run_axis(settings, axis, [0], runner)
        available = {r.variant.label for r in runs if r.unavailable is None}
        assert {r["variant"] for r in records if r["axis"] == axis.name} <= available
        assert len(records) == len(available), axis.name
    assert runner.failures == {}
    assert calls["n"] == len({r["run_hash"] for r in runner.store.records.values()})


def test_mixed_runs_share_one_importance_measurement(tmp_path, tiny_zoo, calls):
    out = tmp_path / "out"
    study_axis(SETTINGS, get_axis("mixed"), [0], _runner(out, tiny_zoo, calls), ["mixed (loss)"])
    (table,) = (out / runner_mod.IMPORTANCE_DIR).glob("importance_*.json")
    written = (table.stat().st_ino, table.stat().st_mtime_ns)
    study_axis(SETTINGS, get_axis("mixed"), [0, 1], _runner(out, tiny_zoo, calls), ["mixed (loss)"])
    assert calls["n"] == 4  # the uniform baseline and the mixed variant, two seeds
    assert json.loads(table.read_text())["rows"]
    # each layer measured once: seed 1 reused seed 0's rows, and the table (replaced whole on a write) is as
    # seed 0 left it
    assert (table.stat().st_ino, table.stat().st_mtime_ns) == written


def test_cli_study_axis_on_resnet20_then_report_only(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    out = tmp_path / "study"
    args = ["study", "selection", "resnet20-cifar10", "--bits", "W4A4", "--seeds", "1", "--iters", "1"]
    args += ["--calib-size", "32", "--limit", "100", "--variants", "band 0.25", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| **all** (baseline) | 1 |" in res.output and "1 seed: no verdict" in res.output
    assert (
        "1 iters/unit, 32 calibration samples, min/max activation ranges, 100 evaluation samples"
        in res.output
    )
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["variant"] for r in records.values()) == ["all", "band 0.25"]
    assert (out / "plots" / "resnet20-cifar10_W4A4_selection.png").is_file()
    table = (out / "resnet20-cifar10_W4A4_selection.md").read_text()
    command = "postquant study selection resnet20-cifar10 --bits W4A4 --seeds 1 --iters 1 --calib-size 32"
    assert table.startswith(f"Produced by (resumable; results accumulate in results.json):\n\n    {command} ")
    assert "--variants 'band 0.25' --out" in table
    # report only: the cached table again, nothing run (random 0.5 was never run, so it is listed missing)
    res = CliRunner().invoke(app, [*args[:-4], "--out", str(out), "--no-run"])
    assert res.exit_code == 0, res.output
    assert "| band 0.25 | 1 |" in res.output and "| random 0.5 | 0 | - | - | - | missing runs |" in res.output
    assert "2 runs missing" in res.output
    assert len(json.loads((out / "results.json").read_text())) == 2
    # `study all` from the cache only: STUDY.md and verdicts.md, the missing runs listed, nothing run
    all_args = ["study", "all", "resnet20-cifar10", "--bits", "W4A4", "--axes", "selection", "--seeds", "1"]
    all_args += ["--iters", "1", "--calib-size", "32", "--limit", "100", "--out", str(out), "--no-run"]
    res = CliRunner().invoke(app, all_args)
    assert res.exit_code == 0, res.output
    study = (out / "STUDY.md").read_text()
    assert "| **all** (baseline) | 1 |" in study and "## Missing runs" in study
    assert "runs of these axes are still missing" in (out / "verdicts.md").read_text()
    assert len(json.loads((out / "results.json").read_text())) == 2


# ------------------------------------------------------------------------------------------------ combination


def test_combined_axis_merges_changes_and_needs_parts():
    gran, grid, dof = get_axis("granularity"), get_axis("grid"), get_axis("dof")
    # parts are merged (and named) in the order of AXES, whatever the order of the trial
    combo = combined_axis(
        [
            [(gran, gran.variant("2 blocks"))],
            [(gran, gran.variant("2 blocks")), (grid, grid.variant("power"))],
        ]
    )
    assert [v.label for v in combo.variants] == [
        "base",
        "granularity: 2 blocks",
        "grid: power + granularity: 2 blocks",
    ]
    assert combo.variants[1].changes == gran.variant("2 blocks").changes  # one variant: its own runs, cached
    recipe = variant_recipe(SETTINGS, combo.variants[2], 0)
    assert recipe.grid.value == "power" and recipe.learned.unit.value == "blocks"
    assert recipe.learned.blocks_per_unit == 2
    # learned fields of two axes are merged field by field, the later axis winning on a shared field
    merged = combined_axis([[(gran, gran.variant("layer")), (dof, dof.variant("+ bias"))]], kept=0)
    learned = variant_recipe(SETTINGS, merged.variants[1], 0).learned
    assert learned.unit.value == "layer" and learned.learn_bias and learned.variable.value == "ste"
    assert "Kept: **dof: + bias + granularity: layer**" in merged.description
    for bad in ([], [[]]):
        with pytest.raises(RecipeError, match="base is the best combination"):
            combined_axis(bad)


def _fake_results(out: Path, values: dict[tuple[str, str], list[float]], combined: Any = None) -> None:
    """Cache made-up results for (axis name, variant) -> one value per seed, as finished runs would;
    `combined`: the axis that the name "combined" stands for."""
    store = runner_mod.ResultStore(out)
    for (name, label), vals in values.items():
        axis = combined if name == "combined" else get_axis(name)
        for run in runner_mod.plan_axis(SETTINGS, axis, range(len(vals)), [label]):
            if run.variant.label == label:
                record = {"axis": axis.name, "variant": label, "seed": run.seed, "run_hash": run.run_hash}
                store.put(run.key, {**record, "metric": "top1", "value": vals[run.seed], "wall_s": 1.0})


GREEDY_AXES = [get_axis("selection"), get_axis("granularity"), get_axis("grid"), get_axis("mixed")]
GREEDY_RESULTS = {
    ("granularity", "block"): [50.0, 50.2],  # the base
    ("granularity", "layer"): [50.1, 50.0],  # within noise
    ("granularity", "2 blocks"): [60.0, 60.2],  # helps most (+10): the search starts here
    ("grid", "power"): [55.0, 55.3],  # helps (+5): tried second
    ("selection", "random 0.5"): [53.0, 53.2],  # helps (+3): tried third
    ("selection", "band 0.25"): [50.0, 50.1],
    ("selection", "band 0.1"): [50.0, 50.1],
    ("mixed", "mixed (loss)"): [40.0, 40.1],  # hurts
}


def test_best_combination_is_a_greedy_search(tmp_path, tiny_zoo, calls):
    """Each helping variant is added in order of gain and kept only if the mean improves."""
    sel, gran, grid = get_axis("selection"), get_axis("granularity"), get_axis("grid")
    two, power, rand = (
        (gran, gran.variant("2 blocks")),
        (grid, grid.variant("power")),
        (sel, sel.variant("random 0.5")),
    )
    trials = combined_axis([[two], [two, power], [two, rand]])
    _fake_results(
        tmp_path,
        {
            **GREEDY_RESULTS,
            ("combined", "grid: power + granularity: 2 blocks"): [58.0, 58.1],  # worse: dropped
            ("combined", "selection: random 0.5 + granularity: 2 blocks"): [63.0, 63.1],  # better: kept
        },
        combined=trials,
    )
    path = study_all([SETTINGS], GREEDY_AXES, [0, 1], _runner(tmp_path, tiny_zoo, calls))
    assert calls["n"] == 0  # every trial was cached
    text = path.read_text()
    assert "Kept: **selection: random 0.5 + granularity: 2 blocks**" in text
    assert (
        "**combined** vs base: granularity: 2 blocks: helps (+10.00); grid: power + granularity: 2 blocks: "
        in text
    )


def test_best_combination_runs_its_trials_and_waits_for_every_axis(tmp_path, tiny_zoo, calls):
    _fake_results(tmp_path, GREEDY_RESULTS)
    study_all([SETTINGS], GREEDY_AXES, [0, 1], _runner(tmp_path, tiny_zoo, calls))
    assert calls["n"] == 4  # two new trials (the first is 2 blocks alone, cached), two seeds each
    assert "### Best combination (`combined`)" in (tmp_path / "STUDY.md").read_text()
    # with a run missing on an axis, no combination is attempted yet
    (tmp_path / "results.json").unlink()
    _fake_results(tmp_path, {("granularity", "2 blocks"): [60.0, 60.2], ("grid", "power"): [55.0, 55.3]})
    study_all([SETTINGS], GREEDY_AXES, [0, 1], _runner(tmp_path, tiny_zoo, calls), run=False)
    assert "combined" not in (tmp_path / "STUDY.md").read_text()


def test_the_committed_study_cache_stays_valid():
    """Every planned run of the complete resnet20 W4A4 study finds its committed result: a change to the
    recipe defaults or to the run hash must not orphan hours of cached runs (the study pins its base)."""
    store = runner_mod.ResultStore(REPO / "benchmarks" / "results" / "study")
    settings = default_settings("resnet20-cifar10", "W4A4")
    runs = [
        r for axis in AXES for r in plan_axis(settings, axis, range(settings.seeds)) if r.recipe is not None
    ]
    assert runs and all(r.recipe.a_observer == Observer.MINMAX for r in runs)
    missing = [r.key for r in runs if store.find(r) is None]
    assert not missing, missing[:3]
