"""Quantizing a causal LM from its Hugging Face directory layer by layer (`quantize_checkpoint`): the meta
skeleton computes what the loaded model computes, the codes are those of `quantize_blocks` on the loaded
model, a killed run resumes; activation chains beyond their byte bound live in memory-mapped files and give
the same codes."""

from __future__ import annotations

import datetime
import json
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import postquant  # noqa: E402
from postquant.blockwise import quantize_blocks, quantize_checkpoint  # noqa: E402
from postquant.distributed import Ranks  # noqa: E402
from postquant.errors import DataError, OutputError, RecipeError, UnsupportedModelError  # noqa: E402
from postquant.model.lazy import LazyCheckpoint  # noqa: E402
from postquant.nn import QuantizedLayer  # noqa: E402
from postquant.reconstruct.chains import ChainCheckpoint, ChainMemory, write_tensors  # noqa: E402
from tests.conftest import file_size_limit  # noqa: E402
from tests.llm.test_blockwise import LEARNED, VOCAB, calib, codes, grid_recipe, tiny_llama  # noqa: E402

FAST = {**LEARNED, "iters": 3}  # codes still move off nearest rounding; equality is what is checked


def saved(tmp_path, layers: int = 3, shard: str | None = "24KB", dtype=torch.float32, tie: bool = False):
    model = tiny_llama(layers=layers).to(dtype)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    return model, tmp_path


def assert_same_codes(a: nn.Module, b: nn.Module) -> None:
    ca, cb = codes(a), codes(b)
    assert ca.keys() == cb.keys() and ca
    for name in ca:
        torch.testing.assert_close(ca[name], cb[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("dtype", "tie"), [(torch.float32, False), (torch.bfloat16, True)], ids=["float32", "bfloat16-tied"]
)
def test_the_meta_skeleton_computes_what_the_loaded_model_computes(tmp_path, dtype, tie) -> None:
    _, path = saved(tmp_path, dtype=dtype, tie=tie)
    assert len(list(path.glob("model-*.safetensors"))) > 2  # several shards
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    checkpoint = LazyCheckpoint(path)
    model = checkpoint.empty_model()
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary tables computed, not left on meta
    checkpoint.materialize(model, "", skip=("model.layers.",))
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if not n.startswith("model.layers."))
    for k in range(len(model.model.layers)):
        checkpoint.materialize(model, f"model.layers.{k}")
    assert {p.dtype for p in model.parameters()} == {dtype}  # as stored, no float32 copy
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], rtol=0, atol=0)
    ids = calib()[0]
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("shard", ["24KB", None], ids=["sharded", "one-file"])
def test_rtn_from_the_checkpoint_gives_the_codes_of_the_loaded_model(tmp_path, shard) -> None:
    model, path = saved(tmp_path, shard=shard)
    recipe = grid_recipe("rtn")
    ref = quantize_blocks(model, recipe)
    q = quantize_checkpoint(path, recipe)
    assert_same_codes(ref, q)
    assert not any(p.is_meta for p in q.parameters())
    ids = calib()[0]
    torch.testing.assert_close(q(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_learned_rounding_from_the_checkpoint_gives_the_codes_of_the_loaded_model(tmp_path) -> None:
    model, path = saved(tmp_path, layers=2)
    recipe = grid_recipe("learned", learned=FAST, calib_size=8)
    ref = quantize_blocks(model, recipe, calib())
    q = quantize_checkpoint(path, recipe, calib())
    assert_same_codes(ref, q)
    assert len(postquant.result(q).learned.units) == 2
    rtn = quantize_blocks(model, grid_recipe("rtn"))
    assert any(not torch.equal(codes(q)[n], c) for n, c in codes(rtn).items())  # learning changed codes


def test_only_the_current_layer_is_ever_float(tmp_path) -> None:
    """At the end of layer k the later layers are still on meta and no decoder layer holds a float Linear
    weight: the finished ones hold packed codes."""
    _, path = saved(tmp_path)
    seen = []

    def probe(k: int, _name: str) -> None:
        layers = model_ref[0].model.layers if model_ref else None
        assert layers is not None
        for i, layer in enumerate(layers):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear) and "weight" in m._parameters]
            if i > k:
                assert all(p.is_meta for p in layer.parameters())
            else:
                assert not linears and any(isinstance(m, QuantizedLayer) for m in layer.modules())
        seen.append(k)

    model_ref: list[nn.Module] = []
    real = LazyCheckpoint.empty_model

    def capture(self, *args, **kwargs):
        model_ref.append(real(self, *args, **kwargs))
        return model_ref[0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LazyCheckpoint, "empty_model", capture)  # to look at the model while it is walked
        quantize_checkpoint(
            path, grid_recipe("learned", learned=FAST, calib_size=8), calib(), on_block_end=probe
        )
    assert seen == [0, 1, 2]


