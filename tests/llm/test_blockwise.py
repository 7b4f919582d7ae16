"""Block-sequential quantization of a tiny random Llama: same codes as `quantize` for the per-layer methods,
learned rounding lowers each layer's error, resume after a kill, no whole-model teacher, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import postquant  # noqa: E402
from postquant.blockwise import decoder_layers, quantize_blocks  # noqa: E402
from postquant.errors import DataError, RecipeError, UnsupportedModelError  # noqa: E402
from postquant.model import quantized_layers  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402

VOCAB = 64


def tiny_llama(layers: int = 3, seed: int = 0) -> nn.Module:
    return make_tiny_llama(layers, seed, vocab=VOCAB)


def calib(n: int = 8, seqlen: int = 16, batch: int = 4) -> list[torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(1))
    return list(ids.split(batch))


def codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.codes.clone() for name, layer in quantized_layers(model).items()}


def grid_recipe(method: str, **extra) -> dict:
    return dict(method=method, w_bits=3, granularity="group", group_size=16, ignore=["lm_head"], **extra)


LEARNED = dict(iters=12, batch_size=4, progress=False)


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_per_layer_methods_give_the_codes_of_quantize(method: str) -> None:
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    whole = postquant.quantize(model, grid_recipe(method))
    blocks = quantize_blocks(model, grid_recipe(method))
    a, b = codes(whole), codes(blocks)
    assert a.keys() == b.keys() and len(a) == 3 * 7
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    ids = calib()[0]
    torch.testing.assert_close(whole(ids).logits, blocks(ids).logits, rtol=0, atol=0)
    for key, value in model.state_dict().items():  # the float model is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_learned_rounding_lowers_every_layer_error() -> None:
    model = tiny_llama()
    q = quantize_blocks(model, grid_recipe("learned", learned=LEARNED, calib_size=8), calib())
    report = postquant.result(q).learned
    assert report is not None and len(report.units) == 3
    for unit in report.units:
        assert unit.error_after <= unit.error_before
    assert any(u.error_after < u.error_before for u in report.units)
    rtn = quantize_blocks(model, grid_recipe("rtn"))
    assert any(not torch.equal(codes(q)[n], c) for n, c in codes(rtn).items())


def test_learned_block_path_matches_the_whole_model_path() -> None:
    """Same seeds per unit, same chains (quantized and float) and targets: the same codes as `quantize`."""
    model = tiny_llama()
    recipe = grid_recipe("learned", learned=LEARNED, calib_size=8)
    whole = postquant.quantize(model, recipe, calib())
    blocks = quantize_blocks(model, recipe, calib())
    a, b = codes(whole), codes(blocks)
    mismatched = [n for n in a if not torch.equal(a[n], b[n])]
    assert not mismatched


def test_learned_fast_on_the_block_path_matches_the_whole_model_path() -> None:
    """learned-fast (signed gradient, max_samples) takes the same spread subset of the calibration windows on
    both paths, so the codes agree as the default's do."""
    model = tiny_llama()
    recipe = grid_recipe(
        "learned-fast", learned={"iters": 4, "progress": False, "max_samples": 4}, calib_size=8
    )
    whole, blocks = postquant.quantize(model, recipe, calib()), quantize_blocks(model, recipe, calib())
    a, b = codes(whole), codes(blocks)
    assert not [n for n in a if not torch.equal(a[n], b[n])]
    sub = quantize_blocks(
        model, {**recipe, "learned": {**recipe["learned"], "max_samples": None}}, calib()[::2]
    )
    assert all(torch.equal(b[n], c) for n, c in codes(sub).items())  # batch 0 of two batches of 4 windows


