"""Two gloo processes on this machine against one process: the same codes and ranges, typed errors.

Each spawn starts two `worker.py` processes (a file store in a temporary directory, localhost only) with a
bounded wall time; one spawn runs every scenario that leaves the group usable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.blockwise import _shard_of, _unit_data
from postquant.distributed import current, shard_bounds, split_work
from postquant.reconstruct.capture import Captured
from postquant.reconstruct.chains import Chain, ChainMemory
from postquant.reconstruct.params import uniform_rows
from postquant.reconstruct.shards import balance

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("_pq_dist_worker", HERE / "worker.py")
worker = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(worker)  # type: ignore[union-attr]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

SHARED = ["rtn", "squant", "rtn_mse", "squant_std", "gptq", "bad_recipe", "bad_model", "one_sample"]


def spawn(
    scenarios: list[str], out: Path, timeout: float = 60.0, env: dict[str, str] | None = None
) -> list[int]:
    """Run the scenarios on 2 ranks; return their exit codes (the test fails past `timeout` seconds)."""
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        **(env or {}),
    }
    logs = [(out / f"rank{r}.log").open("w") for r in range(2)]  # read when a rank fails (never a full pipe)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), ",".join(scenarios), str(r), "2", str(out)],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=logs[r],
        )
        for r in range(2)
    ]
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return codes


def rank_logs(out: Path) -> str:
    """The end of each rank's stderr, for an assertion message."""
    return "\n".join(f"rank {r}: {(out / f'rank{r}.log').read_text()[-1500:]}" for r in range(2))