class _Killed(Exception):
    pass


def test_a_killed_run_from_the_checkpoint_resumes_with_identical_codes(tmp_path) -> None:
    _, path = saved(tmp_path / "model", layers=2)
    recipe = grid_recipe("learned", learned=FAST, calib_size=8)
    full = quantize_checkpoint(path, recipe, calib())

    def kill_after_first(k: int, _name: str) -> None:
        if k == 0:
            raise _Killed

    resume = tmp_path / "resume"
    with pytest.raises(_Killed):
        quantize_checkpoint(path, recipe, calib(), checkpoint_dir=resume, on_block_end=kill_after_first)
    seen: list[int] = []
    again = quantize_checkpoint(
        path, recipe, calib(), checkpoint_dir=resume, chain_bytes=0, on_block_end=lambda k, _: seen.append(k)
    )
    assert seen == [1] and postquant.result(again).learned.resumed == 1
    assert_same_codes(full, again)


@pytest.mark.parametrize("method", ["learned", "gptq"])
def test_chains_beyond_the_bound_are_files_with_the_same_codes(tmp_path, caplog, method) -> None:
    model = tiny_llama()
    extra = {"learned": FAST} if method == "learned" else {}
    recipe = grid_recipe(method, calib_size=8, **extra)
    in_memory = quantize_blocks(model, recipe, calib())
    with caplog.at_level(logging.INFO, logger="postquant.reconstruct.chains"):
        spilled = quantize_blocks(model, recipe, calib(), chain_bytes=1024, spill_dir=tmp_path)
    assert "memory-mapped files" in caplog.text
    assert_same_codes(in_memory, spilled)
    assert not list(tmp_path.iterdir())  # the files went with the chains, the folder at the end


