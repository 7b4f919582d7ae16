"""Full-integer ONNX graphs of models quantized with integer residuals (recipe ``a_residual``): the graph's
new quantization points are the simulation's, so onnxruntime computes the simulated function."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import postquant
from postquant.errors import ExportError
from postquant.nn.act import ActQuantizer
from postquant.nn.residual import ResidualQuant, install_points, residual_points
from tests.nn.test_residual import PlainNet, ResidualNet, make

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from postquant.io import export_onnx  # noqa: E402
from tests.io.test_onnx_integer import ResidualMLP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 16, 16, generator=g) for _ in range(4)]


def recipe(w_bits: int = 8, residual: bool = True) -> dict:
    return {"w_bits": w_bits, "a_bits": 8, "symmetric": True, "a_residual": residual}


def outputs(path, x: np.ndarray, optimize: bool) -> np.ndarray:
    """onnxruntime's outputs: fused integer kernels, or the Q/DQ nodes and float ops as written."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.square(ref).sum() / max(np.square(out - ref).sum(), 1e-30)))


@pytest.mark.parametrize("w_bits", [8, 7], ids=["w8a8", "w7a8"])
@pytest.mark.parametrize("inplace", [False, True], ids=["add", "inplace-add"])
def test_the_full_integer_graph_computes_the_simulation(w_bits, inplace, batches, tmp_path):
    qmodel = postquant.quantize(make(ResidualNet, inplace=inplace), recipe(w_bits), calib=batches[:2])
    path = tmp_path / "full.onnx"
    result = export_onnx(
        qmodel, batches[0], path, full_integer=True, verify_batches=batches[2:], progress=False
    )
    ops = result["ops"]
    assert (
        ops.get("QLinearAdd") == 2
        and ops.get("QLinearGlobalAveragePool") == 1
        and ops.get("QLinearConv") == 4
    )
    # the three new points (two conv outputs, the pooled map) carry the model's scales: none measured here
    assert result["full_integer"]["calibrated"] == 3
    assert result["top1_agreement"] == 100.0 and result["sqnr_db"] > 45
    x = batches[3].numpy()
    with torch.no_grad():
        ref = qmodel(batches[3]).numpy()
    # the Q/DQ graph as written is the simulation up to float summation order
    assert sqnr(ref, outputs(path, x, optimize=False)) > 60
    assert (outputs(path, x, optimize=True).argmax(1) == ref.argmax(1)).all()


def test_the_points_agree_better_than_calibrating_in_onnxruntime(batches, tmp_path):
    """Without the option the new points are extra roundings the simulation lacks: measurably farther."""
    model = make(ResidualNet)
    ours = postquant.quantize(model, recipe(), calib=batches[:2])
    plain = postquant.quantize(model, recipe(residual=False), calib=batches[:2])
    a = export_onnx(ours, batches[0], tmp_path / "a.onnx", full_integer=True, progress=False)
    b = export_onnx(
        plain, batches[0], tmp_path / "b.onnx", full_integer=True, calib_batches=batches[:2], progress=False
    )
    x = batches[3].numpy()
    with torch.no_grad():
        ref_a, ref_b = ours(batches[3]).numpy(), plain(batches[3]).numpy()
    assert sqnr(ref_a, outputs(a["path"], x, False)) > sqnr(ref_b, outputs(b["path"], x, False)) + 10


def test_a_saved_and_loaded_model_exports_the_same_graph(batches, tmp_path):
    model = make(ResidualNet)
    qmodel = postquant.quantize(model, recipe(), calib=batches[:2])
    loaded = postquant.load(postquant.save(qmodel, tmp_path / "ckpt"), model)
    assert type(loaded) is ResidualNet
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[3]), qmodel(batches[3]), rtol=0, atol=0)
    export_onnx(qmodel, batches[0], tmp_path / "a.onnx", full_integer=True, progress=False)
    export_onnx(loaded, batches[0], tmp_path / "b.onnx", full_integer=True, progress=False)
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert a.graph.node == b.graph.node and a.graph.initializer == b.graph.initializer


def test_a_model_without_adds_exports_its_pool_point(batches, tmp_path):
    qmodel = postquant.quantize(make(PlainNet), recipe(), calib=batches[:2])
    result = export_onnx(
        qmodel, batches[0], tmp_path / "m.onnx", full_integer=True, verify_batches=batches[2:], progress=False
    )
    assert result["full_integer"]["joins"] == 1 and result["ops"].get("QLinearGlobalAveragePool") == 1
    assert result["top1_agreement"] == 100.0 and result["sqnr_db"] > 45


def test_a_qdq_graph_of_a_model_with_points_is_refused(batches, tmp_path):
    qmodel = postquant.quantize(make(ResidualNet), recipe(), calib=batches[:2])
    with pytest.raises(ExportError, match="full_integer=True"):
        export_onnx(qmodel, batches[0], tmp_path / "m.onnx", progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_points_the_graph_lacks_or_needs_are_refused(batches, tmp_path):
    qmodel = postquant.quantize(make(ResidualNet), recipe(), calib=batches[:2])
    points = residual_points(qmodel)
    extra = copy.deepcopy(qmodel)  # a point at a second global pooling the graph does not have
    install_points(
        extra, ResidualQuant(points.output_points(), {**points.pool_points(), 1: ActQuantizer(8, 0, 1)})
    )
    with pytest.raises(ExportError, match="global pooling 1"):
        export_onnx(extra, batches[0], tmp_path / "m.onnx", full_integer=True, progress=False)
    missing = copy.deepcopy(qmodel)  # no point on b2's output: the graph would quantize it anyway
    outputs_ = {k: q for k, q in points.output_points().items() if k != "b2.0"}
    install_points(missing, ResidualQuant(outputs_, points.pool_points()))
    with pytest.raises(ExportError, match=r"b2\.0"):
        export_onnx(missing, batches[0], tmp_path / "m.onnx", full_integer=True, progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_adds_of_linears_get_no_points(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(32, 16) for _ in range(3)]
    qmodel = postquant.quantize(ResidualMLP().eval(), recipe(), calib=data[:2])
    points = residual_points(qmodel)
    assert not points.output_points() and not points.pool_points()
    result = export_onnx(
        qmodel, data[0], tmp_path / "m.onnx", full_integer=True, verify_batches=data[2:], progress=False
    )
    assert result["full_integer"]["joins"] == 0 and result["sqnr_db"] > 30
