"""Learned rounding (postquant.reconstruct): quality, invariants, resume, failure modes. Tiny models only."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import postquant
from postquant.calib.augment import Augmentation, augment_batches
from postquant.calib.synthetic import bn_statistics_loss, distill_bn_data, noise_data
from postquant.errors import CheckpointError, DataError, RecipeError
from postquant.grids import fit_uniform_grid
from postquant.model.blocks import make_units
from postquant.model.fold import fold_batchnorm
from postquant.nn import QuantizedLayer
from postquant.recipe import Recipe
from postquant.reconstruct import LearnedConfig, preset
from postquant.reconstruct.checkpoint import CheckpointStore
from postquant.reconstruct.loop import optimise
from postquant.reconstruct.params import LayerRounding
from tests.conftest import TinyResNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def net() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def calib() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(64, 3, 8, 8)


def learned(method: str = "brecq", w_bits: int = 3, a_bits: int | None = None, **fields) -> dict:
    fields = {"iters": 60, "progress": False, "first_last_w_bits": None, **fields}
    return {"method": method, "w_bits": w_bits, "a_bits": a_bits, "learned": fields}


def codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


@torch.no_grad()
def block_error(qmodel: nn.Module, teacher: nn.Module, block: str, x: torch.Tensor) -> float:
    """MSE between a block's output in the quantized model (fed by its own earlier layers) and the float one."""

    def output(model: nn.Module) -> torch.Tensor:
        seen = {}
        h = model.get_submodule(block).register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
        model(x)
        h.remove()
        return seen["y"]

    return float((output(qmodel) - output(teacher)).pow(2).mean())


# ------------------------------------------------------------------------------------------- quality


def test_learned_rounding_lowers_block_error_below_nearest(net, calib):
    teacher, _ = fold_batchnorm(net, calib[:2])
    rtn = postquant.quantize(net, {"method": "rtn", "w_bits": 3}, calib=calib)
    q = postquant.quantize(net, learned("brecq", iters=100, lr=1e-2), calib=calib)
    report = postquant.result(q).learned
    assert [u.name for u in report.units] == ["conv1", "stage.0", "stage.1", "fc"]
    for u in report.units:
        assert u.status == "ok" and u.error_after < u.error_before, u
        if u.name.startswith("stage"):
            assert u.error_after < 0.9 * u.error_before, u
    for block in ("stage.0", "stage.1"):
        assert block_error(q, teacher, block, calib) < 0.9 * block_error(rtn, teacher, block, calib)


@pytest.mark.parametrize("variable", ["adaround", "sigmoid", "ste"])
def test_rounding_dof_keeps_codes_in_floor_or_floor_plus_one(net, calib, variable):
    teacher, _ = fold_batchnorm(net, calib[:2])
    q = postquant.quantize(net, learned("adaround", variable=variable, lr=5e-2, iters=40), calib=calib)
    moved = 0
    for name, layer in codes(q).items():
        grid = q.get_submodule(name).grid
        x = grid.to_int(teacher.get_submodule(name).weight)
        lo = torch.floor(x).clamp(grid.qmin, grid.qmax)
        hi = (torch.floor(x) + 1).clamp(grid.qmin, grid.qmax)
        c = layer.to(torch.float32)
        assert c.min() >= grid.qmin and c.max() <= grid.qmax
        assert torch.all((c == lo) | (c == hi))
        moved += int((c != torch.round(x).clamp(grid.qmin, grid.qmax)).sum())
    assert moved > 0  # something was learned


def test_grid_dof_codes_stay_on_the_grid(net, calib):
    q = postquant.quantize(
        net, learned("learned", w_bits=2, codes="grid", variable="ste", lr=0.5, iters=40), calib=calib
    )
    for name, c in codes(q).items():
        grid = q.get_submodule(name).grid
        assert c.min() >= grid.qmin and c.max() <= grid.qmax


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.integers(2, 5),
    variable=st.sampled_from(["adaround", "sigmoid", "ste"]),
)
def test_hard_codes_property(seed, bits, variable):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 10, generator=g)
    grid = fit_uniform_grid(w, bits)
    x = grid.to_int(w)
    cfg = LearnedConfig(variable=variable)
    r = LayerRounding(x, grid.nearest(w), grid, None, cfg, g)
    with torch.no_grad():
        for p in r.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 3)
    c = r.hard_codes().float()
    assert torch.all(
        (c == torch.floor(x).clamp(grid.qmin, grid.qmax))
        | (c == (torch.floor(x) + 1).clamp(grid.qmin, grid.qmax))
    )


