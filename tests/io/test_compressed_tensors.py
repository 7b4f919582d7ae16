"""compressed-tensors export: the layout compressed-tensors itself writes, and transformers computes the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import postquant
from postquant.errors import ExportError, ExportMismatchError, OutputError
from postquant.io import compressed_tensors as ct_export
from postquant.io import export_compressed_tensors, hf_check
from postquant.io.compressed_tensors import layer_scheme, pack_int32, transformers_route
from postquant.model import quantized_layers

transformers = pytest.importorskip("transformers")
CT_MISSING = "the compressed-tensors package is not installed (pip install compressed-tensors: the postquant[hf] extra)"

W4_GROUP = {"w_bits": 4, "granularity": "group", "group_size": 32, "ignore": ["lm_head"]}
W8_CHANNEL_SYM = {"w_bits": 8, "symmetric": True, "ignore": ["lm_head"]}
MIXED_SYM = {  # mixed precision: 4-bit groups, 8-bit down_proj, 3-bit v_proj, lm_head float
    "w_bits": 4,
    "symmetric": True,
    "granularity": "group",
    "group_size": 32,
    "ignore": ["lm_head"],
    "overrides": {"*.mlp.down_proj": {"w_bits": 8}, "*.self_attn.v_proj": {"w_bits": 3}},
}


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("compressed_tensors", reason=CT_MISSING)


def tiny_llama(seed: int = 0, tie: bool = False) -> torch.nn.Module:
    """A random two-layer Llama (vocabulary 128, hidden 64): no hub, about 0.1 M parameters."""
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def w4_group(llama) -> torch.nn.Module:
    return postquant.quantize(llama, W4_GROUP)


@pytest.fixture(scope="module")
def mixed(llama) -> torch.nn.Module:
    return postquant.quantize(llama, MIXED_SYM)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- packing


def test_pack_int32_known_words():
    codes = torch.arange(-8, 8).reshape(1, 16)  # unsigned 0..15, 8 per word, the first in the low bits
    words = pack_int32(codes, 4)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() == 0x76543210
    assert words[0, 1].item() == 0xFEDCBA98 - 2**32


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 4), cols=st.integers(1, 100), seed=st.integers(0, 2**31))
def test_pack_int32_is_compressed_tensors_packing(ct, bits, rows, cols, seed):
    from compressed_tensors.compressors.pack_quantized import helpers

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(lo, hi + 1, (rows, cols), generator=gen, dtype=torch.int8)
    ours = pack_int32(codes, bits)
    torch.testing.assert_close(ours, helpers.pack_to_int32(codes, bits), rtol=0, atol=0)
    back = helpers.unpack_from_int32(ours, bits, torch.Size([rows, cols]))
    torch.testing.assert_close(back, codes, rtol=0, atol=0)


def test_layer_tensors_equal_compressed_tensors_own_compressor(ct, w4_group):
    """Given our scale and zero point, compressed-tensors' own writer stores the same packed codes and zero points."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    for name, layer in quantized_layers(w4_group).items():
        scheme = layer_scheme(name, layer)
        ours = ct_export._layer_tensors(name, layer, scheme, torch.float32)
        theirs = PackedQuantizationCompressor.compress(
            {
                "weight": layer.weight,  # postquant's dequantized weight: quantizing it again gives the codes
                "weight_scale": ours[f"{name}.weight_scale"],
                "weight_zero_point": torch.from_numpy(
                    (-layer.grid_zero_point)
                    .reshape(ours[f"{name}.weight_scale"].shape)
                    .to(torch.int8)
                    .numpy()
                ),
            },
            QuantizationScheme.model_validate({"targets": ["Linear"], **scheme.config(["Linear"])}),
        )
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            torch.testing.assert_close(
                ours[f"{name}.{key}"], theirs[key], rtol=0, atol=0, msg=f"{name}.{key}"
            )


# ------------------------------------------------------------------------------------- export and verify


