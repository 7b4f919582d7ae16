"""GGUF export (postquant.io.gguf_export): the file holds postquant's codes bit for bit, in llama.cpp's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import postquant
from postquant.errors import ExportError, OutputError, UnsupportedModelError
from postquant.grids.gguf import FORMATS
from postquant.io.gguf_blocks import unpack_blocks
from postquant.model import quantized_layers

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from postquant.io.gguf_export import GGUFMismatchError, export_gguf, rotary_row_order  # noqa: E402

PRESETS = ["gguf-q4_0", "gguf-q4_1", "gguf-q8_0"]
VOCAB = 96


def _llama(tied: bool = True, **changes) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: attn_k permuted with 2 heads, attn_q with 4
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        **changes,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return _llama()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _file_codes(path: Path, qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Our codes read back from the file's blocks, rows put back in Hugging Face's order."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, qmodel.config.num_hidden_layers)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name, layer in quantized_layers(qmodel).items():
        t = by_name[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        kind = layer.grid.kind
        assert t.tensor_type.name == FORMATS[kind].ggml_name
        codes = unpack_blocks(t.data, kind)[0].reshape(layer.codes.shape)
        heads = {"attn_q": qmodel.config.num_attention_heads, "attn_k": qmodel.config.num_key_value_heads}
        for part, n in heads.items():
            if f".{part}." in t.name:
                restored = torch.empty_like(codes)
                restored[rotary_row_order(codes.shape[0], n)] = codes
                codes = restored
        out[name] = codes
    return out


@pytest.mark.parametrize("method", ["rtn", "squant"])
@pytest.mark.parametrize("preset", PRESETS)
def test_the_file_holds_our_codes_bit_for_bit(llama, tokens, preset, method, tmp_path):
    recipe = {"grid": preset, "method": method, "w_range": "mse", "ignore": ["lm_head"]}
    qmodel = postquant.quantize(llama, recipe, example_inputs=tokens)
    out = tmp_path / "model.gguf"
    result = export_gguf(qmodel, out)
    assert result.verified_tensors == len(result.tensor_types) == 1 + 2 * 9 + 1  # tied: no output.weight
    assert result.file_type == f"MOSTLY_{preset[-4:].upper()}"
    for name, codes in _file_codes(out, qmodel).items():
        assert torch.equal(codes, quantized_layers(qmodel)[name].codes.to(torch.int32)), name
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_learned_rounding_codes_and_learned_scales_export_exactly(llama, tokens, tmp_path):
    recipe = {
        "grid": "gguf-q4_0",
        "method": "learned",
        "ignore": ["lm_head"],
        "learned": {"iters": 3, "batch_size": 2, "progress": False, "learn_weight_scales": True},
    }
    qmodel = postquant.quantize(llama, recipe, calib=[tokens])
    result = export_gguf(qmodel, tmp_path / "learned.gguf")
    assert result.verified_tensors == 20
    for name, codes in _file_codes(tmp_path / "learned.gguf", qmodel).items():
        assert torch.equal(codes, quantized_layers(qmodel)[name].codes.to(torch.int32)), name


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_loads_the_file_and_computes_our_logits(llama, tokens, preset, tmp_path):
    """transformers' GGUF loader dequantizes with the gguf package and undoes the q/k row permutation."""
    pytest.importorskip("accelerate")
    qmodel = postquant.quantize(llama, {"grid": preset}, example_inputs=tokens)  # lm_head too: output.weight
    export_gguf(qmodel, tmp_path / "m.gguf", float_type="f32", embedding_type="f32")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, qmodel(tokens).logits, rtol=0, atol=1e-5)


def test_rotary_order_is_the_inverse_of_transformers_reverse_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    for rows, heads in [(64, 4), (32, 2), (576, 9)]:
        w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        order = rotary_row_order(rows, heads)
        back = LlamaTensorProcessor()._reverse_permute_weights(w[order.numpy()], heads, heads)
        assert np.array_equal(back, w)