def test_band_selection_leaves_out_of_band_weights_at_nearest(net, calib):
    teacher, _ = fold_batchnorm(net, calib[:2])
    q = postquant.quantize(net, learned("brecq", selection="band", band=0.15, lr=5e-2, iters=60), calib=calib)
    inside_moved = 0
    for name, c in codes(q).items():
        grid = q.get_submodule(name).grid
        x = grid.to_int(teacher.get_submodule(name).weight)
        nearest = grid.nearest(teacher.get_submodule(name).weight)
        out_band = (x - torch.floor(x) - 0.5).abs() > 0.15
        assert torch.equal(c.int()[out_band], nearest[out_band])
        inside_moved += int((c.int() != nearest)[~out_band].sum())
    assert inside_moved > 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_auto_selection_learns_a_random_half_at_two_bits_and_everything_above(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    grid = fit_uniform_grid(w, bits)
    cfg = LearnedConfig(selection="auto", fraction=0.5)
    mask = LayerRounding(grid.to_int(w), grid.nearest(w), grid, None, cfg, g).mask
    if bits <= 2:
        assert 0.45 < mask.float().mean() < 0.55
    else:
        assert bool(mask.all())


def test_the_learned_preset_selects_automatically():
    assert preset("learned").selection.value == "auto"


# ------------------------------------------------------------------------------------------ resume


def _crash_after(store_dir, finished: int) -> None:
    """Leave a checkpoint directory as a run stopped after `finished` units leaves it: their unit files and
    an index naming them (`CheckpointStore.save` writes the unit file, then the index, each atomically)."""
    index = json.loads((store_dir / "index.json").read_text())
    for k in [k for k in index["done"] if int(k) >= finished]:
        (store_dir / index["done"].pop(k)["file"]).unlink()
    (store_dir / "index.json").write_text(json.dumps(index))


def test_interrupted_run_resumes_with_identical_codes(net, calib, tmp_path):
    """(A run killed for real, SIGKILL mid-unit, is tests/reconstruct/test_resume_killed.py.)"""
    recipe = learned("qdrop", a_bits=4, iters=30, selection="random", checkpoint_dir=str(tmp_path))
    ref = codes(
        postquant.quantize(
            net, {**recipe, "learned": {**recipe["learned"], "checkpoint_dir": None}}, calib=calib
        )
    )
    postquant.quantize(net, recipe, calib=calib)
    (index,) = tmp_path.glob("*/index.json")
    _crash_after(index.parent, 2)
    q = postquant.quantize(net, recipe, calib=calib)
    assert postquant.result(q).learned.resumed == 2
    got = codes(q)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0)


def test_nan_loss_keeps_previous_codes_with_a_warning(net, calib, monkeypatch, caplog):
    import postquant.reconstruct.loop as loop

    real = loop.unit_distance
    calls = {"n": 0}

    def poisoned(out, target, weight=None):
        calls["n"] += 1
        value = real(out, target, weight)
        return value * float("nan") if out.shape[1] == 8 and out.dim() == 4 and calls["n"] > 5 else value

    # fault injection (a loss that turns NaN mid-optimisation): no input makes only these units diverge
    monkeypatch.setattr(loop, "unit_distance", poisoned)
    rtn = codes(postquant.quantize(net, {"method": "rtn", "w_bits": 3}, calib=calib))
    with caplog.at_level(logging.WARNING, logger="postquant.reconstruct"):
        q = postquant.quantize(net, learned("brecq", iters=20), calib=calib)
    statuses = {u.name: u.status for u in postquant.result(q).learned.units}
    assert statuses["stage.0"] == "nan" and statuses["stage.1"] == "nan"
    assert "non-finite" in caplog.text
    got = codes(q)
    for name in ("stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2"):
        assert torch.equal(got[name], rtn[name])


# ------------------------------------------------------------------------------------ bad inputs


