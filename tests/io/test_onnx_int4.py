"""ONNX export with int4 weights (opset 21), external data files, and the dynamo exporter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import postquant
from postquant.errors import OnnxMismatchError, OutputError, UnsupportedModelError
from postquant.model import quantized_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

import postquant.io.onnx.export as export_module  # noqa: E402
from postquant.io import export_onnx, verify_onnx  # noqa: E402


def _weights(path) -> dict[str, tuple[int, np.ndarray, np.ndarray | None, dict]]:
    """{layer: (ONNX data type of the codes, codes as int16, zero point as int16, DequantizeLinear attributes)}."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]).astype(np.int16) if name in inits else None

    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight_quantized"):
            name = node.input[0].removesuffix(".weight_quantized")
            attrs = {a.name: a.i for a in node.attribute}
            zp = array(node.input[2]) if len(node.input) > 2 else None
            found[name] = (inits[node.input[0]].data_type, array(node.input[0]), zp, attrs)
    return found


def _linear_net(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 48, bias=bias), nn.ReLU(),
        nn.Linear(48, 10),
    ).eval()  # fmt: skip


@pytest.mark.parametrize(
    "recipe",
    [
        {"w_bits": 4},
        {"w_bits": 4, "symmetric": True},
        {"w_bits": 3},
        {"w_bits": 4, "granularity": "tensor"},
    ],
    ids=["w4-asym", "w4-sym", "w3", "w4-tensor"],
)
def test_weight_only_4bit_layers_store_int4_and_agree_with_the_simulation(
    recipe, small_net, batches, tmp_path
):
    qmodel = postquant.quantize(small_net, recipe, calib=batches)
    path = tmp_path / "m.onnx"
    result = export_onnx(qmodel, batches[0], path, verify_batches=batches, progress=False)
    assert result["opset"] == 21 and onnx.load(str(path)).opset_import[0].version == 21
    stored = _weights(path)
    layers = quantized_layers(qmodel)
    int4 = {name for name, (dtype, *_) in stored.items() if dtype == TensorProto.INT4}
    assert int4 == {n for n, d in result["weight_dtypes"].items() if d == "int4"}
    assert result["int4_weight_layers"] == len(int4) >= 3  # conv1..fc, but for one-signed channels
    for name in int4:
        _, codes, zp, attrs = stored[name]
        layer = layers[name]
        assert np.array_equal(codes, layer.codes.numpy().astype(np.int16))  # the layer's own codes, exactly
        assert codes.min() >= -8 and codes.max() <= 7
        z = layer.grid_zero_point.reshape(-1).numpy().astype(np.int16)
        assert np.array_equal(zp.reshape(-1), -z[: zp.size])  # (q - zp) * scale == (q + Z) / S
        assert "block_size" not in attrs
    # weight-only: the same function as the simulation, up to float kernels
    assert result["sqnr_db"] > 60 and result["top1_agreement"] == 100.0


def test_groups_are_blocked_dequantize_along_the_inputs(tmp_path):
    model = _linear_net(bias=False)
    x = torch.randn(32, 4, 4, 4)
    recipe = {"w_bits": 4, "granularity": "group", "group_size": 4, "symmetric": True}
    qmodel = postquant.quantize(model, recipe, calib=x)
    path = tmp_path / "g.onnx"
    result = export_onnx(qmodel, x[:2], path, verify_batches=[x], progress=False)
    assert set(result["weight_dtypes"].values()) == {"int4"}
    stored = _weights(path)
    for name, layer in quantized_layers(qmodel).items():
        dtype, codes, _, attrs = stored[name]
        assert dtype == TensorProto.INT4 and attrs == {"axis": 1, "block_size": 4}
        oc = layer.codes.shape[0]
        assert np.array_equal(codes, layer.codes.reshape(oc, -1).numpy())  # (OC, IC*k): a conv is reshaped
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node if n.output[0] == "0.weight"] == [
        "Reshape"
    ]  # the conv's 4-d weight
    assert result["sqnr_db"] > 60 and result["float_compute_layers"] == {}