@pytest.mark.parametrize("float_type", ["f16", "f32"])
def test_a_float_model_exports_as_f16_or_f32(llama, float_type, tmp_path):
    result = export_gguf(llama, tmp_path / "f.gguf", float_type=float_type, embedding_type=float_type)
    assert result.file_type == ("MOSTLY_F16" if float_type == "f16" else "ALL_F32")
    assert result.tensor_types["blk.0.attn_q.weight"] == float_type.upper()
    assert result.tensor_types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32
    assert result.verified_tensors == 20


def test_the_embedding_as_llama_cpp_q8_0(llama, tokens, tmp_path):
    qmodel = postquant.quantize(llama, {"grid": "gguf-q4_1", "ignore": ["lm_head"]}, example_inputs=tokens)
    result = export_gguf(qmodel, tmp_path / "e.gguf", embedding_type="q8_0")
    assert result.tensor_types["token_embd.weight"] == "Q8_0" and result.verified_tensors == 20


def _source_gguf(path: Path, config, block_count: int | None = None) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny source")
    writer.add_block_count(block_count if block_count is not None else config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(1)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, config.hidden_size), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tokenizer_and_general_metadata_come_from_the_source_gguf(llama, tokens, tmp_path):
    source = _source_gguf(tmp_path / "source.gguf", llama.config)
    qmodel = postquant.quantize(llama, {"grid": "gguf-q8_0", "ignore": ["lm_head"]}, example_inputs=tokens)
    export_gguf(qmodel, tmp_path / "out.gguf", source_gguf=source)
    fields = gguf.GGUFReader(tmp_path / "out.gguf").fields
    assert fields["general.name"].contents() == "tiny source"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["llama.feed_forward_length"].contents() == 128  # hyper-parameters from the model
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_a_source_gguf_of_another_model_is_refused(llama, tmp_path):
    source = _source_gguf(tmp_path / "other.gguf", llama.config, block_count=30)
    with pytest.raises(UnsupportedModelError, match=r"another model: llama.block_count 30 \(model: 2\)"):
        export_gguf(llama, tmp_path / "out.gguf", source_gguf=source)
    assert not (tmp_path / "out.gguf").exists()


