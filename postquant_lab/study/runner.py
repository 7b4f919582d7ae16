"""Running the study: every variant of an axis x every seed, on one model and bits, cached and resumable.

Each run builds a recipe (the study base of the model plus the variant's changes plus ``seed``), quantizes
the float model, evaluates it and appends a record to ``OUT/results.json``. The file is rewritten
atomically after every run, so a study can be interrupted (Ctrl-C, a crash, a time budget) and resumed
with the same command: finished runs are never repeated. A run whose effective recipe is identical to one
already finished under another axis (e.g. every axis's baseline is the study base) reuses that result.

Several processes (one per core) may run the same command on one ``OUT``: each claims a run before it starts
it (``OUT/results.json.claims``) and leaves the runs other live processes have claimed to them, so they share
the work without repeating a run. A claim whose process has died is taken over.

In a torch.distributed process group (``torchrun``; `postquant.distributed.current`) the ranks share the work
through the group instead of the claim files: rank 0 sends the records it has, every rank plans the same list
of runs left, rank r runs the runs r, r + N, ... of it (each alone: `postquant.distributed.alone`, so its
`quantize` is a one-process run), and after each round of N runs the records are all-gathered; rank 0 alone
writes ``results.json`` (and the reports), the other ranks hold the records in memory. Without a group (or in
a group of one process) nothing changes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from postquant.api import quantize
from postquant.distributed import Ranks, alone, current
from postquant.errors import PostquantError, RecipeError
from postquant.paths import shared_path
from postquant.progress import progress_bar
from postquant.recipe import Recipe
from postquant.store.files import fingerprint
from postquant.store.table import ResultTable
from postquant_lab.evaluate import evaluate
from postquant_lab.study.axes import Axis, Variant, fill_bits
from postquant_lab.study.settings import DIGEST_LENGTH, OTHER_CALIB, TEXT_MODELS, StudySettings, parse_bits
from postquant_lab.zoo import ZooModel, load_model
from postquant_lab.zoo.datasets import calibration_inputs

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
IMPORTANCE_DIR = "importance"  # OUT/importance/: mixed-precision importance tables, reused across runs


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class PlannedRun:
    """One (variant, seed) of an axis: its recipe, or why it cannot run."""

    axis: str
    variant: Variant
    seed: int
    recipe: Recipe | None
    unavailable: str | None
    run_hash: str = ""
    key: str = ""


# The study base is the `learned` default as it was when the study began; what the study itself changed in the
# default since (2026-12-03: MSE activation ranges, random half selection) is pinned back, so that every cached
# run and every new one share one base. A pinned value is left out of the run hash (`_plan_one`), as a default
# is, so the hashes of the runs cached before the pin stay valid. Pin here whatever default moves next.
STUDY_PINS: dict[str, Any] = {"a_observer": "minmax"}
STUDY_LEARNED: dict[str, Any] = {"selection": "all"}


def variant_recipe(settings: StudySettings, variant: Variant, seed: int) -> Recipe:
    """The recipe of one run: base, then the variant's changes (``learned`` merged field by field), seed.

    Raises:
        RecipeError: the changes do not validate (e.g. a field another branch adds is not there yet).
    """
    base = settings.base_recipe()
    changes = fill_bits(variant.changes, parse_bits(settings.bits)[0])
    data = {**STUDY_PINS, **base, **{k: v for k, v in changes.items() if k != "learned"}}
    data["seed"] = seed
    data["learned"] = {**STUDY_LEARNED, **base["learned"], **changes.get("learned", {})}
    return Recipe.coerce(data)


def plan_axis(
    settings: StudySettings, axis: Axis, seeds: Iterable[int], labels: Iterable[str] | None = None
) -> list[PlannedRun]:
    """Every (variant, seed) run of `axis` (only the variants in `labels` when given; the baseline always)."""
    wanted = list(labels) if labels is not None else [v.label for v in axis.variants]
    if axis.baseline not in wanted:
        wanted.insert(0, axis.baseline)
    variants = [axis.variant(label) for label in wanted]
    runs = []
    for variant in sorted(variants, key=lambda v: axis.variants.index(v)):
        for seed in seeds:
            runs.append(_plan_one(settings, axis, variant, seed))
    return runs


def _plan_one(settings: StudySettings, axis: Axis, variant: Variant, seed: int) -> PlannedRun:
    if variant.calib_data == "other" and settings.model not in OTHER_CALIB:
        reason = (
            f"no other calibration dataset is known for {settings.model!r} (known: {', '.join(OTHER_CALIB)})"
        )
        return PlannedRun(axis.name, variant, seed, None, reason)
    if variant.images_only and settings.model in TEXT_MODELS:
        reason = f"needs image inputs; {settings.model!r} takes text"
        return PlannedRun(axis.name, variant, seed, None, reason)
    try:
        recipe = variant_recipe(settings, variant, seed)
    except RecipeError as exc:
        return PlannedRun(axis.name, variant, seed, None, str(exc))
    # Fields at their defaults are left out, so that a field added to Recipe later (at a default that keeps
    # the old behaviour) does not orphan the results already cached.
    effective = recipe.model_dump(mode="json", exclude_defaults=True, exclude={"learned"})
    if recipe.learned is not None:
        effective["learned"] = recipe.learned.model_dump(
            mode="json", exclude_defaults=True, exclude={"checkpoint_dir", "progress"}
        )
    for fields, pins in ((effective, STUDY_PINS), (effective.get("learned", {}), STUDY_LEARNED)):
        for key, value in pins.items():  # runs cached before a pin was needed keep their hash
            if fields.get(key) == value:
                del fields[key]
    run_hash = fingerprint(
        {"model": settings.model, "recipe": effective, "calib": variant.calib_data, "limit": settings.limit},
        DIGEST_LENGTH,
    )
    key = f"{settings.model}|{settings.bits}|{axis.name}|{variant.label}|seed{seed}|{settings.digest()}|{run_hash}"
    return PlannedRun(axis.name, variant, seed, recipe, None, run_hash, key)


# ------------------------------------------------------------------------------------------------ results


class ResultStore:
    """Finished runs in ``OUT/results.json`` (key -> record), a `ResultTable` rewritten atomically after every
    run and shared by the processes (one per core) running the study on one ``OUT``.

    Every write takes an exclusive lock on ``results.json.lock``, re-reads the file and merges, so no process
    loses another's records, and `refresh` lets a process see what the others finished before it starts a run.
    A run is claimed by its run hash (``results.json.claims``), so that two runs with one effective recipe are
    never run at once.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / RESULTS_FILE
        self.table = ResultTable(
            self.path,
            what="study results file",
            damaged_hint="move it away to start the study afresh",
            writable_hint="choose a writable --out",
        )
        self._by_hash: dict[str, dict[str, Any]] = {}
        self._index()

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """Every finished record, by run key, as of the last read."""
        return self.table.rows

    @property
    def claims_path(self) -> Path:
        return self.table.claims.path

    def refresh(self) -> None:
        """Merge in the records other processes have written since this store last read the file."""
        self.table.refresh()
        self._index()

    def find(self, run: PlannedRun) -> dict[str, Any] | None:
        """The finished record of `run`, or of another run with the identical effective recipe."""
        if run.key in self.records:
            return self.records[run.key]
        return self._by_hash.get(run.run_hash)

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store `record` and rewrite the file atomically (a crash leaves the previous file intact)."""
        self.put_many({key: record})

    def put_many(self, records: dict[str, dict[str, Any]]) -> None:
        """Store `records` in one atomic rewrite of the file."""
        if records:
            self.table.put_many(records)
            self._index()

    def hold(self, records: dict[str, dict[str, Any]], replace: bool = False) -> None:
        """Keep `records` in memory without writing the file (a rank other than 0 of a process group: rank 0
        writes); `replace`: they are all the records there are."""
        self.table.rows = dict(records) if replace else {**self.table.rows, **records}
        self._index()

    def claim(self, run: PlannedRun) -> bool:
        """Claim `run` for this process; False when another live process holds it (a dead one's is taken) or
        has just finished it."""
        with self.table.locked():
            self.refresh()  # records are written under this lock before their claim is released
            return self.find(run) is None and self.table.claims.take(run.run_hash)

    def release(self, run: PlannedRun) -> None:
        """Drop this process's claim on `run` (finished, failed or interrupted)."""
        self.table.release([run.run_hash])

    def held_elsewhere(self, run: PlannedRun) -> bool:
        """Whether another live process has claimed `run`."""
        return self.table.claims.held_elsewhere(run.run_hash)

    def _index(self) -> None:
        self._by_hash = {r["run_hash"]: r for r in self.records.values()}


# ------------------------------------------------------------------------------------------------ running


@dataclass
class _Loaded:
    """A model loaded once per study, with its evaluation data decoded once."""

    zoo: ZooModel
    eval_data: Any
    calib: dict[tuple[str, int], list[Any]] = field(default_factory=dict)


@dataclass
class _CachedEval:
    path: Path
    task: str
    batches: list[Any]
    n: int

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StudyRunner:
    """Runs planned runs, loading each model once; `loader` builds a `ZooModel` from a name (tests inject one).

    Args:
        out_dir: where ``results.json`` lives.
        loader: model name -> `ZooModel` (default `postquant_lab.zoo.load_model`).
        quantize: ``quantize(model, recipe, calib=..., example_inputs=...)`` of each run (default
            `postquant.quantize`; a test counts the runs or fails one with it).
        progress: show a tqdm bar over runs, with ETA.
        max_seconds: stop starting new runs after this much wall time (finished runs are kept).
        poll_seconds: how often to look whether runs that other processes are running have finished.
    """

    def __init__(
        self,
        out_dir: Path,
        loader: Callable[[str], ZooModel] = load_model,
        quantize: Callable[..., torch.nn.Module] = quantize,
        progress: bool = True,
        max_seconds: float | None = None,
        poll_seconds: float = 10.0,
    ) -> None:
        self.store = ResultStore(out_dir)
        self.poll_seconds = poll_seconds
        self.loader = loader
        self.quantize = quantize
        self.progress = progress
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self._loaded: dict[tuple[str, int | None], _Loaded] = {}
        self.failures: dict[str, str] = {}  # key -> reason (not cached: they are tried again next time)
        self.out_of_time = False

    def run(self, settings: StudySettings, runs: list[PlannedRun]) -> list[dict[str, Any]]:
        """Run what is not cached yet; return the records of every available run that is finished.

        A run that another live process has claimed is left to it; at the end this call waits for those runs
        (and runs any that their process gave up). In a process group the ranks split the runs instead
        (`_run_over_ranks`): every rank calls this with the same `runs`.
        """
        ranks = current()
        if ranks is not None:
            self._run_over_ranks(settings, runs, ranks)
            return self.cached(runs)
        todo = [r for r in runs if r.recipe is not None and self.store.find(r) is None]
        log.info(
            "%s: %d runs, %d cached, %d to do", settings.model, len(runs), len(runs) - len(todo), len(todo)
        )
        others = []
        with progress_bar(
            enabled=self.progress, total=len(todo), desc=f"study {settings.model} {settings.bits}"
        ) as bar:
            for run in todo:
                if self._spent():
                    log.warning("time budget spent: %d runs left for a later session", bar.total - bar.n)
                    break
                bar.set_postfix_str(f"{run.axis}: {run.variant.label} seed {run.seed}")
                self.store.refresh()  # another process sharing the file may have finished it meanwhile
                if self.store.find(run) is None and not self._run_claimed(settings, run):
                    others.append(run)
                bar.update()
        self._wait_for(settings, others)
        return self.cached(runs)

    def _run_over_ranks(self, settings: StudySettings, runs: list[PlannedRun], ranks: Ranks) -> None:
        """The runs left, split over the ranks of a process group: rank r runs r, r + N, ... of them, each
        alone; after each round the records (and failures) are all-gathered and rank 0 writes them.

        Every rank plans from rank 0's records, so all agree on the runs left (two planned runs with one
        run hash are run once). The time budget stops every rank after the round in which any rank spent it.
        """
        if ranks.is_main:
            self.store.refresh()
        records = ranks.broadcast_object(
            self.store.records if ranks.is_main else None, "sending rank 0's study records"
        )
        if not ranks.is_main:
            self.store.hold(records, replace=True)
        todo, hashes = [], set()
        for run in runs:
            if run.recipe is not None and self.store.find(run) is None and run.run_hash not in hashes:
                todo.append(run)
                hashes.add(run.run_hash)
        mine = todo[ranks.rank :: ranks.world]
        rounds = math.ceil(len(todo) / ranks.world)
        log.info(
            "%s: %d runs, %d to do on %d ranks (%d here)",
            settings.model,
            len(runs),
            len(todo),
            ranks.world,
            len(mine),
        )
        with progress_bar(
            enabled=self.progress, total=rounds, desc=f"study {settings.model} {settings.bits}", unit="round"
        ) as bar:
            for k in range(rounds):
                done: tuple[str, dict[str, Any] | None, str | None] | None = None
                if k < len(mine) and not self._spent():
                    with alone():
                        record = self._measure(settings, mine[k])
                    done = (mine[k].key, record, self.failures.get(mine[k].key) if record is None else None)
                gathered = ranks.gather_objects((done, self.out_of_time), "gathering the study's runs")
                new = {}
                for finished, _ in gathered:
                    if finished is None:
                        continue
                    key, record, why = finished
                    if record is not None:
                        new[key] = record
                    elif why is not None:
                        self.failures[key] = why
                if ranks.is_main:
                    self.store.put_many(new)
                else:
                    self.store.hold(new)
                bar.update()
                if any(spent for _, spent in gathered):
                    self.out_of_time = True
                    log.warning("time budget spent: %d rounds left for a later session", rounds - k - 1)
                    break

    def _wait_for(self, settings: StudySettings, runs: list[PlannedRun]) -> None:
        """Wait until the runs other processes have claimed are finished; run those they give up.

        A run is given up when its process dies or releases it unfinished (it failed there). It is then run
        here, unless the time budget is spent.
        """
        left = [run for run in runs if self.store.find(run) is None]
        if left:
            log.info("waiting for %d runs that other processes are running", len(left))
        while left:
            self.store.refresh()
            still = []
            for run in left:
                if self.store.find(run) is not None:
                    continue
                if self.store.held_elsewhere(run):
                    still.append(run)
                elif not self._spent() and not self._run_claimed(settings, run):
                    still.append(run)  # claimed again by another process meanwhile
            left = still
            if left:
                time.sleep(self.poll_seconds)

    def _spent(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.out_of_time = True
        return self.out_of_time

    def _run_claimed(self, settings: StudySettings, run: PlannedRun) -> bool:
        """Run `run` under this process's claim; False (nothing run) when another live process holds it."""
        if not self.store.claim(run):
            log.info("%s / %s seed %d: in another process", run.axis, run.variant.label, run.seed)
            return False
        try:
            self._run_one(settings, run)
        finally:
            self.store.release(run)
        return True

    def cached(self, runs: list[PlannedRun]) -> list[dict[str, Any]]:
        """The finished records of `runs` (nothing is run)."""
        return [rec for r in runs if r.recipe is not None and (rec := self.store.find(r)) is not None]

    def _run_one(self, settings: StudySettings, run: PlannedRun) -> None:
        record = self._measure(settings, run)
        if record is not None:
            self.store.put(run.key, record)

    def _measure(self, settings: StudySettings, run: PlannedRun) -> dict[str, Any] | None:
        """Quantize and evaluate one run: its record, or None when it failed (the reason in `failures`)."""
        assert run.recipe is not None
        try:
            loaded = self._load(settings)
            calib = self._calib(loaded, settings.model, run.variant.calib_data, run.recipe.calib_size)
            recipe = run.recipe
            if recipe.mixed is not None:  # runs on the same model, data and grids share one measurement
                mixed = recipe.mixed.model_copy(
                    update={"checkpoint_dir": self.store.path.parent / IMPORTANCE_DIR}
                )
                recipe = recipe.model_copy(update={"mixed": mixed})
            torch.manual_seed(run.seed)
            start = time.perf_counter()
            qmodel = self.quantize(
                loaded.zoo.model, recipe, calib=calib, example_inputs=loaded.zoo.example_inputs
            )
            quantize_s = time.perf_counter() - start
            res = evaluate(qmodel, loaded.zoo, data=loaded.eval_data, progress=False)
        except PostquantError as exc:
            log.warning("%s / %s seed %d failed: %s", run.axis, run.variant.label, run.seed, exc)
            self.failures[run.key] = str(exc)
            return None
        except Exception as exc:  # a bug in one variant must not end an unattended study of hours
            log.exception("%s / %s seed %d crashed", run.axis, run.variant.label, run.seed)
            self.failures[run.key] = f"{type(exc).__name__}: {exc} (a bug: the traceback is in the log)"
            return None
        record = {
            "model": settings.model,
            "bits": settings.bits,
            "axis": run.axis,
            "variant": run.variant.label,
            "seed": run.seed,
            "settings": asdict(settings),
            "base_digest": settings.digest(),
            "run_hash": run.run_hash,
            "metric": res.metric,
            "value": res.value,
            "n": res.n,
            "quantize_s": quantize_s,
            "wall_s": time.perf_counter() - start,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
        }
        log.info(
            "%s / %s seed %d: %.2f in %.1f s", run.axis, run.variant.label, run.seed, res.value, quantize_s
        )
        return record

    def _load(self, settings: StudySettings) -> _Loaded:
        key = (settings.model, settings.limit)
        if key not in self._loaded:
            self._loaded.clear()  # one model (and its decoded evaluation set) in memory at a time
            zoo = self.loader(settings.model)
            data = zoo.eval_batches(limit=settings.limit)
            cached = _CachedEval(data.path, data.task, list(data), data.n)  # decoded once for every run
            self._loaded[key] = _Loaded(zoo, cached)
        return self._loaded[key]

    def _calib(self, loaded: _Loaded, model: str, source: str, n: int) -> list[Any]:
        if (source, n) not in loaded.calib:
            if source == "other":
                other = OTHER_CALIB[model]
                pre = other.preprocess or loaded.zoo.preprocess
                assert pre is not None
                batches = calibration_inputs(shared_path(*other.parts), pre, limit=n)
            else:
                batches = loaded.zoo.calib_batches(limit=n)
            loaded.calib[(source, n)] = batches
        return copy.copy(loaded.calib[(source, n)])


def run_axis(
    settings: StudySettings,
    axis: Axis,
    seeds: Iterable[int],
    runner: StudyRunner,
    labels: Iterable[str] | None = None,
) -> tuple[list[PlannedRun], list[dict[str, Any]]]:
    """Plan and run one axis; return the plan and the finished records (cached ones included)."""
    runs = plan_axis(settings, axis, list(seeds), labels)
    return runs, runner.run(settings, runs)