def test_w4a8_layers_keep_int8_codes_and_integer_kernels_unless_all_is_asked(small_net, batches, tmp_path):
    """onnxruntime fuses no int4 weight into QLinearConv/QGemm: by default only weight-only layers store
    int4; int4="all" stores every layer int4, and says why those layers run in float."""
    qmodel = postquant.quantize(small_net, {"w_bits": 4, "a_bits": 8, "symmetric": True}, calib=batches)
    quantized_inputs = {n for n, layer in quantized_layers(qmodel).items() if layer.act_quant is not None}
    assert quantized_inputs and quantized_inputs != set(quantized_layers(qmodel))  # conv1's input is float
    default = export_onnx(qmodel, batches[0], tmp_path / "a.onnx", verify_batches=batches, progress=False)
    for name, dtype in default["weight_dtypes"].items():
        assert dtype == ("int8" if name in quantized_inputs else "int4"), name
    assert default["ops"].get("QLinearConv", 0) >= 1 and default["ops"].get("QGemm", 0) == 1
    every = export_onnx(
        qmodel, batches[0], tmp_path / "b.onnx", verify_batches=batches, int4="all", progress=False
    )
    assert set(every["weight_dtypes"].values()) == {"int4"} and every["integer_kernels"] == 0
    assert set(every["float_compute_layers"]) == quantized_inputs
    assert all("int4" in why for why in every["float_compute_layers"].values())
    assert every["bytes"] < default["bytes"]
    assert every["top1_agreement"] == 100.0 and every["sqnr_db"] > 40


def test_the_opset_follows_the_storage(small_net, batches, tmp_path, monkeypatch):
    w8 = postquant.quantize(small_net, {"w_bits": 8}, calib=batches)
    assert export_onnx(w8, batches[0], tmp_path / "w8.onnx", progress=False)["opset"] == 17
    w4 = postquant.quantize(small_net, {"w_bits": 4, "symmetric": True}, calib=batches)
    int4 = export_onnx(w4, batches[0], tmp_path / "w4.onnx", progress=False)
    int8 = export_onnx(w4, batches[0], tmp_path / "w4-17.onnx", opset=17, progress=False)
    assert (int4["opset"], int8["opset"]) == (21, 17)
    assert set(int8["weight_dtypes"].values()) == {"int8"}
    assert export_onnx(w4, batches[0], tmp_path / "n.onnx", int4="none", progress=False)["opset"] == 17
    assert export_onnx(w8, batches[0], tmp_path / "w8-21.onnx", opset=21, progress=False)["opset"] == 21
    # the codes take half the bytes (4 bits against 8)
    assert (
        int8["bytes"] - int4["bytes"]
        >= sum(layer.codes.numel() for layer in quantized_layers(w4).values()) // 2 - 64
    )
    with pytest.raises(ValueError, match=r"int4='all' needs opset >= 21"):
        export_onnx(w4, batches[0], tmp_path / "x.onnx", opset=17, int4="all", progress=False)
    with pytest.raises(ValueError, match=r"int4 must be one of 'weight-only', 'all', 'none'"):
        export_onnx(w4, batches[0], tmp_path / "x.onnx", int4="yes", progress=False)
    # packages that cannot run int4: a clear error for an explicit opset 21, int8 storage otherwise
    monkeypatch.setattr(export_module, "int4_unsupported", lambda: "onnxruntime 1.15 (too old)")
    with pytest.raises(UnsupportedModelError, match=r"opset 21 needs int4.*too old.*opset=17"):
        export_onnx(w4, batches[0], tmp_path / "x.onnx", opset=21, progress=False)
    fallback = export_onnx(w4, batches[0], tmp_path / "f.onnx", progress=False)
    assert fallback["opset"] == 17 and set(fallback["weight_dtypes"].values()) == {"int8"}
    assert not (tmp_path / "x.onnx").exists()


def test_the_installed_packages_run_int4():
    from postquant.io.onnx.verify import int4_unsupported

    assert int4_unsupported() == ""


def test_zero_points_outside_int4_keep_int8_storage(tmp_path):
    layer = nn.Conv2d(4, 2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(2, 4, 1, 1) + 1.0)  # every weight positive: -Z < -8
    model = nn.Sequential(nn.ReLU(), layer).eval()
    x = torch.randn(8, 4, 5, 5)
    qmodel = postquant.quantize(model, {"w_bits": 4}, example_inputs=x)
    result = export_onnx(qmodel, x, tmp_path / "m.onnx", verify_batches=[x], progress=False)
    assert result["weight_dtypes"] == {"1": "int8"} and result["opset"] == 17
    assert result["max_abs_diff"] < 1e-4


# ----------------------------------------------------------------------------------------- external data