def test_a_layer_off_the_gguf_grids_is_refused_by_name(llama, tokens, tmp_path):
    recipe = {"granularity": "group", "group_size": 32, "ignore": ["lm_head"]}
    qmodel = postquant.quantize(llama, recipe, example_inputs=tokens)
    with pytest.raises(
        UnsupportedModelError, match=r"model.layers.0.self_attn.q_proj.*Q8_0, Q4_0, Q4_1.*gguf-q4_0"
    ):
        export_gguf(qmodel, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_input_quantizers_are_refused(llama, tokens, tmp_path):
    recipe = {"grid": "gguf-q8_0", "a_bits": 8, "ignore": ["lm_head"], "overrides": {}}
    qmodel = postquant.quantize(llama, recipe, calib=[tokens])
    with pytest.raises(UnsupportedModelError, match="a_bits: null"):
        export_gguf(qmodel, tmp_path / "x.gguf")


def test_dynamic_per_token_inputs_are_refused_by_name(llama, tmp_path):
    recipe = {"grid": "gguf-q4_0", "a_bits": 8, "act_ranges": "dynamic", "ignore": ["lm_head"]}
    qmodel = postquant.quantize(llama, recipe)
    with pytest.raises(ExportError, match=r"per token.*model\.layers\.0\.self_attn\.k_proj.*per block of 32"):
        export_gguf(qmodel, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_other_models_are_refused_with_the_supported_ones(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        export_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(UnsupportedModelError, match="biases"):
        export_gguf(_llama(attention_bias=True), tmp_path / "x.gguf")


def test_an_existing_file_is_kept_unless_overwrite(llama, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="overwrite"):
        export_gguf(llama, out)
    assert out.read_bytes() == b"keep me"
    export_gguf(llama, out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(OutputError, match="is a directory"):
        export_gguf(llama, tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        export_gguf(llama, tmp_path / "missing" / "m.gguf")


def test_a_file_that_reads_back_differently_is_never_left(llama, tokens, tmp_path, monkeypatch):
    import postquant.io.gguf_export as gx

    real = gx.pack_blocks

    def corrupt(*args, **kwargs):
        packed = real(*args, **kwargs)
        packed[0, -1] ^= 0x10  # one nibble of one block
        return packed

    monkeypatch.setattr(gx, "pack_blocks", corrupt)  # fault injection: one corrupted block in the file
    qmodel = postquant.quantize(llama, {"grid": "gguf-q4_0", "ignore": ["lm_head"]}, example_inputs=tokens)
    with pytest.raises(GGUFMismatchError, match="differs from postquant's weights in 1 of"):
        export_gguf(qmodel, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_nothing(llama, tmp_path, monkeypatch):
    import postquant.io.gguf_export as gx

    real = gx._write

    def interrupted(path, *args):
        real(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(gx, "_write", interrupted)  # fault injection: Ctrl-C after the file is written
    with pytest.raises(KeyboardInterrupt):
        export_gguf(llama, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_expected_type_is_checked_and_unknown_types_list_the_supported(llama, tokens, tmp_path):
    from postquant.errors import RecipeError

    recipe = {"grid": "gguf-q4_0", "ignore": ["lm_head"], "overrides": {"re:.*down_proj": {"w_bits": 8}}}
    qmodel = postquant.quantize(llama, recipe, example_inputs=tokens)
    with pytest.raises(
        RecipeError, match=r"2 layers are not Q4_0: model.layers.0.mlp.down_proj \(gguf-q8_0\)"
    ):
        export_gguf(qmodel, tmp_path / "m.gguf", expect_type="q4_0")
    with pytest.raises(RecipeError, match="supported: Q8_0, Q4_0, Q4_1"):
        export_gguf(qmodel, tmp_path / "m.gguf", expect_type="q4_k")
    result = export_gguf(qmodel, tmp_path / "m.gguf")  # mixed Q4_0 / Q8_0, as llama.cpp allows
    assert result.tensor_types["blk.0.ffn_down.weight"] == "Q8_0"
    assert result.tensor_types["blk.0.ffn_up.weight"] == "Q4_0" and result.file_type == "MOSTLY_Q4_0"


def test_bad_float_types_are_typed_errors(llama, tmp_path):
    from postquant.errors import RecipeError

    with pytest.raises(RecipeError, match="known: f32, f16, q8_0"):
        export_gguf(llama, tmp_path / "m.gguf", embedding_type="bf16")
    with pytest.raises(RecipeError, match="grid: gguf-q8_0"):
        export_gguf(llama, tmp_path / "m.gguf", float_type="q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("preset", [*PRESETS, None], ids=[*PRESETS, "float"])
def test_llama_cpp_computes_our_logits(llama, tokens, preset, tmp_path):
    """llama.cpp itself (llama-cpp-python, which compiles llama.cpp on install) runs the exported file: its logits
    are postquant's up to llama.cpp's 8-bit rounding of activations in quantized matmuls."""
    llama_cpp = pytest.importorskip("llama_cpp")
    qmodel = postquant.quantize(llama, {"grid": preset}, example_inputs=tokens) if preset else llama
    export_gguf(qmodel, tmp_path / "m.gguf", float_type="f32", embedding_type="f32")
    llm = llama_cpp.Llama(
        str(tmp_path / "m.gguf"), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False
    )
    try:
        llm.eval(tokens[0].tolist())
        theirs = np.asarray(llm.scores[: tokens.shape[1]])
    finally:
        llm.close()
    with torch.no_grad():
        ours = qmodel(tokens[:1]).logits[0].numpy()
    tolerance = (0.05 if preset else 0.002) * ours.std()  # measured: 0.022 (Q4_0) and 0.0007 (float) x std
    assert np.abs(ours - theirs).max() < tolerance
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