def test_wrong_shape_calibration_is_a_clear_error(net):
    with pytest.raises(DataError, match="cannot run on calibration batch 0"):
        postquant.quantize(net, learned(), calib=torch.randn(16, 3, 5))


def test_wrong_dtype_calibration_is_a_clear_error(net):
    with pytest.raises(DataError, match="int64"):
        postquant.quantize(net, learned(), calib=torch.randint(0, 255, (16, 3, 8, 8)))


def test_empty_calibration_is_a_clear_error(net):
    with pytest.raises(DataError, match="empty"):
        postquant.quantize(net, learned(), calib=[])


def test_missing_calibration_is_a_clear_error(net, calib):
    with pytest.raises(DataError, match="calibration data"):
        postquant.quantize(net, learned(), example_inputs=calib[:2])


def test_fewer_samples_than_batch_size_warns_and_runs(net, calib, caplog):
    with caplog.at_level(logging.WARNING, logger="postquant.reconstruct"):
        q = postquant.quantize(net, learned(iters=5, batch_size=32), calib=calib[:8])
    assert "only 8 calibration samples" in caplog.text
    assert len(postquant.result(q).learned.units) == 4


def test_block_pattern_matching_nothing_is_a_recipe_error(net, calib):
    with pytest.raises(RecipeError, match=r"learned\.block_patterns.*'encoder\.\*'"):
        postquant.quantize(net, learned(block_patterns=["encoder.*"]), calib=calib)


def test_forward_loop_calibration(net, calib):
    q = postquant.quantize(net, learned(iters=5), calib=lambda m: [m(b) for b in calib.split(16)])
    assert len(postquant.result(q).learned.units) == 4


# ------------------------------------------------------------------------------- units and recipes


def test_units_blocks_and_patterns(net, calib):
    q = postquant.quantize(net, {"method": "rtn", "w_bits": 4}, calib=calib)
    assert [u.name for u in make_units(q, "block")] == ["conv1", "stage.0", "stage.1", "fc"]
    assert [u.name for u in make_units(q, "layer")][:3] == ["conv1", "stage.0.conv1", "stage.0.conv2"]
    assert [u.name for u in make_units(q, "blocks", blocks_per_unit=2)] == ["conv1", "stage.0+stage.1", "fc"]
    assert [u.name for u in make_units(q, "block", ["stage.1"])] == [
        "conv1",
        "stage.0.conv1",
        "stage.0.conv2",
        "stage.1",
        "fc",
    ]