def test_w4_group_asymmetric_loads_in_transformers(ct, w4_group, ids, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "w4"
    result = export_compressed_tensors(w4_group, out, verify_inputs=ids)
    qconfig = _config(out)["quantization_config"]
    QuantizationConfig.model_validate(qconfig)  # compressed-tensors accepts it
    assert qconfig["format"] == "pack-quantized" and qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["ignore"] == ["lm_head"]
    (group,) = qconfig["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "strategy", "group_size", "symmetric")} == {
        "num_bits": 4,
        "strategy": "group",
        "group_size": 32,
        "symmetric": False,
    }
    tensors = _tensors(out)
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 128 * 4 // 32)
    assert tensors["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (64 * 4 // 32, 128 // 32)
    assert "lm_head.weight" in tensors and "model.layers.0.mlp.down_proj.weight" not in tensors
    check = result.check
    assert check is not None and check.route == "dequantize"
    assert check.rel_max_diff < 1e-5 and check.top1_agreement == 100.0
    assert result.compression > 2.5  # 4-bit Linears (3.8x), float lm_head and embeddings
    assert _siblings(tmp_path) == ["w4"]  # no temporary directory left


def test_learned_ranges_export_their_zero_points_and_load_in_transformers(ct, llama, ids, tmp_path):
    """Learned rounding that moves each group's range (step and integer zero point) exports as any grid:
    transformers computes postquant's logits."""
    learned = {"iters": 8, "batch_size": 2, "progress": False, "learn_weight_range": True}
    calib = list(torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2)).split(2))
    recipe = {**W4_GROUP, "method": "learned-fast", "learned": learned}
    qmodel = postquant.quantize(llama, recipe, calib=calib)
    start = postquant.quantize(llama, {**recipe, "learned": {**learned, "iters": 0}}, calib=calib)
    moved = [
        name
        for name, layer in quantized_layers(qmodel).items()
        if not torch.equal(layer.grid_zero_point, start.get_submodule(name).grid_zero_point)
    ]
    assert moved, postquant.result(qmodel).learned.units  # the ranges moved, zero points with them
    result = export_compressed_tensors(qmodel, tmp_path / "ranges", verify_inputs=ids)
    check = result.check
    assert check is not None and check.rel_max_diff < 1e-5 and check.top1_agreement == 100.0
    assert f"{moved[0]}.weight_zero_point" in _tensors(tmp_path / "ranges")  # packed, as transformers read it


def test_weights_in_transformers_within_one_ulp(ct, w4_group, tmp_path):
    """Every dequantized weight transformers computes is postquant's, or its float32 neighbour."""
    out = tmp_path / "w4"
    export_compressed_tensors(w4_group, out)
    consumer = hf_check._load_consumer(w4_group, out, "dequantize", torch.float32)
    same = total = 0
    for name, layer in quantized_layers(w4_group).items():
        got, want = consumer.get_submodule(name).weight.detach(), layer.weight
        ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
        assert bool(((got - want).abs() <= ulp).all()), name
        same += int((got == want).sum())
        total += want.numel()
    assert same / total > 0.5  # most are bit-identical (measured: ~9 in 10)