def test_forced_external_data_writes_two_files_that_load_and_verify(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 4, "a_bits": 8}, calib=batches)
    path = tmp_path / "m.onnx"
    result = export_onnx(qmodel, batches[0], path, verify_batches=batches, external_data=True, progress=False)
    data = tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert result["external_data"] == str(data)
    assert result["bytes"] == path.stat().st_size + data.stat().st_size
    bare = onnx.load(str(path), load_external_data=False)
    external = [i for i in bare.graph.initializer if i.data_location == TensorProto.EXTERNAL]
    assert external and {e.value for i in external for e in i.external_data if e.key == "location"} == {
        "m.onnx.data"
    }
    assert not [i for i in bare.graph.initializer if i.data_location != TensorProto.EXTERNAL]
    assert result["top1_agreement"] >= 99.0
    # onnxruntime reads the data file beside the model, from anywhere
    again = verify_onnx(qmodel, path, batches, progress=False)
    assert again["sqnr_db"] == result["sqnr_db"]
    onnx.checker.check_model(str(path))


def test_a_failure_while_writing_external_data_leaves_nothing(small_net, batches, tmp_path, monkeypatch):
    qmodel = postquant.quantize(small_net, {"w_bits": 4}, calib=batches)
    real = onnx.save_model

    def half_written(model, f, **kwargs):
        real(model, f, **kwargs)
        with open(f"{f}.data", "ab") as partial:  # the data file half written, then the disk fails
            partial.write(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", half_written)
    with pytest.raises(OutputError, match="No space left on device"):
        export_onnx(qmodel, batches[0], tmp_path / "m.onnx", external_data=True, progress=False)
    assert list(tmp_path.iterdir()) == []

    def interrupted(model, f, **kwargs):
        real(model, f, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(qmodel, batches[0], tmp_path / "m.onnx", external_data=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_verification_leaves_neither_file(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 4}, calib=batches)

    def interrupted():
        yield batches[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(
            qmodel, batches[0], tmp_path / "m.onnx", verify_batches=interrupted(), external_data=True,
            progress=False,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules_cover_both_files(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 4}, calib=batches)
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    data.write_bytes(b"someone else's")
    with pytest.raises(OutputError, match=r"m\.onnx\.data exists; pass overwrite=True \(CLI --overwrite\)"):
        export_onnx(qmodel, batches[0], path, external_data=True, overwrite=False, progress=False)
    assert data.read_bytes() == b"someone else's" and not path.exists()
    data.unlink()
    export_onnx(qmodel, batches[0], path, external_data=True, overwrite=False, progress=False)
    with pytest.raises(OutputError, match=r"m\.onnx and .*m\.onnx\.data exist"):
        export_onnx(qmodel, batches[0], path, external_data=True, overwrite=False, progress=False)
    with pytest.raises(OutputError, match=r"m\.onnx exists"):
        export_onnx(qmodel, batches[0], path, external_data=False, overwrite=False, progress=False)
    # replacing an external-data export by a single file removes the data file the old model used
    result = export_onnx(qmodel, batches[0], path, verify_batches=batches, progress=False)
    assert result["external_data"] is None and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    # ... and a data file the replaced model did not use is left alone
    data.write_bytes(b"unrelated")
    export_onnx(qmodel, batches[0], path, progress=False)
    assert data.read_bytes() == b"unrelated"


def test_a_rejected_external_data_graph_is_kept_as_a_directory(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 4}, calib=batches)
    with pytest.raises(OnnxMismatchError, match=r"kept at .*m\.rejected for inspection"):
        export_onnx(
            qmodel, batches[0], tmp_path / "m.onnx", verify_batches=batches, external_data=True,
            min_sqnr_db=1000, progress=False,
        )  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["m.rejected"]
    assert sorted(p.name for p in (tmp_path / "m.rejected").iterdir()) == ["m.onnx", "m.onnx.data"]
    verify_onnx(qmodel, tmp_path / "m.rejected" / "m.onnx", batches, progress=False)  # the pair runs


def test_external_data_is_chosen_above_the_threshold(small_net, batches, tmp_path, monkeypatch):
    import postquant.io.onnx.files as files

    qmodel = postquant.quantize(small_net, {"w_bits": 8}, calib=batches)
    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", 1000)  # this model's tensors exceed it
    result = export_onnx(qmodel, batches[0], tmp_path / "m.onnx", progress=False)
    assert result["external_data"] == str(tmp_path / "m.onnx.data")
    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", 10**9)
    assert export_onnx(qmodel, batches[0], tmp_path / "s.onnx", progress=False)["external_data"] is None


# ----------------------------------------------------------------------------------------- dynamo


def test_the_dynamo_exporter_gives_the_same_quantized_graph(small_net, batches, tmp_path):
    """W8A8 on the CNN: the same storage and integer kernels as the TorchScript exporter (the first dynamo
    export pays for importing onnxscript: ~6 s)."""
    pytest.importorskip("onnxscript")
    qmodel = postquant.quantize(small_net, {"w_bits": 8, "a_bits": 8}, calib=batches)
    kw = {"verify_batches": batches, "progress": False}
    dynamo = export_onnx(qmodel, batches[0], tmp_path / "d.onnx", exporter="dynamo", **kw)
    script = export_onnx(qmodel, batches[0], tmp_path / "t.onnx", **kw)
    assert dynamo["weight_dtypes"] == script["weight_dtypes"]
    assert dynamo["integer_kernels"] == script["integer_kernels"]
    assert (dynamo["opset"], script["opset"]) == (18, 17) and dynamo["integer_kernels"] >= 2
    assert dynamo["top1_agreement"] == 100.0 and dynamo["sqnr_db"] > 40
    with pytest.raises(UnsupportedModelError, match=r"exporter='dynamo' writes opset 18 or more, not 17"):
        export_onnx(qmodel, batches[0], tmp_path / "x.onnx", exporter="dynamo", opset=17, progress=False)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_a_transformer_encoder_with_int4_weights(granularity, tmp_path):
    """Its TorchScript graph (opset 20: attention, LayerNorm, Softmax...) converts to opset 21."""
    x = torch.randn(8, 10, 32)
    recipe = {"w_bits": 4, "symmetric": True, "granularity": granularity, "group_size": 16}
    qmodel = postquant.quantize(_encoder(), recipe, calib=x)
    result = export_onnx(qmodel, x[:2], tmp_path / "e.onnx", verify_batches=[x], progress=False)
    assert result["opset"] == 21 and result["int4_weight_layers"] == 12 and result["sqnr_db"] > 60
    blocks = {a.get("block_size") for *_, a in _weights(tmp_path / "e.onnx").values()}
    assert blocks == ({16} if granularity == "group" else {None})


def test_the_dynamo_exporter_on_a_tiny_transformer(tmp_path):
    pytest.importorskip("onnxscript")
    x = torch.randn(8, 10, 32)
    qmodel = postquant.quantize(_encoder(), {"w_bits": 4, "symmetric": True}, calib=x)
    result = export_onnx(
        qmodel, x[:2], tmp_path / "e.onnx", verify_batches=[x], exporter="dynamo", progress=False
    )
    assert result["int4_weight_layers"] == 12 and result["sqnr_db"] > 60


def test_a_file_that_appears_during_the_export_is_not_replaced(small_net, batches, tmp_path):
    qmodel = postquant.quantize(small_net, {"w_bits": 4}, calib=batches)
    path = tmp_path / "m.onnx"

    def someone_writes_the_path():
        path.write_text("theirs")
        yield from batches

    with pytest.raises(OutputError, match=r"m\.onnx exists"):
        export_onnx(
            qmodel,
            batches[0],
            path,
            verify_batches=someone_writes_the_path(),
            overwrite=False,
            progress=False,
        )
    assert path.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.slow
def test_a_causal_lm_with_int4_groups_converts_to_opset_21(tmp_path):
    """The TorchScript graph (opset 20) of a Llama converts to opset 21 and carries int4 blocks."""
    pytest.importorskip("transformers")
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(layers=2)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    calib = [
        {"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long)} for i in (0, 4)
    ]
    recipe = {"w_bits": 4, "granularity": "group", "group_size": 16, "symmetric": True}
    qmodel = postquant.quantize(model, recipe, calib=calib)
    result = export_onnx(qmodel, calib[0], tmp_path / "lm.onnx", verify_batches=calib, progress=False)
    assert result["opset"] == 21 and result["int4_weight_layers"] == len(quantized_layers(qmodel)) > 8
    assert result["sqnr_db"] > 60
    attrs = {name: a for name, (_, _, _, a) in _weights(tmp_path / "lm.onnx").items()}
    assert all(a == {"axis": 1, "block_size": 16} for a in attrs.values())
