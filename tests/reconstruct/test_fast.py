"""The fast learned-rounding pieces: signed gradient descent, closed-form schedules, spread calibration
subsets and the `learned-fast` preset."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.calib.data import batch_size_of, spread_batches
from postquant.recipe import Recipe
from postquant.reconstruct import LearnedConfig, preset
from postquant.reconstruct.checkpoint import data_fingerprint
from postquant.reconstruct.config import Schedule
from postquant.reconstruct.loop import SignSGD, schedule_factor
from tests.conftest import TinyResNet

pytestmark = pytest.mark.usefixtures("one_thread")


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20), st.floats(1e-4, 1.0))
@settings(max_examples=40, deadline=None)
def test_signsgd_moves_each_variable_by_lr_against_its_gradient_sign(grads, lr):
    p = torch.nn.Parameter(torch.zeros(len(grads), dtype=torch.float64))
    opt = SignSGD([{"params": [p]}], lr=lr)
    p.grad = torch.tensor(grads, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), -lr * torch.sign(torch.tensor(grads, dtype=torch.float64)))
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize("iters", [1, 7, 25, 200])
@pytest.mark.parametrize("schedule", [Schedule.LINEAR, Schedule.COSINE])
def test_closed_form_schedules_match_torchs_schedulers(schedule, iters):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = (
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=iters)
        if schedule is Schedule.LINEAR
        else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    )
    for step in range(iters):
        assert schedule_factor(schedule, step, iters) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()
    assert schedule_factor(Schedule.CONSTANT, 3, iters) == 1.0


@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=30),
    st.integers(1, 200),
)
@settings(max_examples=80, deadline=None)
def test_spread_batches_keeps_at_most_max_samples_in_order_from_all_over(sizes, limit):
    batches = []
    start = 0
    for n in sizes:  # each sample holds its index, so order and provenance can be checked
        batches.append(torch.arange(start, start + n, dtype=torch.float32).view(n, 1))
        start += n
    out = spread_batches(batches, limit)
    got = torch.cat(out).flatten().tolist()
    assert len(got) == min(limit, sum(sizes)) == sum(batch_size_of(b) for b in out)
    assert got == sorted(got) and len(set(got)) == len(got)  # in order, no sample twice
    starts = {float(b[0, 0]): i for i, b in enumerate(batches)}
    picked = [starts[float(b[0, 0])] for b in out]  # which batches were taken (the last one may be cut)
    n = len(batches)

    def evenly(m: int) -> list[int]:
        return sorted({i * n // m for i in range(m)})

    if sum(sizes) > limit:  # the fewest evenly spaced batches that hold `limit` samples, in order
        m = next(m for m in range(1, n + 1) if sum(sizes[i] for i in evenly(m)) >= limit)
        assert picked == evenly(m)[: len(out)]
    else:
        assert picked == list(range(n))


def test_spread_batches_of_a_class_ordered_set_covers_every_class():
    batches = [torch.full((8, 1), float(c)) for c in range(4) for _ in range(8)]  # 4 classes, 8 batches each
    picked = torch.cat(spread_batches(batches, 64)).flatten()
    assert set(picked.tolist()) == {0.0, 1.0, 2.0, 3.0} and picked.numel() == 64


def test_max_samples_is_left_out_of_dumps_when_unset_so_keys_stay():
    assert "max_samples" not in LearnedConfig().model_dump()
    assert "max_samples" not in Recipe.coerce({"method": "learned"}).model_dump(mode="json")["learned"]
    assert LearnedConfig(max_samples=64).model_dump()["max_samples"] == 64


def test_learned_fast_preset_derives_its_lr_from_iters_unless_given(tmp_path):
    cfg = Recipe.coerce({"method": "learned-fast"}).learned
    assert cfg.optimizer.value == "signsgd" and cfg.lr == pytest.approx(1 / cfg.iters)
    assert Recipe.coerce({"method": "learned-fast", "learned": {"iters": 10}}).learned.lr == pytest.approx(
        0.1
    )
    assert Recipe.coerce({"method": "learned-fast", "learned": {"iters": 10, "lr": 0.5}}).learned.lr == 0.5
    assert preset("learned-fast", iters=50).lr == pytest.approx(0.02)
    r = Recipe.coerce({"method": "learned-fast", "w_bits": 4, "learned": {"iters": 8}})
    path = tmp_path / "r.yaml"
    r.to_yaml(path)
    assert Recipe.coerce(path) == r


def test_max_samples_caches_a_spread_subset(caplog):
    torch.manual_seed(0)
    net = TinyResNet().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(8)]
    recipe = {"method": "learned", "w_bits": 3, "learned": {"iters": 2, "progress": False, "max_samples": 16}}
    with caplog.at_level(logging.DEBUG, logger="postquant.reconstruct.engine"):
        postquant.quantize(net, recipe, calib=calib)
    cached = [r.getMessage() for r in caplog.records if "samples cached" in r.getMessage()]
    assert cached and all(": 16 samples cached" in m for m in cached), cached
    # whole batches spread over the set: the first and the fifth of eight
    assert data_fingerprint(spread_batches(calib, 16)) == data_fingerprint([calib[0], calib[4]])


def test_learned_fast_runs_without_importing_torchdynamo():
    """Weight-only learned-fast uses no torch.optim optimizer: their first step imports TorchDynamo (seconds)."""
    code = textwrap.dedent(
        """
        import sys, torch
        import postquant
        from tests.conftest import TinyResNet
        torch.manual_seed(0)
        net = TinyResNet().eval()
        calib = torch.randn(32, 3, 8, 8)
        q = postquant.quantize(net, {"method": "learned-fast", "w_bits": 3, "learned": {"progress": False}},
                               calib=calib)
        report = postquant.result(q).learned
        assert all(u.steps == 25 for u in report.units if u.status == "ok"), report
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "no dynamo"


