"""Hostile command-line inputs (issue 15): recipes, option values and outputs are checked before any work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import postquant
import postquant.io
from postquant.errors import PostquantError, RecipeError
from postquant_lab.cli import app
from postquant_lab.cli_options import Lab, MixedOptions, QuantizeOptions

runner = CliRunner()


class _Stop(PostquantError):
    """Raised by the fake `quantize` once it has seen the recipe."""


class _Seen(list):
    """The recipes the command passed to its quantize function; `invoke` runs a command with that function."""

    def __init__(self, lab: Lab) -> None:
        super().__init__()
        self.lab = lab

    def invoke(self, args: list[str]):
        return runner.invoke(app, args, obj=self.lab)


@pytest.fixture
def seen():
    """Capture the recipe the CLI passes to its quantize function (and stop there: no model is quantized)."""

    def fake_quantize(model, recipe, calib=None, example_inputs=None):
        seen.append(recipe)
        raise _Stop("stopped after planning")

    zoo = SimpleNamespace(
        name="tiny",
        task="classification",
        model=nn.Linear(4, 2),
        example_inputs=torch.zeros(1, 4),
        calib_batches=lambda *args, **kwargs: [torch.zeros(2, 4)],
    )
    seen = _Seen(Lab(load_model=lambda name: zoo, quantize=fake_quantize))
    return seen


def _recipe_file(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_file_fields_are_kept_when_no_flag_is_typed(tmp_path, seen):
    path = _recipe_file(tmp_path, "method: squant\nw_bits: 2\na_bits: 8\ngranularity: tensor\nseed: 3\n")
    result = seen.invoke(["quantize", "tiny", "--recipe", path])
    assert result.exit_code == 2 and "stopped after planning" in result.output
    rec = seen[0]
    assert (rec.method.value, rec.w_bits, rec.a_bits, rec.granularity.value, rec.seed) == (
        "squant",
        2,
        8,
        "tensor",
        3,
    )


def test_typed_flags_override_the_recipe_file(tmp_path, seen):
    path = _recipe_file(tmp_path, "method: squant\nw_bits: 2\na_bits: 8\n")
    seen.invoke(["quantize", "tiny", "--recipe", path, "--w-bits", "6", "--method", "rtn"])
    rec = seen[0]
    assert (rec.method.value, rec.w_bits, rec.a_bits) == ("rtn", 6, 8)


def test_defaults_without_a_recipe_are_unchanged(seen):
    seen.invoke(["quantize", "tiny"])
    rec = seen[0]
    assert (rec.method.value, rec.w_bits, rec.a_bits) == ("rtn", 4, None)


def test_mixed_options_complete_the_recipe_files_budget(tmp_path, seen):
    path = _recipe_file(tmp_path, "w_bits: 4\nmixed:\n  w_bits_budget: 3.0\n  importance: datafree\n")
    seen.invoke(["quantize", "tiny", "--recipe", path, "--bit-choices", "2,4,8"])
    mixed = seen[0].mixed
    assert (mixed.w_bits_budget, mixed.importance.value, mixed.bit_choices) == (3.0, "datafree", [2, 4, 8])


@pytest.mark.parametrize("command", [["export", "onnx"], ["report"]])
def test_commands_reading_a_checkpoint_never_run_code_it_names(tmp_path, command):
    from tests.io import test_checkpoint as ckpt_tests
    from tests.io.conftest import make_small_net

    model, x = make_small_net(), torch.randn(4, 3, 16, 16)
    postquant.io.save(postquant.quantize(model, {"w_bits": 4}, calib=[x]), tmp_path / "ckpt")
    ckpt_tests._name_model(tmp_path / "ckpt", "tests.io.test_checkpoint:recording_factory")
    ckpt_tests.FACTORY_CALLS.clear()
    extra = ["-o", str(tmp_path / "m.onnx")] if command[0] == "export" else []
    result = runner.invoke(app, [*command, str(tmp_path / "ckpt"), *extra])
    assert result.exit_code == 2 and "--trust-code" in result.output, result.output
    assert ckpt_tests.FACTORY_CALLS == [] and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "args",
    [["--limit", "0"], ["--limit", "-1"], ["--calib-size", "0"], ["--iters", "0", "--method", "learned"]],
    ids=["limit-0", "limit-negative", "calib-size-0", "iters-0"],
)
def test_non_positive_counts_are_refused(seen, args):
    result = seen.invoke(["quantize", "tiny", *args])
    assert result.exit_code == 2 and seen == [], result.output


def test_negative_verify_is_refused(tmp_path):
    result = runner.invoke(app, ["export", "onnx", str(tmp_path), "--verify", "-5"])
    assert result.exit_code == 2 and "verify" in result.output


def test_report_without_out_is_an_error_before_any_work(seen):
    result = seen.invoke(["quantize", "tiny", "--report"])
    assert result.exit_code == 2 and "--out" in result.output and seen == []


def test_json_naming_a_directory_fails_before_any_work(seen, tmp_path):
    result = seen.invoke(["quantize", "tiny", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output and seen == []


def test_out_holding_foreign_files_in_its_checkpoint_folder_fails_before_any_work(seen, tmp_path):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "manifest.json").write_text('{"mine": true}')
    result = seen.invoke(["quantize", "tiny", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not a postquant checkpoint" in result.output and seen == []


def test_out_holding_a_previous_run_needs_overwrite(seen, tmp_path):
    """A second run into the same --out replaced the first's results silently."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"previous": true}')
    result = seen.invoke(["quantize", "tiny", "--out", str(run)])
    assert result.exit_code == 2 and "--overwrite" in result.output and seen == []
    assert (run / "results.json").read_text() == '{"previous": true}'
    result = seen.invoke(["quantize", "tiny", "--out", str(run), "--overwrite"])
    assert len(seen) == 1  # past the check: the (fake) quantization ran


def test_errors_are_one_line_without_traceback_unless_verbose(tmp_path, seen):
    path = _recipe_file(tmp_path, "w_bits: 9\n")
    result = seen.invoke(["quantize", "tiny", "--recipe", path])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    result = seen.invoke(["quantize", "tiny", "--recipe", path, "--verbose"])
    assert result.exit_code == 2 and "Traceback" in result.output and "RecipeError" in result.output


def test_options_build_the_recipe_from_the_typed_fields_only(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: squant\nw_bits: 2\na_bits: 8\nmixed:\n  w_bits_budget: 3.0\n")
    options = QuantizeOptions("tiny", recipe_file=path, w_bits=6, mixed=MixedOptions(bit_choices="2,4,8"))
    assert options.typed_recipe_fields() == {"w_bits": 6}
    rec = options.build_recipe()
    assert (rec.method.value, rec.w_bits, rec.a_bits) == ("squant", 6, 8)
    assert (rec.mixed.w_bits_budget, rec.mixed.bit_choices) == (3.0, [2, 4, 8])
    with pytest.raises(RecipeError, match="--bit-choices takes integers"):
        QuantizeOptions("tiny", mixed=MixedOptions(w_bits_budget=3.0, bit_choices="2,x")).build_recipe()
    with pytest.raises(RecipeError, match="--iters applies to learned rounding"):
        QuantizeOptions("tiny", iters=5).build_recipe()