def outcome(out: Path, scenario: str, rank: int) -> dict[str, Any]:
    return torch.load(out / f"{scenario}.{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    assert spawn(SHARED, out) == [0, 0], rank_logs(out)
    return out


def quantize_one_thread(scenario: str) -> torch.nn.Module:
    """`scenario` quantized in this process with one thread, as each rank runs (float sums keep the order)."""
    model, recipe, batches = worker.build(scenario)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return postquant.quantize(model, recipe, calib=batches)
    finally:
        torch.set_num_threads(threads)


def one_process(scenario: str) -> dict[str, torch.Tensor]:
    return quantize_one_thread(scenario).state_dict()


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("scenario", ["rtn", "squant", "rtn_mse", "squant_std"])
def test_two_ranks_equal_one_process(shared_run: Path, scenario: str) -> None:
    """Codes, grids and activation ranges (min/max, percentile, MSE, std observers; uniform and power grids) of
    both ranks equal one process's bit for bit: no layer input has more values than the MSE/std sample."""
    want = one_process(scenario)
    assert any(k.endswith("act_quant.scale") for k in want)  # activation ranges are compared too
    for rank in range(2):
        assert_same_state(outcome(shared_run, scenario, rank)["state"], want)


@pytest.mark.parametrize(("scenario", "what"), [("bad_recipe", "recipe"), ("bad_model", "model weights")])
def test_mismatched_inputs_are_refused_on_every_rank(shared_run: Path, scenario: str, what: str) -> None:
    for rank in range(2):
        got = outcome(shared_run, scenario, rank)
        assert got["error"] == "DistributedMismatchError"
        assert got["ranks"] == [1]
        assert what in got["message"]


def test_fewer_samples_than_ranks_is_a_data_error(shared_run: Path) -> None:
    for rank in range(2):
        got = outcome(shared_run, "one_sample", rank)
        assert got["error"] == "DataError"
        assert "1 calibration samples for 2 ranks" in got["message"]


@pytest.mark.parametrize("scenario", ["dead", "hung"])
def test_a_dead_or_hung_rank_stops_the_other_with_a_clear_error(tmp_path: Path, scenario: str) -> None:
    """Rank 1 exits (or sleeps) before the first collective: rank 0 raises `DistributedError` within the
    timeout (3 s) and saves no model."""
    codes = spawn([scenario], tmp_path, timeout=45, env={"POSTQUANT_DIST_TIMEOUT": "3"})
    assert codes[1] != 0 or scenario == "hung"
    got = outcome(tmp_path, scenario, 0)
    assert got["error"] == "DistributedError"
    assert "another rank died or did not answer within 3 s" in got["message"]
    assert got["seconds"] < 20


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_learned")
    assert spawn(["adaround", "brecq", "qdrop"], out, timeout=90) == [0, 0], rank_logs(out)
    return out


@pytest.mark.parametrize("scenario", ["adaround", "brecq"])
def test_data_parallel_learned_rounding_gives_the_codes_of_one_process(
    learned_run: Path, scenario: str
) -> None:
    """Each step's batch split over 2 ranks, gradients summed: the codes of one process (measured: 0 of 512
    differ; allowed: 1 %), per-unit errors within 5 % (measured: at most 2.2 %, on BRECQ's last unit, whose
    learned activation step moves as far when the data are scaled by 1 + 1e-7 in one process), and the
    two ranks hold the same model."""
    qmodel = quantize_one_thread(scenario)
    want_errors = [u.error_after for u in postquant.result(qmodel).learned.units]
    got = [outcome(learned_run, scenario, rank) for rank in range(2)]
    assert_same_state(got[1]["state"], got[0]["state"])
    differ, total = differing_codes(got[0]["codes"], worker.codes(qmodel))
    assert total > 0 and differ <= 0.01 * total
    for (_, after), expected in zip(got[0]["learned"], want_errors, strict=True):
        assert after == pytest.approx(expected, rel=0.05)


def differing_codes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Codes that differ, and all codes."""
    assert got.keys() == want.keys()
    return sum(int((got[k] != want[k]).sum()) for k in want), sum(v.numel() for v in want.values())


def test_data_parallel_gptq_gives_the_codes_of_one_process(shared_run: Path) -> None:
    """Each rank accumulates the Hessians on its shard of the batches (4 and 3 of 7), one all-reduce sums
    them, one rank solves each layer: both ranks hold the same model, with one process's codes up to the
    float64 summation order of H (measured: 0 of 512 codes differ; allowed: 0.5 %)."""
    qmodel = quantize_one_thread("gptq")
    got = [outcome(shared_run, "gptq", rank) for rank in range(2)]
    assert_same_state(got[1]["state"], got[0]["state"])
    differ, total = differing_codes(got[0]["codes"], worker.codes(qmodel))
    assert total == 512 and differ <= 0.005 * total


# ------------------------------------------------------------------------ mixed precision (importance)

MIXED = ["mixed_loss", "mixed_fisher", "mixed_taylor", "mixed_squant_ckpt"]


KEPT = {"conv1": {"2": 5.0, "4": 3.0, "8": 1.0}, "conv2": {"2": 6.0, "4": 4.0, "8": 2.0}}  # marked rows


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixed scenarios on 2 ranks; mixed_resume starts from a table of one process cut to 2 rows of 4,
    whose costs are replaced by marks (`KEPT`)."""
    out = tmp_path_factory.mktemp("dist_mixed")
    model, recipe, batches = worker.build("mixed_resume", 0, out)
    postquant.quantize(model, recipe, calib=batches)
    (table,) = (out / "resume").glob("importance_*.json")
    data = json.loads(table.read_text())
    assert set(KEPT) < set(data["rows"])
    table.write_text(json.dumps({**data, "rows": KEPT}))
    assert spawn([*MIXED, "mixed_resume"], out) == [0, 0], rank_logs(out)
    return out


def allocation(qmodel: torch.nn.Module) -> dict[str, tuple[int, dict[int, float]]]:
    """Layer -> (allocated bits, the importance row) of a mixed-precision result."""
    return {row.name: (row.bits, row.costs) for row in postquant.result(qmodel).mixed.layers}


@pytest.mark.parametrize("scenario", ["mixed_loss", "mixed_squant_ckpt"])
def test_loss_importance_split_over_layers_equals_one_process(mixed_run: Path, scenario: str) -> None:
    """Each rank measures whole rows (2 layers of 4) on all 7 batches, rows all-gathered: the importance table,
    the bit allocation and the model of one process, bit for bit, on both ranks."""
    qmodel = quantize_one_thread(scenario)
    want = allocation(qmodel)
    assert len({bits for bits, _ in want.values()}) > 1  # a real allocation, not one width everywhere
    for rank in range(2):
        got = outcome(mixed_run, scenario, rank)
        assert got["mixed"] == want
        assert_same_state(got["state"], qmodel.state_dict())


@pytest.mark.parametrize("scenario", ["mixed_fisher", "mixed_taylor"])
def test_gradient_importance_split_over_batches_equals_one_process(mixed_run: Path, scenario: str) -> None:
    """Each rank back-propagates its shard of the batches (4 and 3 of 7; the sampled targets of batch i from
    its own generator), the gradient sums all-reduced: every rank has the same table, one process's up to the
    float32 summation order of the sums (measured: max relative difference 2.2e-8 fisher, 1.2e-8 taylor;
    allowed 1e-5), and the
    same bit allocation and model as one process."""
    qmodel = quantize_one_thread(scenario)
    want = allocation(qmodel)
    got = [outcome(mixed_run, scenario, rank) for rank in range(2)]
    assert got[0]["mixed"] == got[1]["mixed"]
    assert got[0]["mixed"].keys() == want.keys()
    for name, (bits, costs) in want.items():
        assert got[0]["mixed"][name][0] == bits
        assert got[0]["mixed"][name][1] == pytest.approx(costs, rel=1e-5, abs=0)
    for rank in range(2):
        assert_same_state(got[rank]["state"], qmodel.state_dict())


def test_two_ranks_resume_a_half_measured_importance_table(mixed_run: Path) -> None:
    """Rank 0 sent the 2 rows on disk (their marked costs are in the table of both ranks), the 2 missing ones
    were measured in one round (one process's costs), and rank 0 wrote the 4 rows."""
    want = allocation(quantize_one_thread("mixed_resume"))
    for rank in range(2):
        got = outcome(mixed_run, "mixed_resume", rank)["mixed"]
        assert got.keys() == want.keys()
        for name, (_, costs) in got.items():
            expected = {int(b): c for b, c in KEPT[name].items()} if name in KEPT else want[name][1]
            assert costs == expected, name
    (table,) = (mixed_run / "resume").glob("importance_*.json")
    rows = json.loads(table.read_text())["rows"]
    assert rows.keys() == want.keys() and {k: rows[k] for k in KEPT} == KEPT


def test_importance_cache_of_two_ranks_is_written_by_rank_0_and_reused_in_one_process(
    mixed_run: Path,
) -> None:
    """Rank 0 alone wrote the table (the ranks take no file claims); one process with the same checkpoint
    directory reuses it (the file is not written again) and allocates as the 2 ranks did."""
    (table,) = (mixed_run / "importance").glob("importance_*.json")
    claims = table.with_suffix(".claims")
    assert not claims.exists() or json.loads(claims.read_text()) == {}
    written = (table.stat().st_ino, table.stat().st_mtime_ns)
    model, recipe, batches = worker.build("mixed_squant_ckpt", 0, mixed_run)
    again = postquant.quantize(model, recipe, calib=batches)
    assert (table.stat().st_ino, table.stat().st_mtime_ns) == written
    assert allocation(again) == outcome(mixed_run, "mixed_squant_ckpt", 0)["mixed"]


# ------------------------------------------------------------------------ the study's runs

TIMES = {"quantize_s", "wall_s", "finished"}  # what differs between two runs of one recipe


def test_a_study_on_two_ranks_gives_the_table_of_one_process(tmp_path: Path) -> None:
    """The 4 runs split over 2 ranks (2 rounds), each run alone on its rank: the records of one process (bar
    their times), both ranks holding all of them, and rank 0 alone writing results.json and the axis's table;
    no claim file is used."""
    assert spawn(["study"], tmp_path, timeout=90) == [0, 0], rank_logs(tmp_path)
    got = [outcome(tmp_path, "study", rank) for rank in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = worker.study(tmp_path / "one", tmp_path / "zoo.one")
    finally:
        torch.set_num_threads(threads)

    def values(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {key: {k: v for k, v in rec.items() if k not in TIMES} for key, rec in records.items()}

    assert len(want["records"]) == 4 and want["missing"] == [] and want["failures"] == {}
    for rank in range(2):
        assert values(got[rank]["records"]) == values(want["records"])
        assert got[rank]["summary"] == want["summary"] and got[rank]["missing"] == []
        assert got[rank]["ran"] == [None, None]  # 2 runs each, each quantized as one process
    on_disk = json.loads((tmp_path / "study" / "results.json").read_text())
    assert values(on_disk) == values(want["records"])
    assert (tmp_path / "study" / "tiny-resnet_W4A4_selection.md").is_file()
    assert not (tmp_path / "study" / "results.json.claims").exists()


# ------------------------------------------------------------------------ the block path (quantize_blocks)

BLOCKS = [
    "block_rtn",
    "block_squant",
    "block_gptq",
    "block_learned",
    "block_qdrop",
    "block_ckpt",
    "block_spill",
    "block_range",
]


class _Killed(Exception):
    pass


def quantize_blocks_one_thread(scenario: str, out: Path | None = None, **kwargs: Any) -> torch.nn.Module:
    """`scenario` by `quantize_blocks` in this process with one thread (`out`: block_ckpt's checkpoints)."""
    model, recipe, batches = worker.build_blocks(scenario, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return postquant.quantize_blocks(model, recipe, batches, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def block_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The block scenarios on 2 ranks; block_ckpt resumes a one-process run killed after decoder layer 0."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("dist_blocks")

    def kill_after_first(k: int, _name: str) -> None:
        if k == 0:
            raise _Killed

    with pytest.raises(_Killed):
        quantize_blocks_one_thread("block_ckpt", out, on_block_end=kill_after_first)
    assert spawn(BLOCKS, out, timeout=120) == [0, 0], rank_logs(out)
    return out


@pytest.mark.parametrize("scenario", ["block_rtn", "block_squant"])
def test_block_path_per_layer_methods_split_over_ranks_equal_one_process(
    block_run: Path, scenario: str
) -> None:
    """Each rank rounds a share of each decoder layer's Linears; codes gathered: one process's model, bit for
    bit, on both ranks."""
    want = quantize_blocks_one_thread(scenario).state_dict()
    for rank in range(2):
        assert_same_state(outcome(block_run, scenario, rank)["state"], want)


@pytest.mark.parametrize(
    "scenario", ["block_gptq", "block_learned", "block_qdrop", "block_ckpt", "block_spill", "block_range"]
)
def test_block_path_data_parallel_gives_the_codes_of_one_process(block_run: Path, scenario: str) -> None:
    """Both chains sharded (batches 0-3 and 4-6): GPTQ sums the Hessians and splits the solves; learned
    rounding draws one process's batch from all the data, each rank computing the rows it holds, gradients
    summed. Both ranks hold the same model; its codes are one process's (measured: 0 of 27648 differ for
    each; allowed: 0.5 %), the learned layers' errors one process's to float summation order (measured
    relative difference < 1e-7). The weight side of learned rounding is split by layers: each layer's soft
    weights are computed by one rank only, so the ranks' counts add up to one process's. block_ckpt resumed on
    2 ranks the checkpoint (decoder layer 0 and its chains) of a one-process run that was killed; block_spill
    kept every rank's chains in memory-mapped files (chain_bytes=0) against one process's chains in memory,
    and left no file behind."""
    with worker.counting_weight_side() as weight_side:
        want = quantize_blocks_one_thread(scenario)
    got = [outcome(block_run, scenario, rank) for rank in range(2)]
    if scenario in ("block_learned", "block_qdrop", "block_spill", "block_range"):
        sides = [g["weight_side"] for g in got]
        assert sum(sides) == weight_side[0] and all(0 < side < weight_side[0] for side in sides), sides
    assert_same_state(got[1]["state"], got[0]["state"])
    differ, total = differing_codes(got[0]["codes"], worker.codes(want))
    assert total == 27648 and differ <= 0.005 * total
    learned = postquant.result(want).learned
    if learned is not None:
        errors = [e for u in learned.units for e in (u.error_before, u.error_after)]
        assert [e for pair in got[0]["learned"] for e in pair] == pytest.approx(errors, rel=1e-4)
    assert got[0]["resumed"] == (1 if scenario == "block_ckpt" else 0)
    if scenario == "block_spill":
        for rank in range(2):
            assert list((block_run / f"spill.{rank}").iterdir()) == []


def test_block_path_checkpoint_of_two_ranks_resumes_in_one_process(block_run: Path) -> None:
    """Rank 0 wrote every finished layer and the gathered chains, in one process's format: one process
    finds all 3 layers done and ends with the 2 ranks' model."""
    resumed = quantize_blocks_one_thread("block_ckpt", block_run)
    assert postquant.result(resumed).learned.resumed == 3
    assert_same_state(resumed.state_dict(), outcome(block_run, "block_ckpt", 0)["state"])
    assert len(list((block_run / "ckpt").rglob("chains_*.safetensors"))) == 1  # the last layer's


@pytest.mark.slow
def test_the_cli_under_torchrun_quantizes_a_causal_lm_block_by_block(tmp_path: Path) -> None:
    """``torchrun --standalone --nproc-per-node 2 -m postquant quantize`` of a causal LM (the block path, GPTQ):
    rank 0 alone prints and writes; the perplexity is one process's (measured: equal to 7 digits)."""
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from postquant_lab.cli import app
    from tests.cli.test_cli_export_llm import block_path_args

    args = [*block_path_args(tmp_path, "gptq"), "--calib-size", "8", "--limit", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "postquant", *args, "--json", str(tmp_path / "two.json"), "--out", str(tmp_path / "run")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("perplexity") == 1  # one table: rank 0's
    assert (tmp_path / "run" / "results.json").is_file()
    one = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert got["quantized"] == pytest.approx(want["quantized"], rel=1e-5)


def test_no_process_group_means_no_ranks() -> None:
    assert not torch.distributed.is_initialized()
    assert current() is None


@pytest.mark.parametrize(("n", "world"), [(7, 2), (2, 3), (10, 4), (0, 2)])
def test_shards_are_contiguous_and_cover_everything(n: int, world: int) -> None:
    bounds = shard_bounds(n, world)
    assert [b for a in bounds for b in range(*a)] == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_split_work_balances_sizes() -> None:
    owners = split_work([100, 10, 60, 50, 5], 2)
    loads = [sum(s for s, o in zip([100, 10, 60, 50, 5], owners, strict=True) if o == r) for r in range(2)]
    assert owners == [0, 0, 1, 1, 0] and loads == [115, 110]  # 100 | 60, 50 | 10 to the lighter | 5 on a tie


@settings(max_examples=25, deadline=None)
@given(total=st.integers(1, 12), world=st.integers(1, 4), width=st.integers(1, 5), seed=st.integers(0, 99))
def test_each_rank_draws_its_rows_of_one_process_draw(total: int, world: int, width: int, seed: int) -> None:
    """QDrop's masks on data-parallel steps: the ranks' rows together are one process's draw, and every rank's
    generator ends where one process's does (the next batch is the same everywhere)."""
    one = torch.Generator().manual_seed(seed)
    want = uniform_rows((total, width), one, None)
    parts = []
    for start, stop in shard_bounds(total, world):
        gen = torch.Generator().manual_seed(seed)
        if stop > start:
            parts.append(uniform_rows((stop - start, width), gen, (start, stop, total)))
            assert torch.equal(gen.get_state(), one.get_state())
    assert torch.equal(torch.cat(parts), want)


def _chain(batches: list[torch.Tensor]) -> Chain:
    """A chain in memory holding `batches`, one tensor each."""
    chain = ChainMemory().chain([b.shape[0] for b in batches], whole=False)
    for i, b in enumerate(batches):
        chain.put(i, b)
    return chain


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    world=st.integers(1, 4),
    batch=st.integers(1, 12),
    same_shape=st.booleans(),
    seed=st.integers(0, 99),
)
def test_ranks_drawing_from_their_shards_draw_one_process_batch(
    sizes: list[int], world: int, batch: int, same_shape: bool, seed: int
) -> None:
    """The block path's sharded caches: each rank's drawn rows, put at their positions, are one process's
    batch drawn from the cache `_unit_data` builds over all batches (merged or not, as one process decides),
    and every rank's generator ends where one process's does."""
    hidden = [torch.randn(n, 3 if same_shape else 3 + b) for b, n in enumerate(sizes)]
    inputs = [Captured((h, torch.ones(1)), {"flag": True}) for h in hidden]
    chain = _chain(hidden)
    one = _unit_data(inputs, None, chain, chain, chain)
    gen = torch.Generator().manual_seed(seed)
    record, want = one.sample(batch, gen)
    covered = torch.zeros(len(want), dtype=torch.int64)
    parts = [range(start, stop) for start, stop in shard_bounds(len(sizes), world)]
    for rank, (start, stop) in enumerate(shard_bounds(len(sizes), world)):
        shard = _shard_of(inputs, parts, rank)
        mine = _chain(hidden[start:stop])  # a rank's chain: one tensor per batch
        local = _unit_data(inputs[start:stop], None, mine, mine, mine, shard)
        rank_gen = torch.Generator().manual_seed(seed)
        drawn = shard.sample(local.records, batch, rank_gen)
        assert torch.equal(rank_gen.get_state(), gen.get_state()) and drawn.total == len(want)
        if drawn.record is not None:  # the very rows one process has at those positions
            assert record.target is not None and drawn.record.target is not None
            torch.testing.assert_close(
                drawn.record.target[drawn.idx], record.target[want[drawn.positions]], rtol=0, atol=0
            )
            covered[drawn.positions] += 1
            assert (drawn.owners[drawn.positions] == rank).all()
    assert covered.tolist() == [1] * len(want)  # every row of the batch on exactly one rank
    assert (len(one.records) == 1) == (len(_shard_of(inputs, [range(0)], 0).sizes) == 1)


@settings(max_examples=60, deadline=None)
@given(owners=st.lists(st.integers(0, 3), min_size=1, max_size=20), world=st.integers(1, 4))
def test_balancing_gives_every_rank_its_share_moving_only_the_surplus(owners: list[int], world: int) -> None:
    """`balance`: each rank computes its `shard_bounds` share of the batch; a rank keeps its first held rows up
    to its share, so only the rows beyond the holders' shares move."""
    owners = [o % world for o in owners]
    compute = balance(owners, world)
    quota = [stop - start for start, stop in shard_bounds(len(owners), world)]
    assert [compute.count(r) for r in range(world)] == quota
    moved = sum(c != o for c, o in zip(compute, owners, strict=True))
    assert moved == sum(max(0, owners.count(r) - quota[r]) for r in range(world))
    for r in range(world):
        held = [p for p, o in enumerate(owners) if o == r]
        assert [p for p in held if compute[p] == r] == held[: quota[r]]


def test_rows_of_an_input_that_is_not_batch_first_are_refused() -> None:
    with pytest.raises(RuntimeError, match="does not have the 2 rows"):
        uniform_rows((6, 3), torch.Generator(), (0, 2, 4))