class TinyEncoder(nn.Module):
    """A transformer-like stack: blocks in a ModuleList called with a keyword mask (HF style)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(8, 8), "o": nn.Linear(8, 8)}) for _ in range(2)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for blk in self.layer:
            x = x + blk["o"](torch.relu(blk["q"](x))) * mask[..., None]
        return self.head(x)


def test_units_of_a_module_list_stack():
    torch.manual_seed(0)
    q = postquant.quantize(TinyEncoder(), {"method": "rtn", "w_bits": 4})
    assert [u.name for u in make_units(q, "block")] == ["layer.0", "layer.1", "head"]


def test_presets_and_recipe_round_trip(tmp_path):
    r = Recipe.coerce({"method": "brecq", "learned": {"iters": 500}})
    assert r.learned.iters == 500 and r.learned.reg_lambda == 0.01 and r.learned.act_lr == 4e-5
    assert r.learned.first_last_w_bits == 8 and r.learned.unit.value == "block"
    assert Recipe.coerce({"method": "qdrop"}).learned.drop_prob == 0.5
    assert Recipe.coerce({"method": "adaround"}).learned.unit.value == "layer"
    path = tmp_path / "r.yaml"
    r.to_yaml(path)
    assert Recipe.coerce(path) == r
    assert preset("learned").iters == Recipe.coerce({"method": "learned"}).learned.iters


@pytest.mark.parametrize(
    ("learned_fields", "field"),
    [
        ({"iters": -1}, "learned.iters"),
        ({"variable": "adaround", "codes": "grid"}, "learned"),
        ({"bogus": 1}, "learned.bogus"),
        ({"variable": "adaround", "learn_weight_range": True}, "learned"),
        ({"variable": "ste", "learn_weight_range": True, "learn_weight_scales": True}, "learned"),
        ({"variable": "ste", "learn_weight_range": True, "range_lr": 0}, "learned.range_lr"),
        ({"variable": "adaround", "keep_best_step": True}, "learned"),
        ({"autocast": "float16"}, "learned.autocast"),
    ],
)
def test_bad_learned_fields_name_the_field(learned_fields, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        Recipe.coerce({"method": "brecq", "learned": learned_fields})


def test_first_last_policy_of_brecq(net, calib):
    q = postquant.quantize(
        net, {"method": "brecq", "w_bits": 3, "learned": {"iters": 2, "progress": False}}, calib=calib
    )
    assert q.conv1.bits == 8 and q.fc.bits == 8 and q.stage[0].conv1.bits == 3


@pytest.mark.parametrize("loss", ["fisher", "output"])
def test_other_losses_run_and_improve(net, calib, loss):
    q = postquant.quantize(net, learned("brecq", a_bits=4, loss=loss, iters=40, lr=1e-2), calib=calib)
    units = postquant.result(q).learned.units
    assert all(u.status in ("ok", "kept-start") for u in units)
    assert any(u.error_after < u.error_before for u in units)


# ---------------------------------------------------------------------------------- calibration data


def test_synthetic_data_lowers_bn_statistics_loss(net):
    noise = noise_data((3, 8, 8), 32, seed=0)[0]
    synth = distill_bn_data(net, (3, 8, 8), 32, steps=40, seed=0)[0]
    with torch.no_grad():
        assert float(bn_statistics_loss(net, synth)) < 0.5 * float(bn_statistics_loss(net, noise))
    assert torch.equal(synth, distill_bn_data(net, (3, 8, 8), 32, steps=40, seed=0)[0])  # seeded


def test_synthetic_source_in_quantize(net, calib):
    q = postquant.quantize(
        net,
        {**learned(iters=5, calib_source="synthetic", synthetic_steps=5), "calib_size": 32},
        example_inputs=calib[:2],
    )
    assert len(postquant.result(q).learned.units) == 4


def test_synthetic_data_is_kept_in_the_checkpoint_dir_for_a_resume(net, calib, tmp_path, caplog):
    """Distilling costs a model forward+backward per step: a resumed run loads the data instead."""
    recipe = {
        **learned(iters=5, calib_source="synthetic", synthetic_steps=5, checkpoint_dir=str(tmp_path)),
        "calib_size": 32,
    }
    first = postquant.quantize(net, recipe, example_inputs=calib[:2])
    (data_file,) = tmp_path.glob("data_*.safetensors")
    written = (data_file.stat().st_ino, data_file.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="postquant.reconstruct.checkpoint"):
        again = postquant.quantize(net, recipe, example_inputs=calib[:2])
    assert f"calibration data loaded from {data_file}" in caplog.text
    assert (data_file.stat().st_ino, data_file.stat().st_mtime_ns) == written  # loaded, not distilled again
    for a, b in zip(first.modules(), again.modules(), strict=True):
        if isinstance(a, QuantizedLayer):
            assert torch.equal(a.codes, b.codes)
    other_seed = postquant.quantize(net, {**recipe, "seed": 1}, example_inputs=calib[:2])
    assert (
        len(list(tmp_path.glob("data_*.safetensors"))) == 2 and other_seed is not None
    )  # other data: distilled
    data_file.write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="delete it"):
        postquant.quantize(net, recipe, example_inputs=calib[:2])


def test_augmentation_adds_seeded_copies(calib):
    batches = list(calib.split(16))
    kinds = [Augmentation.FLIP, Augmentation.SHIFT, Augmentation.NOISE, Augmentation.MIXUP]
    out = augment_batches(batches, kinds, copies=2, seed=3)
    assert len(out) == 3 * len(batches) and all(b.shape == (16, 3, 8, 8) for b in out)
    assert not torch.equal(out[4], batches[0])
    again = augment_batches(batches, kinds, copies=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    with pytest.raises(DataError, match="image batches"):
        augment_batches([{"input_ids": torch.zeros(2, 3)}], kinds)


# ------------------------------------------------------------------------------------------- power grid


@pytest.mark.parametrize("learn_scales", [False, True], ids=["codes", "codes+scales"])
def test_learned_rounding_on_a_power_grid_lowers_block_error_below_nearest(net, calib, learn_scales):
    """docs/algorithms.md 1.2: learned rounding works on the power grid's integer domain unchanged."""
    teacher, _ = fold_batchnorm(net, calib[:2])
    power = {"grid": "power", "power_exponent": 0.7}
    rtn = postquant.quantize(net, {"method": "rtn", "w_bits": 3, **power}, calib=calib)
    q = postquant.quantize(
        net,
        {**learned("brecq", iters=60, lr=1e-2, learn_weight_scales=learn_scales), **power},
        calib=calib,
    )
    for name, layer in codes(q).items():
        qlayer = q.get_submodule(name)
        assert qlayer.grid_config.kind == "power" and float(qlayer.grid_exponent) == pytest.approx(0.7)
        assert layer.min() >= qlayer.grid.qmin and layer.max() <= qlayer.grid.qmax
        assert torch.equal(qlayer.weight, qlayer.grid.dequantize(layer.to(torch.int32)))
    for u in postquant.result(q).learned.units:  # a unit that does not improve keeps its start ('kept-start')
        assert u.error_after <= u.error_before, u
        if u.name.startswith("stage"):
            assert u.status == "ok" and u.error_after < 0.95 * u.error_before, u
    for block in ("stage.0", "stage.1"):
        assert block_error(q, teacher, block, calib) < 0.9 * block_error(rtn, teacher, block, calib)
    scales_moved = any(
        not torch.equal(q.get_submodule(n).grid_inv_scale, rtn.get_submodule(n).grid_inv_scale)
        for n in codes(q)
    )
    assert scales_moved == learn_scales


