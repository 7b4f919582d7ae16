"""`postquant quantize --grid power [--power-exponent A]` (kept apart from test_cli.py to ease merging)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from postquant_lab.cli import app
from tests.conftest import require_shared

runner = CliRunner()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--grid", "lloyd"], "grid"),
        (["--grid", "power", "--power-exponent", "1.5"], "power_exponent"),
        (["--grid", "power", "--power-exponent", "0"], "power_exponent"),
        (["--power-exponent", "0.5"], "set grid: power"),
        (["--power-search", "outputs"], "set grid: power"),
        (
            ["--grid", "power", "--power-search", "activations"],
            "'weights', 'outputs'",
        ),  # click lists the choices
    ],
)
def test_bad_grid_options_are_clear_errors(args, message, tmp_path):
    result = runner.invoke(app, ["quantize", "resnet20-cifar10", *args, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r.json").exists()


def test_quantize_with_a_power_grid_saves_it(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    run = tmp_path / "run"
    args = ["quantize", "resnet20-cifar10", "--method", "squant", "--w-bits", "4", "--grid", "power"]
    result = runner.invoke(app, [*args, "--power-exponent", "0.7", "--limit", "200", "--out", str(run)])
    assert result.exit_code == 0, result.output
    r = json.loads((run / "results.json").read_text())
    assert r["quantized"] > r["fp"] - 10
    assert "grid: power" in (run / "recipe.yaml").read_text()
    manifest = json.loads((run / "checkpoint" / "manifest.json").read_text())
    assert {layer["grid"]["kind"] for layer in manifest["layers"].values()} == {"power"}


def test_output_error_search_reads_calibration_data_and_saves_the_choice(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    run = tmp_path / "run"
    args = ["quantize", "resnet20-cifar10", "--method", "rtn", "--w-bits", "4", "--grid", "power"]
    args += ["--power-search", "outputs", "--calib-size", "64", "--limit", "200", "--out", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "power_search: outputs" in (run / "recipe.yaml").read_text()
    manifest = json.loads((run / "checkpoint" / "manifest.json").read_text())
    assert {layer["grid"]["kind"] for layer in manifest["layers"].values()} == {"power"}
    assert json.loads((run / "results.json").read_text())["quantized"] > 60
