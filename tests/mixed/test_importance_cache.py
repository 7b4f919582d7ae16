"""`mixed.checkpoint_dir`: importance rows saved as measured, resumed after an interruption, reused bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

import postquant
from postquant.errors import CheckpointError
from postquant.mixed import Importance
from postquant.mixed import importance as importance_module
from postquant.mixed.importance import importance_table
from postquant.model import fold_batchnorm, quantizable_layers
from postquant.recipe import Recipe

BITS = [2, 4, 8]


class Interrupt(Exception):
    pass


@pytest.fixture
def folded(tiny_cnn, images):
    model, _ = fold_batchnorm(tiny_cnn, images)
    return model


@pytest.fixture
def forwards(folded):
    """Counts the forward passes of the model (a forward hook): the importance measures' model runs."""
    count = [0]

    def counted(*_):
        count[0] += 1

    folded.register_forward_hook(counted)
    return count


def _table(model, images, importance="loss", recipe=None, ckpt=None, bits=BITS):
    layers = list(quantizable_layers(model))
    return importance_table(
        model, layers, bits, recipe or Recipe(), importance, list(images.split(8)), None, checkpoint_dir=ckpt
    )


@pytest.mark.parametrize("importance", ["loss", "taylor", "fisher"])
def test_a_saved_table_is_reused_bit_exactly(folded, images, tmp_path, importance, forwards):
    plain = _table(folded, images, importance)
    first = _table(folded, images, importance, ckpt=tmp_path)
    assert first == plain  # the cache does not change a cost
    (saved,) = tmp_path.glob("importance_*.json")
    forwards[0] = 0
    again = _table(folded, images, importance, ckpt=tmp_path)
    assert again == plain and forwards[0] == 0  # nothing measured again
    assert set(json.loads(saved.read_text())["rows"]) == set(plain)


def test_an_interrupted_measurement_resumes_at_the_next_layer(folded, images, tmp_path, forwards):
    plain = _table(folded, images)
    layers = list(plain)
    batches = 2
    before_third_layer = batches * (1 + 2 * len(BITS))  # the references, then two layers at each bit width

    def interrupt(*_):  # a hook registered after the counting one: the count includes this forward
        if forwards[0] > before_third_layer:
            raise Interrupt

    forwards[0] = 0
    handle = folded.register_forward_hook(interrupt)
    with pytest.raises(Interrupt):
        _table(folded, images, ckpt=tmp_path)
    handle.remove()
    (saved,) = tmp_path.glob("importance_*.json")
    assert list(json.loads(saved.read_text())["rows"]) == layers[:2]  # the two finished layers
    forwards[0] = 0
    resumed = _table(folded, images, ckpt=tmp_path)
    assert resumed == plain  # bit-exact: JSON floats read back exactly
    assert forwards[0] == batches * (1 + (len(layers) - 2) * len(BITS))  # references + the layers left


@pytest.mark.parametrize(
    "change",
    ["grid", "data", "weights", "bits", "seed"],
)
def test_anything_a_cost_depends_on_changes_the_key(folded, images, tmp_path, change):
    importance = "taylor" if change == "seed" else "loss"
    _table(folded, images, importance, ckpt=tmp_path)
    recipe, bits = Recipe(), BITS
    if change == "grid":
        recipe = Recipe(granularity="tensor")
    elif change == "data":
        images = images + 0.01
    elif change == "weights":
        with torch.no_grad():
            folded.fc.weight[0, 0] += 0.5
    elif change == "bits":
        bits = [2, 3, 4]
    else:
        recipe = Recipe(seed=1)
    _table(folded, images, importance, recipe=recipe, ckpt=tmp_path, bits=bits)
    assert len(list(tmp_path.glob("importance_*.json"))) == 2


def test_what_comes_after_the_allocation_does_not_change_the_key(folded, images, tmp_path, forwards):
    _table(folded, images, ckpt=tmp_path)
    # activation bits, learned rounding settings: nearest-rounded Q_b(W) is the same, so is the table
    other = Recipe.coerce({"method": "learned", "a_bits": 8, "learned": {"iters": 7}})
    forwards[0] = 0
    _table(folded, images, recipe=other, ckpt=tmp_path)
    assert len(list(tmp_path.glob("importance_*.json"))) == 1 and forwards[0] == 0


@pytest.mark.parametrize(
    "text,match",
    [("{not json", "not a readable importance table"), ('{"key": "x", "rows": {}}', "holds key")],
)
def test_a_damaged_table_is_a_clear_error(folded, images, tmp_path, text, match):
    _table(folded, images, ckpt=tmp_path)
    (saved,) = tmp_path.glob("importance_*.json")
    saved.write_text(text)
    with pytest.raises(CheckpointError, match=match + r".*delete it to measure again"):
        _table(folded, images, ckpt=tmp_path)


