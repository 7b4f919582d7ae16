from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from postquant_lab.cli import app
from tests.conftest import require_shared

runner = CliRunner()


def test_help_shows_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "postquant quantize resnet20-cifar10" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize", "resnet20-cifar10", "--w-bits", "9"], "w_bits"),
        (["quantize", "resnet20-cifar10", "--a-bits", "1"], "a_bits"),
        (["quantize", "resnet2-cifar10"], "Did you mean 'resnet20-cifar10'"),
        (["quantize", "resnet20-cifar10", "--method", "squnt"], "squant"),
        (["quantize", "resnet20-cifar10", "--data", "/no/such/dir", "--limit", "10"], "/no/such/dir"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(args, message, tmp_path):
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r.json").exists()  # no partial output


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = runner.invoke(app, ["quantize", "resnet20-cifar10", "--json", str(blocker / "sub" / "r.json")])
    assert result.exit_code == 2 and "cannot write" in result.output
    result = runner.invoke(app, ["quantize", "resnet20-cifar10", "--out", str(blocker / "dir")])
    assert result.exit_code == 2 and "cannot write" in result.output


def test_quantize_resnet20_writes_json_and_recipe(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "quantize",
            "resnet20-cifar10",
            "--method",
            "rtn",
            "--w-bits",
            "8",
            "--a-bits",
            "8",
            "--limit",
            "500",
            "--calib-size",
            "64",
            "--json",
            str(tmp_path / "r.json"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r) >= {
        "model",
        "method",
        "w_bits",
        "a_bits",
        "metric",
        "fp",
        "quantized",
        "quantize_seconds",
        "n_eval",
    }
    assert (r["model"], r["method"], r["w_bits"], r["a_bits"], r["metric"], r["n_eval"]) == (
        "resnet20-cifar10",
        "rtn",
        8,
        8,
        "top1",
        500,
    )
    assert abs(r["fp"] - r["quantized"]) < 1.5
    assert (out / "recipe.yaml").exists()


def _quantize_json(tmp_path, *args: str) -> dict:
    """Run `postquant quantize ARGS --json FILE`, check it succeeded, return the JSON."""
    result = runner.invoke(app, ["quantize", *args, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "r.json").read_text())


def test_weight_only_json_has_null_a_bits(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    r = _quantize_json(tmp_path, "resnet20-cifar10", "--method", "squant", "--w-bits", "4", "--limit", "200")
    assert r["a_bits"] is None and r["method"] == "squant"


def test_missing_eval_data_falls_back_to_fidelity(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setenv("POSTQUANT_SHARED", str(tmp_path / "nothing"))
    r = _quantize_json(tmp_path, "efficientnet-lite0", "--method", "rtn", "--w-bits", "8")
    assert r["metric"] == "top1_agreement" and r["quantized"] >= 90


def test_out_saves_checkpoint_then_export_and_report(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "quantize",
            "resnet20-cifar10",
            "--method",
            "squant",
            "--w-bits",
            "4",
            "--limit",
            "100",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads((run / "results.json").read_text())
    assert r["checkpoint_bytes"] * 7 <= r["fp32_bytes"] * 1.01
    result = runner.invoke(
        app, ["export", "onnx", str(run), "-o", str(tmp_path / "m.onnx"), "--verify", "64"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "top-1 agreement" in result.output
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "data:image/png;base64" in (run / "report.html").read_text()


def test_learned_rounding_from_the_cli_resumes_to_the_same_result(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    args = ["resnet20-cifar10", "--method", "learned", "--w-bits", "3", "--iters", "5", "--calib-size", "64"]
    args += ["--limit", "300", "--checkpoint-dir", str(tmp_path / "ckpt")]
    first = _quantize_json(tmp_path, *args)
    assert (first["method"], first["w_bits"], first["a_bits"], first["n_eval"]) == ("learned", 3, None, 300)
    assert first["quantize_seconds"] > 0 and first["quantized"] > 50
    saved = sorted((tmp_path / "ckpt").glob("*/unit_*.safetensors"))
    assert len(saved) == 11  # stem, nine basic blocks, head
    again = _quantize_json(tmp_path, *args)  # every unit comes from the checkpoint
    assert again["quantized"] == first["quantized"]


def test_learned_options_need_a_learned_method(tmp_path):
    result = runner.invoke(app, ["quantize", "resnet20-cifar10", "--method", "rtn", "--iters", "5"])
    assert result.exit_code == 2 and "learned rounding" in " ".join(result.output.split())


def test_export_onnx_full_integer_runs_residual_adds_as_integer_kernels(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["quantize", "resnet20-cifar10", "--method", "rtn", "--w-bits", "8", "--a-bits", "8"]
    result = runner.invoke(app, [*args, "--calib-size", "64", "--limit", "64", "--out", str(run)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "full.onnx"
    result = runner.invoke(
        app, ["export", "onnx", str(run), "-o", str(out), "--verify", "64", "--full-integer"]
    )
    assert result.exit_code == 0, result.output
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "top-1 agreement" in result.output
    plain = tmp_path / "plain.onnx"
    assert runner.invoke(app, ["export", "onnx", str(run), "-o", str(plain), "--verify", "0"]).exit_code == 0
    count = lambda path: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)  # noqa: E731
    assert count(out) > count(plain)  # the adds' inputs and outputs are quantized too
    signed = tmp_path / "signed.onnx"  # not verified: this CPU may lack the VNNI the file is meant for
    cmd = ["export", "onnx", str(run), "-o", str(signed), "--verify", "0", "--int8-weights", "signed"]
    assert runner.invoke(app, cmd).exit_code == 0
    weights = lambda path: {  # noqa: E731
        i.data_type for i in onnx.load(str(path)).graph.initializer if i.name.endswith(".weight_quantized")
    }
    assert weights(signed) == {onnx.TensorProto.INT8} and weights(plain) == {onnx.TensorProto.UINT8}


def test_export_onnx_int4_with_external_data_and_the_overwrite_rule(tmp_path):
    require_shared("models", "cifar10", "resnet20.th")
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["quantize", "resnet20-cifar10", "--method", "rtn", "--w-bits", "4", "--calib-size", "32"]
    assert runner.invoke(app, [*args, "--limit", "32", "--out", str(run)]).exit_code == 0
    out = tmp_path / "m.onnx"
    export = ["export", "onnx", str(run), "-o", str(out), "--verify", "32", "--external-data"]
    result = runner.invoke(app, export)
    assert result.exit_code == 0, result.output
    assert "m.onnx.data" in result.output and "opset 21" in result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.onnx", "m.onnx.data"]
    result = runner.invoke(app, export)  # both files exist: refused before any work
    assert result.exit_code != 0 and "--overwrite" in " ".join(result.output.split())
    assert runner.invoke(app, [*export, "--overwrite"]).exit_code == 0
    result = runner.invoke(app, [*export, "--overwrite", "--int4", "some"])
    assert result.exit_code != 0 and "weight-only, all, none" in " ".join(result.output.split())
    result = runner.invoke(app, [*export, "--overwrite", "--int8-weights", "int8"])
    assert result.exit_code != 0 and "portable, signed" in " ".join(result.output.split())
