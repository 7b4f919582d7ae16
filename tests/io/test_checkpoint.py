"""save/load: bit-identical outputs, sizes, and clear errors for broken or foreign checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import postquant
from postquant.errors import CheckpointError, OutputError
from postquant.io import checkpoint_size, float_size, load, save
from postquant.io.checkpoint import MANIFEST_FILE, TENSORS_FILE
from postquant.model import quantized_layers
from postquant_lab import load as lab_load
from tests.conftest import file_size_limit

RECIPES = {
    f"{method}-w{w}-{'a8' if a else 'wonly'}": {"method": method, "w_bits": w, "a_bits": a}
    for method in ("rtn", "squant")
    for w in (2, 3, 4, 6, 8)
    for a in (None, 8)
}
# learned rounding, including learned weight scales, activation step sizes and biases (all must be saved)
LEARNED = {
    "iters": 10,
    "progress": False,
    "learn_weight_scales": True,
    "learn_act_scales": True,
    "learn_bias": True,
}
RECIPES |= {
    f"{method}-w{w}-a8": {"method": method, "w_bits": w, "a_bits": 8, "learned": LEARNED}
    for method in ("adaround", "qdrop", "learned")
    for w in (2, 4)
}
# the power grid (searched or fixed exponent; with learned weight scales on it)
RECIPES |= {
    f"power-{method}-w{w}-{'a8' if a else 'wonly'}": {
        "method": method,
        "w_bits": w,
        "a_bits": a,
        "grid": "power",
        **({"learned": LEARNED} if method == "adaround" else {}),
    }
    for method, w, a in (("rtn", 3, None), ("squant", 4, 8), ("adaround", 3, 8))
}
RECIPES["power-a0.5-tensor-w2"] = {
    "w_bits": 2,
    "grid": "power",
    "power_exponent": 0.5,
    "granularity": "tensor",
}


def _quantize(model: nn.Module, recipe: dict, batches: list[torch.Tensor]) -> nn.Module:
    return postquant.quantize(model, recipe, calib=batches, example_inputs=batches[0])


def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x) for x in batches])


@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=list(RECIPES))
def test_save_load_gives_bit_identical_outputs(small_net, batches, tmp_path, recipe):
    qmodel = _quantize(small_net, recipe, batches)
    save(qmodel, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", small_net)
    assert torch.equal(_outputs(loaded, batches), _outputs(qmodel, batches))
    for name, layer in quantized_layers(qmodel).items():
        twin = loaded.get_submodule(name)
        assert torch.equal(twin.codes, layer.codes)
        assert twin.grid_config == layer.grid_config
        assert (twin.act_quant is None) == (layer.act_quant is None)
    assert isinstance(loaded.bn1, nn.Identity) and isinstance(loaded.bn3, nn.BatchNorm1d)  # same fold
    assert postquant.result(loaded).recipe == postquant.result(qmodel).recipe
    assert isinstance(small_net.bn1, nn.BatchNorm2d)  # the float model is not modified


def test_power_grid_tensors_are_saved_and_reloaded_exactly(small_net, batches, tmp_path):
    qmodel = _quantize(
        small_net, {"method": "squant", "w_bits": 3, "grid": "power", "power_exponent": 0.6}, batches
    )
    save(qmodel, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert manifest["layers"]["conv2"]["grid"]["kind"] == "power"
    assert manifest["recipe"]["grid"] == "power"
    loaded = load(tmp_path / "ckpt", small_net)
    for name, layer in quantized_layers(qmodel).items():
        twin = loaded.get_submodule(name)
        for key in ("inv_scale", "zero_point", "max_abs", "exponent"):
            assert torch.equal(getattr(twin, f"grid_{key}"), getattr(layer, f"grid_{key}")), (name, key)
        assert torch.equal(twin.weight, layer.weight)
    assert any(float(layer.grid_exponent) < 1 for layer in quantized_layers(qmodel).values())


def test_an_unknown_grid_kind_in_a_checkpoint_is_a_checkpoint_error(small_net, batches, tmp_path):
    save(_quantize(small_net, {"w_bits": 4, "grid": "power"}, batches), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["layers"]["conv2"]["grid"]["kind"] = "lloyd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown grid kind 'lloyd'"):
        load(tmp_path / "ckpt", small_net)


def test_unfolded_and_per_tensor_models_round_trip(small_net, batches, tmp_path):
    qmodel = _quantize(
        small_net, {"w_bits": 4, "a_bits": 6, "fold_bn": False, "granularity": "tensor"}, batches
    )
    save(qmodel, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", small_net)
    assert isinstance(loaded.bn1, nn.BatchNorm2d)
    assert torch.equal(_outputs(loaded, batches), _outputs(qmodel, batches))


def test_manifest_describes_layers_and_architecture(small_net, batches, tmp_path):
    qmodel = _quantize(small_net, {"w_bits": 3, "a_bits": 8}, batches)
    save(qmodel, tmp_path / "ckpt", model_name="my-small-net")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    assert manifest["model_name"] == "my-small-net"
    assert manifest["postquant_version"] == postquant.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["recipe"]["w_bits"] == 3
    conv2 = manifest["layers"]["conv2"]
    assert conv2["weight_shape"] == [16, 8, 3, 3]
    assert conv2["bits"] == 3 and conv2["grid"]["kind"] == "uniform"
    assert conv2["packed_bytes"] == (16 * 8 * 9 * 3 + 7) // 8
    assert conv2["act"] == {"bits": 8, "qmin": 0, "qmax": 255}
    assert manifest["layers"]["conv1"]["act"] is None  # the first layer's input stays float
    assert {"bn1", "bn2"} <= set(manifest["architecture"]["identity"])
    assert manifest["architecture"]["tensors"]["conv1.bias"] == [8]  # created by folding
    assert len(manifest["sha256"]) == 64


def test_save_replaces_an_old_checkpoint_and_leaves_no_temporary_files(small_net, batches, tmp_path):
    for bits in (4, 2):
        save(_quantize(small_net, {"w_bits": bits}, batches), tmp_path / "ckpt")
    assert load(tmp_path / "ckpt", small_net).conv2.bits == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_save_writes_nothing(small_net, batches, tmp_path):
    qmodel = _quantize(small_net, {"w_bits": 4}, batches)
    with file_size_limit(256), pytest.raises(OutputError, match="File too large"):  # the disk fills up
        save(qmodel, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_tied_tensors_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.proj(self.emb(ids))))

    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 20, (4, 6))
    qmodel = postquant.quantize(model, {"w_bits": 4, "ignore": ["head"]}, example_inputs=ids)
    save(qmodel, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    loaded = load(tmp_path / "ckpt", model)
    assert torch.equal(loaded(ids), qmodel(ids))


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def saved(small_net, batches, tmp_path):
    save(_quantize(small_net, {"w_bits": 4, "a_bits": 8}, batches), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_directory_or_file(saved, small_net, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere", small_net)
    (saved / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        load(saved, small_net)


def test_tampered_tensor_file(saved, small_net):
    data = bytearray((saved / TENSORS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load(saved, small_net)


def test_truncated_tensor_file(saved, small_net):
    data = (saved / TENSORS_FILE).read_bytes()
    (saved / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load(saved, small_net)


def test_unparsable_tensor_file_with_a_matching_hash(saved, small_net):
    import hashlib

    data = (saved / TENSORS_FILE).read_bytes()[:100]
    (saved / TENSORS_FILE).write_bytes(data)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load(saved, small_net)


def test_incompatible_format_version(saved, small_net):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"format 99.*reads format 1"):
        load(saved, small_net)


def test_another_architecture_names_the_first_mismatching_layer(saved, net_factory):
    with pytest.raises(CheckpointError, match=r"'conv2'.*shape"):
        load(saved, net_factory(width=32))
    other = net_factory()
    other.relu2 = nn.GELU()
    with pytest.raises(CheckpointError, match="'relu2' is a GELU"):
        load(saved, other)


def test_a_checkpoint_without_model_name_needs_the_model(saved):
    with pytest.raises(CheckpointError, match="needs the float model"):
        load(saved)
    with pytest.raises(CheckpointError, match="pass the float model"):
        lab_load(saved)


def test_the_float_model_may_come_from_a_factory(saved, small_net, batches):
    calls = []

    def build() -> nn.Module:
        calls.append(1)
        return small_net

    loaded = load(saved, build)
    assert calls == [1] and torch.equal(_outputs(loaded, batches), _outputs(load(saved, small_net), batches))
    with pytest.raises(CheckpointError, match="returned a str"):
        load(saved, lambda: "not a model")


def test_unwritable_destinations(small_net, batches, tmp_path):
    qmodel = _quantize(small_net, {"w_bits": 4}, batches)
    (tmp_path / "file.txt").write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write"):
        save(qmodel, tmp_path / "file.txt" / "sub")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("keep me")
    with pytest.raises(OutputError, match="not a postquant checkpoint"):
        save(qmodel, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.md").read_text() == "keep me"


# --------------------------------------------------------------------------------------------- ResNet-20


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", [{"w_bits": 4}, {"method": "squant", "w_bits": 3, "a_bits": 8}], ids=["rtn-w4", "squant-w3a8"]
)
def test_resnet20_round_trip_from_the_zoo_name(resnet20, tmp_path, recipe):
    qmodel = postquant.quantize(resnet20.model, recipe, example_inputs=resnet20.example_inputs)
    save(qmodel, tmp_path / "ckpt", model_name=resnet20.name)
    loaded = lab_load(tmp_path / "ckpt")  # builds the float model from the zoo
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_outputs(loaded, [x]), _outputs(qmodel, [x]))
    assert postquant.result(loaded).model_name == "resnet20-cifar10"


@pytest.mark.slow
def test_resnet20_w4_checkpoint_is_at_most_a_seventh_of_fp32(resnet20, tmp_path):
    qmodel = postquant.quantize(resnet20.model, {"w_bits": 4}, example_inputs=resnet20.example_inputs)
    size = checkpoint_size(save(qmodel, tmp_path / "ckpt", model_name=resnet20.name))
    fp32 = float_size(resnet20.model)
    assert fp32 > 1_000_000
    assert size <= fp32 / 7, f"W4 checkpoint {size} bytes vs FP32 {fp32} bytes"


def test_a_layer_used_at_two_places_is_saved_once_and_loaded_shared(tmp_path):
    from tests.test_api import SharedLinear

    torch.manual_seed(0)
    model, x = SharedLinear().eval(), torch.randn(8, 8)
    qmodel = postquant.quantize(model, {"w_bits": 3, "a_bits": 8}, calib=[x])
    save(qmodel, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", SharedLinear())
    assert loaded.b is loaded.a and torch.equal(_outputs(loaded, [x]), _outputs(qmodel, [x]))
    unshared = SharedLinear()
    unshared.b = nn.Linear(8, 8)
    with pytest.raises(CheckpointError, match="same module"):
        load(tmp_path / "ckpt", unshared)


FACTORY_CALLS: list[str] = []


def _factory_calls() -> list[str]:
    """`FACTORY_CALLS` of this module as imported by name (pytest may have imported this file under another)."""
    import importlib

    return importlib.import_module("tests.io.test_checkpoint").FACTORY_CALLS


def recording_factory() -> nn.Module:
    """A `module:factory` a manifest may name: records that it ran (loading must not run it untrusted)."""
    from tests.io.conftest import make_small_net

    FACTORY_CALLS.append("called")
    return make_small_net()


def _name_model(saved, name: str) -> None:
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["model_name"] = name
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["tests.io.test_checkpoint:recording_factory", "os:abort"])
def test_loading_never_runs_code_a_manifest_names(saved, name):
    _name_model(saved, name)
    _factory_calls().clear()
    with pytest.raises(CheckpointError, match="needs the float model"):
        load(saved)  # the library never builds a model a file names
    with pytest.raises(CheckpointError, match="trust_code=True") as info:
        lab_load(saved)
    assert "not a built-in zoo model" in str(info.value) and _factory_calls() == []


def test_a_named_factory_runs_with_trust_code_or_is_replaced_by_the_callers_model(saved, small_net):
    _name_model(saved, "tests.io.test_checkpoint:recording_factory")
    _factory_calls().clear()
    lab_load(saved, small_net)
    assert _factory_calls() == []
    loaded = lab_load(saved, trust_code=True)
    assert _factory_calls() == ["called"] and quantized_layers(loaded)


@pytest.mark.parametrize(
    "files",
    [
        {MANIFEST_FILE: '{"my": "project manifest"}'},
        {MANIFEST_FILE: "not json"},
        {TENSORS_FILE: "my own tensors"},
        {MANIFEST_FILE: '{"format_version": 1}', TENSORS_FILE: "x"},
    ],
    ids=["foreign-manifest", "unparsable-manifest", "tensors-only", "manifest-without-postquant-version"],
)
def test_save_never_replaces_a_directory_that_is_not_a_checkpoint(small_net, batches, tmp_path, files):
    qmodel = _quantize(small_net, {"w_bits": 4}, batches)
    target = tmp_path / "mine"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    with pytest.raises(OutputError, match="not a postquant checkpoint"):
        save(qmodel, target)
    assert {p.name: p.read_text() for p in target.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left


def test_save_into_an_empty_directory(small_net, batches, tmp_path):
    (tmp_path / "empty").mkdir()
    save(_quantize(small_net, {"w_bits": 4}, batches), tmp_path / "empty")
    assert load(tmp_path / "empty", small_net).conv2.bits == 4


def test_saving_the_same_model_twice_gives_the_same_bytes(small_net, batches, tmp_path):
    qmodel = _quantize(small_net, {"w_bits": 4, "a_bits": 8}, batches)
    files = []
    for i in range(4):  # safetensors wrote its metadata map in a random order
        save(qmodel, tmp_path / f"ckpt{i}")
        files.append({p.name: p.read_bytes() for p in (tmp_path / f"ckpt{i}").iterdir()})
    assert all(f == files[0] for f in files[1:])
    assert torch.equal(_outputs(load(tmp_path / "ckpt3", small_net), batches), _outputs(qmodel, batches))


def _drop(key):
    return lambda m: m["layers"]["conv2"].pop(key)


TAMPERINGS = {
    "layer-without-bits": _drop("bits"),
    "layer-without-grid": _drop("grid"),
    "weight-shape-text": lambda m: m["layers"]["conv2"].update(weight_shape="abc"),
    "layers-a-list": lambda m: m.update(layers=[1, 2]),
    "architecture-a-list": lambda m: m.update(architecture=[]),
    "architecture-without-identity": lambda m: m["architecture"].pop("identity"),
    "alias-to-nothing": lambda m: m.update(aliases={"fc.bias": "nowhere"}),
    "act-bits-text": lambda m: m["layers"]["conv2"].update(act={"bits": "x", "qmin": 0, "qmax": 1}),
    "shared-a-list": lambda m: m.update(shared=["conv1"]),
}


@pytest.mark.parametrize("tamper", list(TAMPERINGS.values()), ids=list(TAMPERINGS))
def test_a_tampered_manifest_is_a_checkpoint_error(saved, small_net, tamper):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    tamper(manifest)
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):  # not a raw KeyError/TypeError/ValueError
        load(saved, small_net)


@pytest.mark.parametrize(
    "recipe",
    [
        {"w_bits": 4, "granularity": "group", "group_size": 8, "ignore": ["conv1"]},
        {"w_bits": 3, "grid": "power", "power_exponent": 0.6},
    ],
    ids=["w4-group8", "w3-power"],
)
def test_the_file_holds_the_layers_own_packed_state_and_loads_back_into_it(
    small_net, batches, tmp_path, recipe
):
    qmodel = _quantize(small_net, recipe, batches)
    save(qmodel, tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / TENSORS_FILE))
    loaded = load(tmp_path / "ckpt", small_net)
    for name, layer in quantized_layers(qmodel).items():
        assert torch.equal(stored[f"{name}.codes"], layer.packed)  # the layer's bytes, not a repacking
        assert stored[f"{name}.grid.zero_point"].dtype == layer.grid_zero_point.dtype == torch.int8
        state, twin = layer.state_dict(), loaded.get_submodule(name).state_dict()
        assert list(twin) == list(state)
        for key, t in state.items():
            assert twin[key].dtype == t.dtype and torch.equal(twin[key], t), (name, key)
        numel = layer.codes.numel()
        assert not any(t.is_floating_point() and t.numel() >= numel for t in twin.values())  # no float weight
    assert torch.equal(_outputs(loaded, batches), _outputs(qmodel, batches))