def test_negative_costs_in_a_table_are_refused(folded, images, tmp_path):
    _table(folded, images, ckpt=tmp_path)
    (saved,) = tmp_path.glob("importance_*.json")
    data = json.loads(saved.read_text())
    data["rows"]["fc"]["2"] = float("nan")
    saved.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="negative or NaN"):
        _table(folded, images, ckpt=tmp_path)


def test_quantize_with_another_budget_reuses_the_measurement(tiny_cnn, images, tmp_path, forwards):
    def run(budget: float, ckpt=None):
        mixed = {"w_bits_budget": budget, "importance": Importance.LOSS, "calib_size": 16}
        if ckpt is not None:
            mixed["checkpoint_dir"] = ckpt
        return postquant.quantize(tiny_cnn, {"method": "rtn", "mixed": mixed}, calib=images)

    plain = run(3.0)
    cached = run(3.0, tmp_path)
    assert postquant.result(cached).mixed.bits == postquant.result(plain).mixed.bits
    assert [r.costs for r in postquant.result(cached).mixed.layers] == [
        r.costs for r in postquant.result(plain).mixed.layers
    ]
    forwards[0] = 0
    other = run(4.0, tmp_path)
    assert forwards[0] == 0  # nothing measured again
    assert postquant.result(other).mixed.avg_w_bits > postquant.result(plain).mixed.avg_w_bits
    assert [r.costs for r in postquant.result(other).mixed.layers] == [
        r.costs for r in postquant.result(plain).mixed.layers
    ]


# ------------------------------------------------------------------------------ processes sharing the work

SHARED_SCRIPT = """
import json, sys, time
import torch
from torch import nn
from postquant.mixed import importance as imp
from postquant.mixed.cache import ImportanceCache
from postquant.recipe import Recipe

torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(32, 32), nn.ReLU())]).eval()
batches = list(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).split(32))
measured = []
real = ImportanceCache.record


def record(self, rows):
    measured.extend(rows)
    time.sleep(0.3)  # slow layers, so that both processes are measuring at the same time
    real(self, rows)


ImportanceCache.record = record
layers = [str(i) for i in range(0, 16, 2)]
open(sys.argv[2], "w").close()  # ready: both processes start measuring together
while not __import__("os").path.exists(sys.argv[3]):
    time.sleep(0.05)
table = imp.importance_table(model, layers, [2, 4], Recipe(), "loss", batches, checkpoint_dir=sys.argv[1])
print(json.dumps({"measured": measured, "table": {k: {str(b): c for b, c in v.items()} for k, v in table.items()}}))
"""


def test_two_processes_split_one_measurement(tmp_path):
    import subprocess
    import sys
    import time

    script = tmp_path / "measure.py"
    script.write_text(SHARED_SCRIPT)
    ckpt, go = tmp_path / "ckpt", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(ckpt), str(r), str(go)], stdout=subprocess.PIPE, text=True
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0]["table"] == results[1]["table"] and len(results[0]["table"]) == 8
    measured = [r["measured"] for r in results]
    assert sorted(measured[0] + measured[1]) == sorted(results[0]["table"])  # each layer once, by one of them
    assert measured[0] and measured[1]  # both took a share
    (claims_file,) = ckpt.glob("*.claims")
    assert json.loads(claims_file.read_text()) == {}  # no claim left behind


def test_a_layer_claimed_by_another_process_is_waited_for_then_taken_over(folded, images, tmp_path, forwards):
    import subprocess
    import sys

    from postquant.mixed.cache import ImportanceCache
    from postquant.store import claims

    plain = _table(folded, images)
    layers = list(plain)
    batches = 2
    free_layers_done = batches * (1 + (len(layers) - 1) * len(BITS))  # the references, then the free layers
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    written_then: list[str] = []

    def kill_when_the_free_layers_are_done(*_):  # after the counting hook: the count includes this forward
        if forwards[0] == free_layers_done:  # the last forward of the last free layer
            written_then.extend(json.loads(cache.path.read_text())["rows"])
            other.kill()  # the other process dies before measuring its own layer

    try:
        parts = importance_module._cache_parts(
            folded, layers, BITS, Recipe(), Importance.LOSS, list(images.split(8)), None
        )
        cache = ImportanceCache(tmp_path, parts)
        holder = {**claims.this_process(), "pid": other.pid, "start": claims.process_start(other.pid)}
        tmp_path.joinpath(cache.claims_path.name).write_text(json.dumps({layers[0]: holder}))
        forwards[0] = 0
        folded.register_forward_hook(kill_when_the_free_layers_are_done)
        table = _table(folded, images, ckpt=tmp_path)
    finally:
        other.kill()
        other.wait()
    assert table == plain
    # the claimed layer last (waited for, then taken over): when the free layers were done, the file held
    # them (the last one being measured) and not the claimed one, which was then measured once
    assert sorted(written_then) == sorted(layers[1:-1])
    assert sorted(json.loads(cache.path.read_text())["rows"]) == sorted(layers)
    assert forwards[0] == batches * (1 + len(layers) * len(BITS))