@pytest.mark.parametrize(
    ("method", "importance", "budget"),
    [("rtn", "datafree", {"w_bits_budget": 3.5}), ("squant", "fisher", {"size_budget": 40_000})],
)
def test_mixed_precision_on_the_block_path_allocates_as_quantize(
    method: str, importance: str, budget
) -> None:
    """Bits are allocated from the whole float model before the walk, with the table and the allocation of
    `quantize`: the same bits per layer, hence (per-layer methods) the same codes and logits."""
    model = tiny_llama()
    recipe = grid_recipe(
        method,
        calib_size=8,
        mixed={**budget, "importance": importance, "bit_choices": [2, 3, 4, 8], "calib_size": 8},
    )
    data = calib() if importance != "datafree" else None
    whole, blocks = postquant.quantize(model, recipe, data), quantize_blocks(model, recipe, data)
    a, b = postquant.result(whole), postquant.result(blocks)
    assert a.mixed is not None and b.mixed is not None
    bits = {row.name: row.bits for row in b.mixed.layers}
    assert bits == {row.name: row.bits for row in a.mixed.layers}
    assert len(set(bits.values())) > 1  # a real mix, not one width everywhere
    for name, layer in quantized_layers(blocks).items():
        assert layer.bits == bits[name] and b.plan[name].w_bits == bits[name]
    if "w_bits_budget" in budget:
        assert b.mixed.avg_w_bits <= budget["w_bits_budget"] + 1e-9
    else:
        assert b.mixed.size_bytes <= budget["size_budget"]
    ca, cb = codes(whole), codes(blocks)
    assert all(torch.equal(ca[n], cb[n]) for n in ca)
    ids = calib()[0]
    torch.testing.assert_close(whole(ids).logits, blocks(ids).logits, rtol=0, atol=0)
    assert b.recipe is not None and b.recipe.overrides  # the allocation is written into the recipe


def test_gptq_block_path_lowers_the_error_of_nearest_rounding() -> None:
    from postquant.eval import sqnr_db

    model = tiny_llama()
    held_out = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7))
    ref = model(held_out).logits
    rtn = quantize_blocks(model, grid_recipe("rtn"))
    gptq = quantize_blocks(model, grid_recipe("gptq", calib_size=32), calib(n=32))
    assert any(not torch.equal(codes(gptq)[n], c) for n, c in codes(rtn).items())
    assert float(sqnr_db(ref, gptq(held_out).logits)) > float(sqnr_db(ref, rtn(held_out).logits))
    with pytest.raises(DataError, match="calibration data"):
        quantize_blocks(model, grid_recipe("gptq"))


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_with_identical_codes(tmp_path) -> None:
    model = tiny_llama(layers=3)
    recipe = grid_recipe("learned", learned=LEARNED, calib_size=8)
    full = quantize_blocks(model, recipe, calib())

    def kill_after_first(k: int, _name: str) -> None:
        if k == 0:
            raise _Killed

    with pytest.raises(_Killed):
        quantize_blocks(model, recipe, calib(), checkpoint_dir=tmp_path, on_block_end=kill_after_first)
    seen: list[int] = []
    resumed = quantize_blocks(
        model, recipe, calib(), checkpoint_dir=tmp_path, on_block_end=lambda k, _: seen.append(k)
    )
    assert seen == [1, 2]  # layer 0 came from the checkpoint
    assert postquant.result(resumed).learned.resumed == 1
    for name, c in codes(full).items():
        torch.testing.assert_close(codes(resumed)[name], c, rtol=0, atol=0)
    assert len(list(tmp_path.rglob("chains_*.safetensors"))) == 1  # only the last layer's chains are kept


def grids(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        name: (layer.codes, layer.grid_inv_scale, layer.grid_zero_point)
        for name, layer in quantized_layers(model).items()
    }