def test_learned_weight_scales_keep_the_power_grid():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    grid = postquant.grids.fit_power_grid(w, 3, exponent=0.5)
    cfg = LearnedConfig(learn_weight_scales=True)
    r = LayerRounding(grid.to_int(w), grid.nearest(w), grid, None, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        r.log_scale.fill_(0.1)
    current = r.current_grid()
    assert isinstance(current, postquant.grids.PowerGrid) and torch.equal(current.max_abs, grid.max_abs)
    assert torch.allclose(current.inv_scale, grid.inv_scale * torch.exp(torch.tensor(-0.1)))
    r.weight().sum().backward()  # gradients reach the scales through the power grid's dequantization
    assert r.log_scale.grad is not None and r.log_scale.grad.abs().sum() > 0


class WithPooler(nn.Module):
    """A model whose second output (a 'pooler', as in Hugging Face's BertModel) is not its main output:
    the main output does not depend on the pooler's weights at all."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyResNet()
        self.pooler = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, self.pooler(logits)


@pytest.mark.parametrize("loss", ["fisher", "output"])
def test_losses_through_the_final_output_tolerate_a_unit_it_ignores(calib, loss):
    torch.manual_seed(0)
    model = WithPooler().eval()
    q = postquant.quantize(model, learned("brecq", loss=loss, iters=5), calib=calib)
    units = {u.name: u for u in postquant.result(q).learned.units}
    assert "pooler" in units and all(u.status in ("ok", "kept-start") for u in units.values())
    assert isinstance(q.pooler, QuantizedLayer)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_better_start_guards_units_that_learn_worse(net, calib, keep):
    """A far too large learning rate spoils the learned codes: the guard keeps the start, or (off) not."""
    recipe = learned("learned", iters=8, lr=50.0, drop_prob=0.0, keep_better_start=keep)
    units = postquant.result(postquant.quantize(net, recipe, calib=calib)).learned.units
    worse = [u for u in units if u.error_after > u.error_before]
    kept = [u for u in units if u.status == "kept-start"]
    if keep:
        assert kept and not worse
    else:
        assert worse and not kept


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e.update(file="../../outside.safetensors"),  # a path that leaves the directory
        lambda e: e.update(file="/etc/passwd"),
        lambda e: e.update(file="unit_0003.safetensors"),  # another unit's file
        lambda e: e.pop("outcome"),
        lambda e: e.update(outcome="ok"),
    ],
    ids=["escaping", "absolute", "other-unit", "no-outcome", "bad-outcome"],
)
def test_a_tampered_checkpoint_index_is_a_checkpoint_error(tmp_path, tamper):
    store = CheckpointStore(tmp_path, "k", ["a", "b"])
    store.save(0, {"w": torch.ones(2)}, {"status": "ok"})
    index = json.loads(store.index_path.read_text())
    tamper(index["done"]["0"])
    store.index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="delete"):
        CheckpointStore(tmp_path, "k", ["a", "b"])


def test_a_damaged_unit_file_is_a_checkpoint_error(tmp_path):
    store = CheckpointStore(tmp_path, "k", ["a"])
    store.save(0, {"w": torch.ones(2)}, {"status": "ok"})
    (store.dir / "unit_0000.safetensors").write_bytes(b"\x00garbage")
    again = CheckpointStore(tmp_path, "k", ["a"])
    assert again.finished() == [0]
    with pytest.raises(CheckpointError, match="cannot be read"):
        again.load(0)


def test_a_squant_start_uses_the_recipe_squant_mode(net, calib):
    """init='squant' starts from the recipe's SQuant variant: 'e' (nearest rounding only) gives the codes of
    init='nearest'; the default 'ekc' flips some of them."""

    def start_codes(init: str, **recipe_fields) -> dict[str, torch.Tensor]:
        recipe = {**learned("brecq", iters=0, init=init, keep_better_start=False), **recipe_fields}
        return codes(postquant.quantize(net, recipe, calib=calib))

    nearest = start_codes("nearest")
    only_e = start_codes("squant", squant_mode="e")
    full = start_codes("squant")  # the recipe's default squant_mode
    assert Recipe().squant_mode == "ekc"
    assert all(torch.equal(only_e[n], nearest[n]) for n in nearest)
    assert any(not torch.equal(full[n], nearest[n]) for n in nearest)


def test_a_full_disk_while_checkpointing_a_unit_is_an_output_error(tmp_path):
    from postquant.errors import OutputError
    from tests.conftest import file_size_limit

    store = CheckpointStore(tmp_path, "k", ["a", "b"])
    store.save(0, {"w": torch.ones(2)}, {"status": "ok"})
    with file_size_limit(1024), pytest.raises(OutputError, match="cannot save unit 1"):
        store.save(1, {"w": torch.ones(4096)}, {"status": "ok"})
    again = CheckpointStore(tmp_path, "k", ["a", "b"])
    assert again.finished() == [0]  # the finished unit stays; no partial unit file
    assert sorted(p.name for p in store.dir.iterdir()) == ["index.json", "unit_0000.safetensors"]


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    seed=st.integers(0, 99),
    beta=st.floats(2.0, 20.0),
)
def test_regulariser_and_soft_weights_match_the_boolean_indexed_formula(
    bits: int, seed: int, beta: float
) -> None:
    """AdaRound's regulariser is computed on the whole tensor (masked by `where`, or unmasked when every weight
    is learned) instead of on ``h[mask]``: the same value and gradient of the rounding variables, to the last
    bit when every weight is learned and within a float rounding of ``pow`` for a random selection (2 bits)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, 3, generator=gen)
    grid = fit_uniform_grid(w, bits)
    cfg = preset("learned", iters=10)
    r = LayerRounding(grid.to_int(w), grid.nearest(w), grid, None, cfg, torch.Generator().manual_seed(seed))
    assert r.learn_all == bool(r.mask.all())
    with torch.no_grad():
        r.v.copy_(torch.randn(r.v.shape, generator=gen) * 3)
    got = r.regulariser(beta)
    (got_grad,) = torch.autograd.grad(got, r.v)
    h = r._h()[r.mask]
    want = (1 - (2 * h - 1).abs().pow(beta)).sum()
    (want_grad,) = torch.autograd.grad(want, r.v)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    exact = 0.0 if r.learn_all else 1e-6  # a masked pow runs vectorised in other lanes: a last-bit difference
    torch.testing.assert_close(got_grad, want_grad, rtol=exact, atol=exact)
    soft = r.int_weight()
    want_soft = torch.where(r.mask, torch.clamp(r.floor + r._h(), grid.qmin, grid.qmax), r.init_codes)
    torch.testing.assert_close(soft, want_soft, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- learned ranges


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.integers(2, 8),
    group=st.sampled_from([0, 8, 16]),
    symmetric=st.booleans(),
)
def test_a_learned_range_starts_exactly_on_the_starting_grid(seed, bits, group, symmetric):
    """At multipliers 1 the learned range is the grid itself, bit for bit: codes, step, zero point, weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 32, generator=gen) * torch.rand(6, 1, generator=gen) * 3
    kind = ("group", group) if group else ("channel", 128)
    grid = fit_uniform_grid(w, bits, kind[0], group_size=kind[1], symmetric=symmetric)
    cfg = LearnedConfig(variable="ste", learn_weight_range=True)
    init = grid.nearest(w)
    r = LayerRounding(grid.to_int(w), init, grid, None, cfg, gen, symmetric=symmetric)
    assert len(r.range_params()) == (1 if symmetric else 2)
    current = r.current_grid()
    assert torch.equal(current.inv_scale, grid.inv_scale) and torch.equal(current.zero_point, grid.zero_point)
    assert torch.equal(r.hard_codes(), init)
    assert torch.equal(r.weight(), grid.dequantize(init))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 6), lo=st.floats(0.25, 1), hi=st.floats(0.25, 1))
def test_a_moved_range_is_the_grid_fit_of_the_shrunk_range(seed, bits, lo, hi):
    """Multipliers a, b give the grid `fit_uniform_grid`'s formula makes for [a*lo, b*hi]: integer zero points,
    codes in range, and the forward weight is that grid's dequantization of the codes."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 32, generator=gen)
    grid = fit_uniform_grid(w, bits, "group", group_size=16)
    r = LayerRounding(
        grid.to_int(w),
        grid.nearest(w),
        grid,
        None,
        LearnedConfig(variable="ste", learn_weight_range=True),
        gen,
    )
    with torch.no_grad():
        r.range_lo.fill_(lo)
        r.range_hi.fill_(hi)
    current = r.current_grid()
    ends = (grid.qmin + grid.zero_point) / grid.inv_scale, (grid.qmax + grid.zero_point) / grid.inv_scale
    expected_s = (2**bits - 1) / (hi * ends[1] - lo * ends[0])
    torch.testing.assert_close(current.inv_scale, expected_s, rtol=1e-5, atol=0)
    assert torch.equal(current.zero_point, current.zero_point.round())
    assert (current.zero_point - torch.round(expected_s * lo * ends[0]) + grid.qmin).abs().max() <= 1
    codes_ = r.hard_codes()
    assert codes_.min() >= grid.qmin and codes_.max() <= grid.qmax
    torch.testing.assert_close(r.weight(), current.dequantize(codes_), rtol=0, atol=0)