def test_batches_of_different_lengths_spill_per_batch(tmp_path) -> None:
    """Windows of two lengths cannot share one chain tensor: each batch is its own file, same codes."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, VOCAB, (4, 16), generator=g), torch.randint(0, VOCAB, (4, 12), generator=g)]
    recipe = grid_recipe("learned", learned=FAST, calib_size=8)
    in_memory = quantize_blocks(model, recipe, batches)
    spilled = quantize_blocks(model, recipe, batches, chain_bytes=0, spill_dir=tmp_path)
    assert_same_codes(in_memory, spilled)


def test_no_room_for_spilled_chains_is_an_output_error(tmp_path) -> None:
    model = tiny_llama(layers=1)
    recipe = grid_recipe("learned", learned=FAST, calib_size=8)
    with file_size_limit(1024), pytest.raises(OutputError, match="activation chains"):
        quantize_blocks(model, recipe, calib(), chain_bytes=0, spill_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # the temporary folder is gone with what it held


def test_write_tensors_is_a_safetensors_file_of_views(tmp_path) -> None:
    whole = torch.randn(6, 3, 5).to(torch.bfloat16)
    tensors = {"a.0": whole[:2], "a.1": whole[2:], "b": torch.arange(7, dtype=torch.int64)}
    write_tensors(tmp_path / "t.safetensors", tensors)
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        torch.testing.assert_close(back[name], t, rtol=0, atol=0)


@given(
    st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64]),
)
@settings(max_examples=25, deadline=None)
def test_write_tensors_round_trips_any_shapes(shapes: list[list[int]], dtype: torch.dtype) -> None:
    import tempfile
    from pathlib import Path

    tensors = {f"t{i}": (torch.arange(math.prod(s)) % 7).to(dtype).reshape(s) for i, s in enumerate(shapes)}
    with tempfile.TemporaryDirectory() as tmp:
        write_tensors(Path(tmp) / "t.safetensors", tensors)
        back = load_file(Path(tmp) / "t.safetensors")
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)


def test_bad_directories_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match=r"no config\.json"):
        quantize_checkpoint(tmp_path, grid_recipe("rtn"))
    _, path = saved(tmp_path / "m")
    index = path / "model.safetensors.index.json"
    full = json.loads(index.read_text())
    cut = {**full, "weight_map": {k: v for k, v in full["weight_map"].items() if "layers.1.mlp.up" not in k}}
    index.write_text(json.dumps(cut))
    with pytest.raises(DataError, match=r"no tensor for parameter 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        quantize_checkpoint(path, grid_recipe("rtn"))
    index.write_text(json.dumps(full))
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(DataError, match="missing"):
        quantize_checkpoint(path, grid_recipe("rtn"))
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(DataError, match="save_pretrained"):
        quantize_checkpoint(path, grid_recipe("rtn"))


def test_in_a_process_group_quantize_checkpoint_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    """quantize_checkpoint is single-process for now: a process group is an UnsupportedModelError that names
    quantize_blocks, raised before the directory is read."""
    ranks = Ranks(0, 2, datetime.timedelta(seconds=5), torch.device("cpu"))
    monkeypatch.setattr("postquant.blockwise.current", lambda: ranks)
    with pytest.raises(UnsupportedModelError, match=r"one process.*quantize_blocks"):
        quantize_checkpoint(tmp_path / "not-read", grid_recipe("rtn"))


def test_mixed_precision_from_a_checkpoint_is_refused_before_any_work(tmp_path) -> None:
    """The allocation needs every layer's float weights at once, which quantize_checkpoint never holds."""
    recipe = grid_recipe("rtn", mixed={"w_bits_budget": 3.5, "importance": "datafree"})
    with pytest.raises(RecipeError, match=r"quantize_blocks"):
        quantize_checkpoint(tmp_path / "not-read", recipe)


@pytest.mark.parametrize("bound", [2**30, 0])
def test_a_rank_loads_its_part_of_the_saved_chains(tmp_path, bound) -> None:
    """The chains file holds every batch (rank 0 writes what one process writes); a rank holding batches 2-3
    reads those into its own chains (in memory or mapped files), one tensor per batch."""
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(2, 3, 4, generator=g) for _ in range(5)]
    f = [torch.randn(2, 3, 4, generator=g) for _ in range(5)]
    memory = ChainMemory(2**30)
    chains = [memory.chain([2] * 5, whole=False) for _ in range(2)]
    for b in range(5):
        chains[0].put(b, q[b])
        chains[1].put(b, f[b])
    ChainCheckpoint(tmp_path).save(3, *chains)
    part = ChainMemory(bound, tmp_path / "spill")
    part.plan(2 * 3 * 4 * 4 * 2, 2)
    got_q, got_f = ChainCheckpoint(tmp_path, None, range(2, 4)).load(3, part, [2, 2], whole=False)
    assert got_q.whole is None and len(got_q.batches()) == 2
    for i, b in enumerate(range(2, 4)):
        assert torch.equal(got_q.batches()[i], q[b]) and torch.equal(got_f.batches()[i], f[b])
    part.close()