def test_learned_ranges_and_squant_modes_on_the_block_path_match_and_resume(tmp_path) -> None:
    """Learned ranges (steps and zero points) and a non-default SQuant start: the block path gives the whole
    model path's codes and grids, and a killed run resumes to them bit for bit."""
    model = tiny_llama(layers=2)
    fields = {"iters": 6, "progress": False, "learn_weight_range": True}
    recipe = grid_recipe("learned-fast", learned=fields, calib_size=8, squant_mode="ek")
    whole = grids(postquant.quantize(model, recipe, calib()))
    start = grids(quantize_blocks(model, {**recipe, "learned": {**fields, "iters": 0}}, calib()))
    blocks = grids(quantize_blocks(model, recipe, calib()))
    other_start = grids(quantize_blocks(model, {**recipe, "squant_mode": "ekc"}, calib()))
    assert any(not torch.equal(blocks[n][0], other_start[n][0]) for n in blocks)  # the mode is used
    assert any(not torch.equal(blocks[n][1], start[n][1]) for n in blocks)  # steps moved
    for name, parts in whole.items():
        for a, b in zip(parts, blocks[name], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def kill_after_first(k: int, _name: str) -> None:
        if k == 0:
            raise _Killed

    with pytest.raises(_Killed):
        quantize_blocks(model, recipe, calib(), checkpoint_dir=tmp_path, on_block_end=kill_after_first)
    resumed = grids(quantize_blocks(model, recipe, calib(), checkpoint_dir=tmp_path))
    for name, parts in blocks.items():
        for a, b in zip(parts, resumed[name], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from tests.llm.test_blockwise import LEARNED, calib, grid_recipe, tiny_llama
from postquant.blockwise import quantize_blocks

def die(k, _name):
    if k == 0:  # layer 0 checkpointed: the process dies as under `kill -9`, no cleanup, no exception
        os.kill(os.getpid(), signal.SIGKILL)

recipe = grid_recipe("learned", learned=LEARNED, calib_size=8)
quantize_blocks(tiny_llama(layers=2), recipe, calib(), checkpoint_dir=sys.argv[1], on_block_end=die)
"""


def test_a_process_killed_by_sigkill_resumes_at_the_next_layer(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(tmp_path), root], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    recipe = grid_recipe("learned", learned=LEARNED, calib_size=8)
    seen: list[int] = []
    resumed = quantize_blocks(
        tiny_llama(layers=2),
        recipe,
        calib(),
        checkpoint_dir=tmp_path,
        on_block_end=lambda k, _: seen.append(k),
    )
    assert seen == [1] and postquant.result(resumed).learned.resumed == 1
    full = quantize_blocks(tiny_llama(layers=2), recipe, calib())
    for name, c in codes(full).items():
        torch.testing.assert_close(codes(resumed)[name], c, rtol=0, atol=0)


def _block_params(model: nn.Module) -> int:
    return sum(p.numel() for p in decoder_layers(model)[1][0].parameters())


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
def test_no_whole_model_copy(monkeypatch: pytest.MonkeyPatch, inplace: bool) -> None:
    """Every deep copy the block path makes holds at most one decoder layer's (inplace) or the non-layer
    skeleton's parameters; the whole-model path copies the whole model (so the probe can fail)."""
    model = tiny_llama(layers=2)
    total = sum(p.numel() for p in model.parameters())
    biggest = [0]
    real = copy.deepcopy

    def probe(obj, memo=None):
        if isinstance(obj, nn.Module) and not memo:  # a top-level copy (nested ones share its memo)
            biggest[0] = max(biggest[0], sum(p.numel() for p in obj.parameters()))
        return real(obj, memo)

    recipe = grid_recipe("learned", learned=LEARNED, calib_size=8)
    monkeypatch.setattr(copy, "deepcopy", probe)  # a probe on the standard library: what each copy holds
    quantize_blocks(model if not inplace else real(model), recipe, calib(), inplace=inplace)
    layer_params = _block_params(model)
    skeleton = total - 2 * layer_params
    assert biggest[0] <= (layer_params if inplace else max(layer_params, skeleton))
    biggest[0] = 0
    postquant.quantize(model, recipe, calib())
    assert biggest[0] >= total


def test_inplace_quantizes_the_given_model() -> None:
    model = tiny_llama()
    q = quantize_blocks(model, grid_recipe("rtn"), inplace=True)
    assert q is model and len(quantized_layers(model)) == 3 * 7


def test_errors() -> None:
    model = tiny_llama()
    with pytest.raises(UnsupportedModelError, match=r"model\.layers"):
        quantize_blocks(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), grid_recipe("rtn"))
    with pytest.raises(DataError, match="calib"):
        quantize_blocks(model, grid_recipe("learned", learned=LEARNED))
    with pytest.raises(RecipeError, match="a_bits"):
        quantize_blocks(model, grid_recipe("rtn", a_bits=8))
    with pytest.raises(RecipeError, match="loss"):
        quantize_blocks(model, grid_recipe("learned", learned={**LEARNED, "loss": "output"}), calib())