def test_a_recipe_with_the_lp_range_on_a_gguf_grid_is_refused():
    with pytest.raises(RecipeError, match="w_range 'lp' searches integer zero points"):
        Recipe.coerce({"method": "rtn", "w_bits": 4, "grid": "gguf-q4_1", "w_range": "lp"})


@pytest.mark.parametrize("grid", ["power", "gguf-q4_0"])
def test_a_recipe_with_learned_ranges_on_another_grid_is_refused(grid):
    with pytest.raises(RecipeError, match="learn_weight_range moves a uniform grid"):
        Recipe.coerce({**learned("learned-fast", w_bits=4, learn_weight_range=True), "grid": grid})


def test_learned_ranges_need_a_uniform_grid():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    grid = postquant.grids.fit_power_grid(w, 3, exponent=0.5)
    cfg = LearnedConfig(variable="ste", learn_weight_range=True)
    with pytest.raises(RecipeError, match="learn_weight_range needs the uniform grid"):
        LayerRounding(grid.to_int(w), grid.nearest(w), grid, None, cfg, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_learned_ranges_move_steps_and_zero_points_and_save_exactly(net, calib, tmp_path, symmetric):
    fields = {"iters": 40, "max_samples": None, "check_samples": None}
    base = {**learned("learned-fast", w_bits=3, **fields), "symmetric": symmetric}
    start = postquant.quantize(net, {**base, "learned": {**base["learned"], "iters": 0}}, calib=calib)
    q = postquant.quantize(
        net, {**base, "learned": {**base["learned"], "learn_weight_range": True}}, calib=calib
    )
    moved = False
    for name, layer in codes(q).items():
        qlayer, slayer = q.get_submodule(name), start.get_submodule(name)
        grid = qlayer.grid
        assert layer.min() >= grid.qmin and layer.max() <= grid.qmax
        assert torch.equal(grid.zero_point, grid.zero_point.round())
        assert torch.equal(qlayer.weight, grid.dequantize(layer.to(torch.int32)))
        moved |= not torch.equal(qlayer.grid_inv_scale, slayer.grid_inv_scale)
        if symmetric:
            assert not grid.zero_point.any()
        else:  # ranges only shrink: the step never grows past the start's (S' >= S)
            assert (qlayer.grid_inv_scale >= slayer.grid_inv_scale * (1 - 1e-6)).all()
    assert moved  # (zero points move only where a row's two ends move far apart: rarely at 3-bit channels)
    for u in postquant.result(q).learned.units:
        assert u.error_after <= u.error_before, u
    postquant.save(q, tmp_path / "q")
    back = postquant.load(tmp_path / "q", net)
    x = calib[:8]
    torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("keep_best", [False, True])
def test_keep_best_step_ends_on_the_variables_of_the_lowest_loss(keep_best):
    """A variable pushed up by 1 per step (signed gradient) through losses 4, 0, -2, -2, 0, 4: kept at the
    first lowest (p = 2), else where the last step left it (p = 6)."""
    p = nn.Parameter(torch.zeros(()))
    cfg = LearnedConfig(
        variable="ste", optimizer="signsgd", lr=1.0, iters=6, progress=False, keep_best_step=keep_best
    )

    def step_loss(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return -p + (p.detach() - 2) ** 2, torch.zeros(())

    result = optimise(step_loss, [{"params": [p], "lr": 1.0}], [], cfg, "test")
    assert result.steps == 6 and result.last_loss == 4.0
    assert p.item() == (2.0 if keep_best else 6.0)


def test_autocast_runs_the_steps_in_bfloat16_and_the_check_in_float32():
    """`autocast: bfloat16`: each step's matmul runs in bfloat16 (seen by the layer's forward hook), the loss
    the optimiser gets is float32, and the unit check's forwards outside the steps stay float32."""
    layer = nn.Linear(8, 4)
    p = nn.Parameter(torch.zeros(4, 8))
    seen: list[torch.dtype] = []
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.randn(16, 8)

    def step_loss(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = nn.functional.linear(x, layer.weight + p, layer.bias)
        layer(x)  # a module's forward under the same context
        return (out - 1).pow(2).mean(), torch.zeros(())

    for amp, dtype in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = LearnedConfig(variable="ste", optimizer="adam", lr=1e-2, iters=3, progress=False, autocast=amp)
        seen.clear()
        result = optimise(step_loss, [{"params": [p], "lr": 1e-2}], [], cfg, "test")
        assert result.status == "ok" and seen == [dtype] * 3
        assert isinstance(result.last_loss, float) and math.isfinite(result.last_loss)
    layer(x)
    assert seen[-1] == torch.float32  # outside the steps: float32 again


def test_autocast_learned_rounding_stays_close_to_float32(net, calib):
    """bfloat16 steps learn (other codes than float32 steps, as good a reconstruction: the check and the
    reported unit errors are float32), and the setting enters the checkpoint key only when set."""
    errors, chosen = {}, {}
    for amp in (None, "bfloat16"):
        recipe = {
            "method": "learned-fast",
            "w_bits": 3,
            "learned": {"iters": 40, "progress": False, "autocast": amp},
        }
        q = postquant.quantize(net, recipe, calib=calib)
        units = postquant.result(q).learned.units
        assert any(u.error_after < u.error_before for u in units)
        errors[amp], chosen[amp] = sum(u.error_after for u in units), codes(q)
    assert any(not torch.equal(chosen[None][n], chosen["bfloat16"][n]) for n in chosen[None])
    assert errors["bfloat16"] <= 1.1 * errors[None]
    assert "autocast" not in LearnedConfig().model_dump() and LearnedConfig(autocast="bfloat16").autocast