def test_learned_fast_lowers_the_block_error_of_its_start():
    torch.manual_seed(0)
    net = TinyResNet().eval()
    torch.manual_seed(1)
    calib = torch.randn(64, 3, 8, 8)
    q = postquant.quantize(
        net, {"method": "learned-fast", "w_bits": 3, "learned": {"progress": False, "iters": 40}}, calib=calib
    )
    units = postquant.result(q).learned.units
    assert all(u.error_after <= u.error_before for u in units)
    assert sum(u.error_after for u in units) < 0.95 * sum(u.error_before for u in units), units


@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.integers(1, 1000))
@settings(max_examples=60, deadline=None)
def test_first_rows_takes_the_first_n_rows_of_the_chunks_in_order(sizes, n):
    from postquant.reconstruct.loop import _first_rows

    chunks = [(i, slice(s, min(s + 128, size))) for i, size in enumerate(sizes) for s in range(0, size, 128)]
    picked = _first_rows(chunks, n)  # type: ignore[arg-type]
    rows = [(rec, r) for rec, idx in picked for r in range(idx.start, idx.stop)]
    every = [(rec, r) for rec, idx in chunks for r in range(idx.start, idx.stop)]
    assert rows == every[:n]


def test_check_samples_runs_the_unit_check_on_the_first_cached_rows(monkeypatch):
    from postquant.reconstruct import loop

    assert "check_samples" not in LearnedConfig().model_dump()  # added later: keys of old runs stay
    assert preset("learned-fast").check_samples == 64
    seen: dict[int, list[tuple[int, int]]] = {}
    real = loop._loss

    def spy(qmodel, unit, rec, idx, overrides, cfg, generator, device, window=None):
        if generator is None:  # the before/after check (training steps pass the generator)
            seen.setdefault(cfg.check_samples, []).append((idx.start, idx.stop))
        return real(qmodel, unit, rec, idx, overrides, cfg, generator, device, window)

    monkeypatch.setattr(loop, "_loss", spy)
    torch.manual_seed(0)
    net = TinyResNet().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    for check in (None, 12):
        recipe = {"method": "learned", "w_bits": 3, "learned": {"iters": 2, "progress": False}}
        recipe["learned"]["check_samples"] = check
        q = postquant.quantize(net, recipe, calib=calib)
        assert all(u.error_before >= 0 for u in postquant.result(q).learned.units)
    n_units = len(postquant.result(q).learned.units)
    assert seen[None] == [(0, 32)] * (2 * n_units)  # every cached row, before and after
    assert seen[12] == [(0, 12)] * (2 * n_units)  # the first 12


def test_observer_samples_follow_the_recipe_and_the_learned_fast_method():
    from postquant.pipeline import _observer_samples

    assert "a_observer_samples" not in Recipe.coerce({"method": "learned"}).model_dump(mode="json")
    assert _observer_samples(Recipe.coerce({"method": "learned"})) == 1 << 20
    assert _observer_samples(Recipe.coerce({"method": "learned-fast"})) == 1 << 18
    assert _observer_samples(Recipe.coerce({"method": "learned", "a_observer_samples": 4096})) == 4096
    with pytest.raises(ValueError):
        Recipe.coerce({"method": "learned", "a_observer_samples": 10})
    torch.manual_seed(0)
    net = TinyResNet().eval()
    calib = torch.randn(64, 3, 16, 16)
    ranges = {}
    for samples in (None, 2048):
        recipe = {
            "method": "rtn",
            "w_bits": 8,
            "a_bits": 4,
            "a_observer": "mse",
            "a_observer_samples": samples,
        }
        q = postquant.quantize(net, recipe, calib=calib)
        ranges[samples] = [
            float(m.act_quant.scale) for m in q.modules() if getattr(m, "act_quant", None) is not None
        ]
    assert (
        ranges[None] != ranges[2048]
    )  # a layer input of more than 2048 values: another sample, another range