def test_w8_channel_symmetric_default_route(ct, llama, ids, tmp_path):
    qmodel = postquant.quantize(llama, W8_CHANNEL_SYM)
    result = export_compressed_tensors(qmodel, tmp_path / "w8", verify_inputs=[ids, {"input_ids": ids[:1]}])
    (group,) = _config(tmp_path / "w8")["quantization_config"]["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    assert group["weights"]["num_bits"] == 8
    tensors = _tensors(tmp_path / "w8")
    assert not any(k.endswith("weight_zero_point") for k in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert result.check is not None and result.check.route == "compressed"
    assert result.check.positions == 2 * 16 + 16 and result.check.rel_max_diff < 1e-5


def test_mixed_precision_config_groups(ct, mixed, ids, tmp_path):
    out = tmp_path / "mixed"
    result = export_compressed_tensors(mixed, out, verify_inputs=ids)
    groups = _config(out)["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g for g in groups.values()}
    assert sorted(by_bits) == [3, 4, 8]
    assert by_bits[8]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert by_bits[3]["targets"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert len(by_bits[4]["targets"]) == 10 and "lm_head" not in by_bits[4]["targets"]
    assert all(g["weights"]["symmetric"] and g["weights"]["group_size"] == 32 for g in groups.values())
    assert result.ignore == ["lm_head"] and result.check is not None and result.check.route == "compressed"
    # the usual way to load it: the Auto class, default settings
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.inference_mode():
        torch.testing.assert_close(
            auto(input_ids=ids).logits, mixed(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_input_quantizers_are_static_input_activations(ct, llama, ids, tmp_path):
    calib = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    qmodel = postquant.quantize(llama, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=calib)
    result = export_compressed_tensors(qmodel, tmp_path / "w8a8", verify_inputs=ids)
    groups = _config(tmp_path / "w8a8")["quantization_config"]["config_groups"].values()
    acts = [g["input_activations"] for g in groups if g["input_activations"] is not None]
    assert acts and all(a["strategy"] == "tensor" and a["num_bits"] == 8 and not a["dynamic"] for a in acts)
    tensors = _tensors(tmp_path / "w8a8")
    assert tensors["model.layers.0.mlp.up_proj.input_scale"].shape == (1,)
    assert result.check is not None and result.check.rel_max_diff < 1e-5


DYNAMIC = {"w_bits": 4, "symmetric": True, "granularity": "group", "group_size": 32, "ignore": ["lm_head"]}


@pytest.mark.parametrize("a_bits", [8, 6])
def test_dynamic_inputs_are_token_input_activations_verified_per_layer(ct, llama, ids, tmp_path, a_bits):
    recipe = {**DYNAMIC, "a_bits": a_bits, "act_ranges": "dynamic", "overrides": {}}  # every input quantized
    qmodel = postquant.quantize(llama, recipe)  # no calibration data
    result = export_compressed_tensors(qmodel, tmp_path / "dyn", verify_inputs=ids)
    groups = list(_config(tmp_path / "dyn")["quantization_config"]["config_groups"].values())
    assert len(groups) == 1 and groups[0]["targets"] == ["Linear"]
    assert groups[0]["input_activations"] == {
        "num_bits": a_bits,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "group_size": None,
        "dynamic": True,
    }
    assert not [k for k in _tensors(tmp_path / "dyn") if k.endswith(("input_scale", "input_zero_point"))]
    check = result.check
    assert check is not None and check.basis == "layer outputs" and check.rel_max_diff < 1e-5
    assert (
        check.sqnr_db > 20
    )  # the logits against postquant's own grid (absmax/127 vs 127.5): close, not equal


def test_a_consumer_that_skips_dynamic_input_quantization_is_caught(ct, llama, ids, tmp_path, monkeypatch):
    from compressed_tensors.quantization.lifecycle import forward as ct_forward

    qmodel = postquant.quantize(llama, {**DYNAMIC, "a_bits": 8, "act_ranges": "dynamic"})
    original = ct_forward.forward_quantize
    monkeypatch.setattr(
        ct_forward,
        "forward_quantize",
        lambda module, value, base_name, args: (
            value if base_name == "input" else original(module, value, base_name, args)
        ),
    )
    with pytest.raises(ExportMismatchError, match="disagrees"):
        export_compressed_tensors(qmodel, tmp_path / "dyn", verify_inputs=ids)
    assert not (tmp_path / "dyn").exists()


def test_bfloat16_model_agrees_within_its_rounding(ct, ids, tmp_path):
    """The consumer holds bfloat16 scales: weights agree to bfloat16 rounding, logits within the bf16 tolerance."""
    qmodel = postquant.quantize(tiny_llama().to(torch.bfloat16), W8_CHANNEL_SYM)
    result = export_compressed_tensors(qmodel, tmp_path / "bf16", verify_inputs=ids)
    assert _tensors(tmp_path / "bf16")["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert result.check is not None and result.check.tolerance == hf_check.TOLERANCE[torch.bfloat16]
    assert result.check.top1_agreement >= 90.0


def test_tied_embeddings_with_quantized_head_are_untied(ct, ids, tmp_path):
    qmodel = postquant.quantize(tiny_llama(tie=True), {"w_bits": 8, "symmetric": True})
    result = export_compressed_tensors(qmodel, tmp_path / "tied", verify_inputs=ids)
    assert _config(tmp_path / "tied")["tie_word_embeddings"] is False
    assert "model.embed_tokens.weight" in _tensors(tmp_path / "tied")
    assert result.check is not None and result.check.rel_max_diff < 1e-5


def test_tied_float_head_is_stored_once(ct, ids, tmp_path):
    qmodel = postquant.quantize(tiny_llama(tie=True), W4_GROUP)
    export_compressed_tensors(qmodel, tmp_path / "tied", verify_inputs=ids)
    tensors = _tensors(tmp_path / "tied")
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors


def test_source_files_are_copied(ct, w4_group, tmp_path):
    source = tmp_path / "float"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (source / name).write_text(json.dumps({"from": name}))
    (source / "model.safetensors").write_text("not copied")
    result = export_compressed_tensors(w4_group, tmp_path / "out", source=source)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((tmp_path / "out" / name).read_text()) == {"from": name}
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != b"not copied"
    assert "tokenizer.json" in result.files


# ------------------------------------------------------------------------------------------------ refusals


def test_power_grid_is_refused(llama, tmp_path):
    qmodel = postquant.quantize(llama, {"w_bits": 4, "grid": "power", "power_exponent": 0.5})
    with pytest.raises(ExportError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*power grid"):
        export_compressed_tensors(qmodel, tmp_path / "out")
    assert _siblings(tmp_path) == []


def test_non_hf_model_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    qmodel = postquant.quantize(model, {"w_bits": 4})
    with pytest.raises(ExportError, match="Hugging Face transformers model"):
        export_compressed_tensors(qmodel, tmp_path / "out")


def test_float_model_is_refused(llama, tmp_path):
    with pytest.raises(ExportError, match="no quantized layer"):
        export_compressed_tensors(llama, tmp_path / "out")


def test_existing_directory_needs_overwrite(ct, w4_group, tmp_path):
    out = tmp_path / "out"
    export_compressed_tensors(w4_group, out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(OutputError, match=r"exists.*overwrite"):
        export_compressed_tensors(w4_group, out)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    export_compressed_tensors(w4_group, out, overwrite=True)
    assert _siblings(tmp_path) == ["out"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a model directory"):
        export_compressed_tensors(w4_group, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


class _InterruptedTokenizer:
    """A `source` tokenizer whose saving is interrupted (Ctrl-C while the source files are written)."""

    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / "tokenizer.json").write_text("{")  # half written
        raise KeyboardInterrupt


def test_an_export_interrupted_while_writing_the_source_files_leaves_nothing(w4_group, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        export_compressed_tensors(w4_group, tmp_path / "out", source=_InterruptedTokenizer())
    assert _siblings(tmp_path) == []


def test_an_export_interrupted_while_writing_the_weights_leaves_nothing(w4_group, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct_export, "save_file", fail)  # fault injection: no public seam for the weights file
    with pytest.raises(KeyboardInterrupt):
        export_compressed_tensors(w4_group, tmp_path / "out")
    assert _siblings(tmp_path) == []


def test_mismatch_in_transformers_is_refused(ct, w4_group, ids, tmp_path, monkeypatch):
    real = ct_export._layer_tensors

    def wrong_scale(name, layer, scheme, dtype):
        tensors = real(name, layer, scheme, dtype)
        if name == "model.layers.1.mlp.down_proj":
            tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"] * 1.5
        return tensors

    monkeypatch.setattr(ct_export, "_layer_tensors", wrong_scale)  # fault injection: a corrupted tensor
    with pytest.raises(ExportMismatchError, match=r"disagrees.*Nothing was written") as info:
        export_compressed_tensors(w4_group, tmp_path / "out", verify_inputs=ids)
    assert info.value.metrics["rel_max_diff"] > 1e-3
    assert _siblings(tmp_path) == []


def test_asymmetric_mixed_precision_cannot_be_verified_in_transformers(ct, llama, ids, tmp_path):
    qmodel = postquant.quantize(llama, {**MIXED_SYM, "symmetric": False})
    with pytest.raises(ExportError, match=r"asymmetric.*mixed precision.*symmetric=True"):
        export_compressed_tensors(qmodel, tmp_path / "out", verify_inputs=ids)
    assert _siblings(tmp_path) == []
    result = export_compressed_tensors(qmodel, tmp_path / "out")  # written unverified (for vLLM)
    assert result.check is None and len(result.groups) == 3


def test_transformers_route():
    def group(symmetric: bool, strategy: str = "group", acts: bool = False) -> dict:
        return {
            "weights": {"symmetric": symmetric, "strategy": strategy},
            "input_activations": {"num_bits": 8} if acts else None,
        }

    assert (
        transformers_route({"config_groups": {"a": group(True), "b": group(True, acts=True)}}) == "compressed"
    )
    assert (
        transformers_route({"config_groups": {"a": group(False, "tensor"), "b": group(True)}}) == "compressed"
    )
    assert transformers_route({"config_groups": {"a": group(False)}}) == "dequantize"
    with pytest.raises(ExportError, match="input quantizers"):
        transformers_route({"config_groups": {"a": group(False, acts=True)}})


def test_one_signed_group_is_refused(llama, tmp_path):
    qmodel = postquant.quantize(llama, W4_GROUP)
    layer = quantized_layers(qmodel)["model.layers.0.mlp.up_proj"]
    layer.grid_zero_point[0] = 30.0  # a group whose weights are all positive: -Z far below -8
    with pytest.raises(ExportError, match=r"'model\.layers\.0\.mlp\.up_proj': 1 of its .* zero points"):
        export_compressed_tensors(qmodel, tmp_path / "out")


def test_a_full_disk_is_an_output_error_and_leaves_nothing(ct, w4_group, tmp_path):
    from tests.conftest import file_size_limit

    out = tmp_path / "export"
    with file_size_limit(4096), pytest.raises(OutputError, match="nothing was written"):
        export_compressed_tensors(w4_group, out)
    assert not out.exists() and _siblings(tmp_path) == []
