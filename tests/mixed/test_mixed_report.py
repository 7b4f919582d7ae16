"""The allocation shown to users: rich table, bits.png, allocation.json, and the CLI options."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from rich.console import Console
from typer.testing import CliRunner

import postquant
from postquant.mixed.report import allocation_table, write_allocation
from postquant.model import quantized_layers
from postquant_lab import load
from postquant_lab.cli import app
from tests.conftest import require_shared

runner = CliRunner()


def test_table_plot_and_json(tiny_cnn, images, tmp_path):
    recipe = {"overrides": {"fc": {"w_bits": 8}}, "mixed": {"w_bits_budget": 6.0}}
    result = postquant.result(postquant.quantize(tiny_cnn, recipe, calib=images)).mixed
    json_path, png = write_allocation(result, tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    data = json.loads(json_path.read_text())
    assert {row["name"]: row["bits"] for row in data["layers"]} == result.bits
    assert data["avg_w_bits"] == pytest.approx(result.avg_w_bits) and data["importance"] == "loss"
    console = Console(record=True, width=120)
    console.print(allocation_table(result))
    text = console.export_text()
    assert "8 (fixed)" in text and "conv2" in text and f"{result.avg_w_bits:.3f} average weight bits" in text


@pytest.fixture
def tiny_factory(tmp_path, monkeypatch):
    """An importable module ``pq_mixed_models`` whose factory builds a small MLP on (3, 4, 4) inputs."""
    (tmp_path / "pq_mixed_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def build():
                torch.manual_seed(0)
                model = nn.Sequential(
                    nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
                )
                with torch.no_grad():
                    model[5].weight[0, 0] = 1.0  # one outlier: a per-tensor grid makes this layer sensitive
                model.input_shape = (3, 4, 4)
                return model.eval()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pq_mixed_models:build"
    sys.modules.pop("pq_mixed_models", None)


def test_cli_budget_writes_plot_allocation_and_json(tiny_factory, tmp_path):
    out = tmp_path / "run"
    args = ["quantize", tiny_factory, "--method", "squant", "--granularity", "tensor", "--w-bits-budget", "3"]
    args += ["--importance", "datafree", "--bit-choices", "2,3,4,8", "--out", str(out)]
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["avg_w_bits"] <= 3.0 and r["size_bytes"] > 0 and r["w_bits"] is None
    allocation = json.loads((out / "allocation.json").read_text())
    bits = {row["name"]: row["bits"] for row in allocation["layers"]}
    assert set(bits.values()) <= {2, 3, 4, 8} and len(set(bits.values())) > 1
    assert bits["5"] == max(bits.values())  # the layer with the outlier
    assert (out / "bits.png").stat().st_size > 0
    loaded = load(out / "checkpoint", trust_code=True)  # names its own module:factory
    assert {n: layer.bits for n, layer in quantized_layers(loaded).items()} == bits
    assert "average weight bits" in " ".join(result.output.split())


def test_cli_size_budget(tiny_factory, tmp_path):
    args = ["quantize", tiny_factory, "--size-budget", "5KB", "--importance", "datafree"]
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["size_bytes"] <= 5_000


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--importance", "loss"], "need a budget"),
        (["--w-bits-budget", "3", "--bit-choices", "2,x"], "integers separated by commas"),
        (["--w-bits-budget", "3", "--bit-choices", "2,9"], "from 2 to 8"),
        (["--w-bits-budget", "1.5", "--importance", "datafree"], "feasible range is 2 to 8"),
        (["--size-budget", "lots"], "cannot read the size"),
        (
            ["--checkpoint-dir", "ckpt"],
            "--checkpoint-dir saves the finished work of learned rounding or of a",
        ),
    ],
    ids=["no-budget", "bad-list", "nine", "infeasible", "bad-size", "checkpoint-without-budget"],
)
def test_cli_errors(tiny_factory, tmp_path, extra, message):
    result = runner.invoke(app, ["quantize", tiny_factory, *extra, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r.json").exists()


def test_cli_checkpoint_dir_keeps_the_importance_for_another_budget(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    ckpt = tmp_path / "ckpt"
    args = ["quantize", "resnet20-cifar10", "--method", "rtn", "--importance", "taylor", "--limit", "50"]
    args += ["--checkpoint-dir", str(ckpt), "--json", str(tmp_path / "r.json")]
    avg = {}
    for budget in ("3", "4"):
        result = runner.invoke(app, [*args, "--w-bits-budget", budget])
        assert result.exit_code == 0, result.output
        avg[budget] = json.loads((tmp_path / "r.json").read_text())["avg_w_bits"]
    (saved,) = ckpt.glob("importance_*.json")  # one measurement, used by both budgets
    assert len(json.loads(saved.read_text())["rows"]) == 20  # every conv and the classifier of resnet20
    assert avg["3"] <= 3.0 < avg["4"] <= 4.0
