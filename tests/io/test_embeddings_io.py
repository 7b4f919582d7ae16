"""Quantized embedding tables saved, loaded and exported: bit-exact checkpoints, ONNX Gather on a
DequantizeLinear verified in onnxruntime, and a clear refusal from the formats that cannot hold them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import postquant
from postquant.errors import ExportError, UnsupportedModelError
from postquant.io import checkpoint_size, export_compressed_tensors, export_gguf, export_onnx, load, save
from postquant.model import quantized_embeddings
from tests.conftest import make_tiny_llama

VOCAB, DIM = 300, 64


class Lookup(nn.Module):
    """Mostly table: word and position embeddings, a LayerNorm and one small Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.positions = nn.Embedding(32, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.out(self.norm(self.words(ids) + self.positions(positions)))


def _lookup() -> Lookup:
    torch.manual_seed(0)
    return Lookup().eval()


def _ids(seed: int, batch: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


RECIPES = {
    "emb8-row": {"bits": 8},
    "emb4-row": {"bits": 4},
    "emb4-g16": {"bits": 4, "group_size": 16},
    "emb3-sym": {"bits": 3, "symmetric": True},
}


def _quantize(embeddings: dict) -> nn.Module:
    recipe = {"method": "rtn", "w_bits": 4, "symmetric": True, "embeddings": embeddings}
    return postquant.quantize(_lookup(), recipe, example_inputs=_ids(0))


@pytest.mark.parametrize("embeddings", RECIPES.values(), ids=RECIPES.keys())
def test_checkpoint_round_trip_is_bit_exact(embeddings, tmp_path):
    qmodel = _quantize(embeddings)
    save(qmodel, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert set(manifest["embeddings"]) == {"words", "positions"}
    loaded = load(tmp_path / "ck", _lookup())
    assert set(quantized_embeddings(loaded)) == {"words", "positions"}
    for key, t in qmodel.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
    ids = _ids(2)
    torch.testing.assert_close(loaded(ids), qmodel(ids), rtol=0, atol=0)
    assert loaded.words.padding_idx == 0
    assert postquant.result(loaded).recipe.embeddings == postquant.result(qmodel).recipe.embeddings


def test_a_checkpoint_without_quantized_tables_has_no_embeddings_entry(tmp_path):
    qmodel = postquant.quantize(_lookup(), {"method": "rtn"}, example_inputs=_ids(0))
    save(qmodel, tmp_path / "ck")
    assert "embeddings" not in json.loads((tmp_path / "ck" / "manifest.json").read_text())


def test_a_quantized_table_is_smaller_in_the_checkpoint(tmp_path):
    float_ck = save(postquant.quantize(_lookup(), {"method": "rtn"}, example_inputs=_ids(0)), tmp_path / "f")
    quant_ck = save(_quantize({"bits": 4}), tmp_path / "q")
    assert checkpoint_size(quant_ck) < 0.3 * checkpoint_size(float_ck)


onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    "embeddings, int4, dtype, opset",
    [
        ({"bits": 8}, "weight-only", "uint8", 21),  # 21 for the W4 Linear
        ({"bits": 4}, "weight-only", "int4", 21),
        ({"bits": 4, "group_size": 16}, "weight-only", "int4", 21),
        ({"bits": 4, "group_size": 16}, "none", "int8", 17),
        ({"bits": 3, "symmetric": True}, "weight-only", "int4", 21),
    ],
    ids=["emb8-row", "emb4-row", "emb4-g16", "emb4-g16-int8", "emb3-sym"],
)
def test_onnx_gathers_from_a_dequantized_table_and_matches_the_simulation(
    embeddings, int4, dtype, opset, tmp_path
):
    qmodel = _quantize(embeddings)
    batches = [_ids(s) for s in range(3, 6)]
    info = export_onnx(
        qmodel, _ids(0), tmp_path / "m.onnx", verify_batches=batches, int4=int4, progress=False
    )
    assert info["opset"] == opset
    assert info["embedding_dtypes"] == {"words": dtype, "positions": dtype}
    assert info["sqnr_db"] > 100  # what verify_onnx already required (it raises below its floor)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    names = {i.name for i in graph.initializer}
    assert "words.weight" not in names and "words.weight_quantized" in names  # no float table left
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "words.weight"]
    producers = [n for n in graph.node if "words.weight" in n.output]
    assert len(gathers) == 1 and producers[0].op_type in ("DequantizeLinear", "Reshape")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = _ids(9)
    (out,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        want = qmodel(ids).numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def test_quantized_tables_shrink_the_onnx_file(tmp_path):
    float_bytes = export_onnx(_lookup(), _ids(0), tmp_path / "f.onnx", progress=False)["bytes"]
    w4 = postquant.quantize(_lookup(), {"method": "rtn", "w_bits": 4}, example_inputs=_ids(0))
    w4_bytes = export_onnx(w4, _ids(0), tmp_path / "w4.onnx", progress=False)["bytes"]
    both = export_onnx(_quantize({"bits": 4}), _ids(0), tmp_path / "e4.onnx", progress=False)["bytes"]
    assert w4_bytes > 0.8 * float_bytes  # the tables are most of this model
    assert both < float_bytes / 5  # 4-bit codes and one float32 scale and zero point per row of 64 values


def test_compressed_tensors_and_gguf_refuse_quantized_tables(tmp_path):
    pytest.importorskip("transformers")
    llama = make_tiny_llama(layers=1)
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    recipe = {"method": "rtn", "grid": "gguf-q8_0", "embeddings": {"bits": 8, "group_size": 32}}
    qmodel = postquant.quantize(llama, recipe, example_inputs=tokens)
    assert set(quantized_embeddings(qmodel)) == {"model.embed_tokens"}
    with pytest.raises(ExportError, match=r"embedding 'model\.embed_tokens' is quantized"):
        export_compressed_tensors(qmodel, tmp_path / "ct")
    pytest.importorskip("gguf")
    with pytest.raises(ExportError, match=r"embedding 'model\.embed_tokens' is quantized"):
        export_gguf(qmodel, tmp_path / "m.gguf")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "m.gguf").exists()


def test_a_tied_llama_is_refused(tmp_path):
    pytest.importorskip("transformers")
    llama = make_tiny_llama(layers=1, tied=True)
    with pytest.raises(UnsupportedModelError, match=r"lm_head\.weight"):
        postquant.quantize(llama, {"method": "rtn", "embeddings": {"bits": 8}})
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
