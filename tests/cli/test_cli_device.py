"""`postquant quantize --device`: the model and its data go to the device; CUDA asked for and absent is a
clear error (exit 2) before any work."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from postquant.errors import DeviceError
from postquant_lab.cli import app, resolve_device
from tests.conftest import require_shared

runner = CliRunner()


def test_device_names_resolve_and_auto_prefers_cuda():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "meta", ""):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="CUDA"):
        resolve_device("cuda:99")  # no such GPU, or no CUDA at all


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error_with_exit_code_2(spec, tmp_path):
    result = runner.invoke(
        app, ["quantize", "resnet20-cifar10", "--device", spec, "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in " ".join(result.output.split())
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("method", ["learned", "qdrop"])
def test_learned_rounding_runs_on_the_chosen_device(method, device, tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    if device.type == "cpu" and method == "qdrop":
        pytest.skip("qdrop on the CPU: tests/test_device.py covers it at a fraction of this cost")
    args = [
        "quantize",
        "resnet20-cifar10",
        "--method",
        method,
        "--w-bits",
        "4",
        "--a-bits",
        "4",
        "--iters",
        "2",
    ]
    args += [
        "--calib-size",
        "32",
        "--limit",
        "64",
        "--device",
        str(device),
        "--json",
        str(tmp_path / "r.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n_eval"] == 64 and r["quantized"] > 20.0  # a working W4A4 model (FP about 92 %), not noise
