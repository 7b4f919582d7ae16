"""Full-integer ONNX graphs (``export_onnx(full_integer=True)``): onnxruntime fuses the residual adds and the
global pooling into integer kernels, and the graph still follows the PyTorch simulation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import postquant
from tests.conftest import randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from postquant.io import export_onnx  # noqa: E402


class ResidualNet(nn.Module):
    """A stem conv, a residual block, a downsampling block with a parameter-free shortcut (strided slice and
    zero channel padding, as CIFAR ResNets), global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b1 = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.a2(self.a1(x)) + x)
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))  # (N, 16, H/2, W/2)
        x = F.relu(self.b2(self.b1(x)) + shortcut)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture
def residual_net() -> ResidualNet:
    torch.manual_seed(0)
    model = ResidualNet()
    randomize_bn(*(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)))
    return model.eval()


@pytest.fixture
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 16, 16, generator=g) for _ in range(4)]


def _unfused_outputs(path, x: np.ndarray) -> np.ndarray:
    """The graph's outputs with onnxruntime's optimizations off: its Q/DQ nodes and float ops as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[0]


@pytest.mark.parametrize("w_bits", [8, 7], ids=["w8a8-uint8-weights", "w7a8-int8-weights"])
def test_residual_adds_and_pooling_run_as_integer_kernels(w_bits, residual_net, images, tmp_path):
    recipe = {"w_bits": w_bits, "a_bits": 8, "symmetric": True}
    qmodel = postquant.quantize(residual_net, recipe, calib=images[:2])
    path = tmp_path / "full.onnx"
    result = export_onnx(
        qmodel,
        images[0],
        path,
        full_integer=True,
        calib_batches=images[:2],
        verify_batches=images[2:],
        progress=False,
    )
    ops = result["ops"]
    # every conv but the stem (its input stays float, as in the simulation) is a QLinearConv; both residual
    # adds and the pooling are integer kernels; nothing else computes in float
    assert ops.get("QLinearConv") == 4 and ops.get("QLinearAdd") == 2
    assert ops.get("QLinearGlobalAveragePool") == 1 and ops.get("QGemm") == 1
    assert ops.get("Add", 0) == 0 and ops.get("GlobalAveragePool", 0) == 0 and ops.get("Relu", 0) == 0
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1
    assert result["full_integer"]["joins"] == 3
    assert result["top1_agreement"] >= 99.0 and result["sqnr_db"] > 25
    # the integer kernels compute what the QDQ graph says (no saturation, whatever the CPU)
    x = images[3].numpy()
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    unfused = _unfused_outputs(path, x)
    noise = float(np.square(fused - unfused).sum())
    assert 10 * np.log10(float(np.square(unfused).sum()) / max(noise, 1e-30)) > 35
    assert (fused.argmax(1) == unfused.argmax(1)).mean() >= 0.96


def test_without_full_integer_the_adds_stay_float(residual_net, images, tmp_path):
    qmodel = postquant.quantize(residual_net, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=images[:2])
    result = export_onnx(qmodel, images[0], tmp_path / "qdq.onnx", progress=False)
    assert result["ops"].get("Add") == 2 and result["ops"].get("QLinearAdd", 0) == 0
    assert "full_integer" not in result


def test_shortcut_copies_keep_the_quantizer_they_copy(residual_net, images, tmp_path):
    """The strided slice and zero padding of the shortcut move values of a quantized tensor: their pairs have
    its scale and zero point (exact), and only the conv outputs before the adds and the pooled feature map
    get calibrated ranges."""
    qmodel = postquant.quantize(residual_net, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=images[:2])
    path = tmp_path / "full.onnx"
    result = export_onnx(qmodel, images[0], path, full_integer=True, calib_batches=images[:2], progress=False)
    graph = onnx.load(str(path)).graph
    pad = next(n for n in graph.node if n.op_type == "Pad")
    source_dq = next(
        n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in _inputs_of(graph, pad)
    )
    q_after = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pad.output[0])
    assert list(q_after.input[1:]) == list(source_dq.input[1:])
    # calibrated: the two conv outputs before the adds, the last add's output (it feeds the pooling)
    assert result["full_integer"]["calibrated"] == 3


def _inputs_of(graph, node) -> set[str]:
    """The tensors upstream of `node` through Slice/Pad nodes (its data inputs)."""
    seen, todo = set(), [node.input[0]]
    while todo:
        t = todo.pop()
        seen.add(t)
        for n in graph.node:
            if t in n.output and n.op_type in ("Slice", "Pad"):
                todo.append(n.input[0])
    return seen


def test_full_integer_without_calibration_batches_warns(residual_net, images, tmp_path, caplog):
    qmodel = postquant.quantize(residual_net, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=images[:2])
    with caplog.at_level(logging.WARNING, logger="postquant.io.onnx.export"):
        result = export_onnx(qmodel, images[0], tmp_path / "m.onnx", full_integer=True, progress=False)
    assert "calib_batches" in caplog.text
    assert result["ops"].get("QLinearAdd") == 2
    with pytest.raises(ValueError, match="at least one calibration batch"):
        export_onnx(
            qmodel, images[0], tmp_path / "n.onnx", full_integer=True, calib_batches=[], progress=False
        )


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_adds_without_a_conv_stay_float(tmp_path):
    """Only CNN residual adds are joined: a residual stream of Linears (as in transformers, whose adds also
    take attention masks) is left as the simulation computes it."""
    torch.manual_seed(0)
    model = ResidualMLP().eval()
    data = [torch.randn(32, 16) for _ in range(3)]
    qmodel = postquant.quantize(model, {"w_bits": 8, "a_bits": 8, "symmetric": True}, calib=data[:2])
    result = export_onnx(
        qmodel,
        data[0],
        tmp_path / "m.onnx",
        full_integer=True,
        calib_batches=data[:2],
        verify_batches=data[2:],
    )
    assert result["full_integer"]["joins"] == 0 and result["ops"].get("QLinearAdd", 0) == 0
    assert result["sqnr_db"] > 30
