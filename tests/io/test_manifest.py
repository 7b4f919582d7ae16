"""The manifest as a typed model: checkpoints written before it was typed still load and save the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from postquant.errors import CheckpointError
from postquant.grids import GridConfig
from postquant.io import load, save
from postquant.io.checkpoint import MANIFEST_FILE, TENSORS_FILE
from postquant.io.manifest import Manifest
from postquant.model import quantized_layers
from tests.io.conftest import make_small_net

# Written by postquant 0.1.0 (commit 9e00107, the manifest a dict) from `make_small_net()` quantized with
# {"w_bits": 4, "a_bits": 8} and {"w_bits": 3, "grid": "power", "granularity": "tensor"}, calibrated on the
# `batches` fixture of tests/io/conftest.py.
WRITTEN_BEFORE = Path(__file__).parent / "data"
VERSIONS = ("postquant_version", "torch_version")


@pytest.mark.parametrize("name", ["small_net_w4a8", "small_net_power_w3_tensor"])
def test_a_checkpoint_written_by_the_untyped_manifest_loads_and_saves_the_same_files(name, tmp_path):
    old_dir = WRITTEN_BEFORE / name
    loaded = load(old_dir, make_small_net())
    assert quantized_layers(loaded)
    save(loaded, tmp_path / "again")
    new_dir = tmp_path / "again"
    assert (new_dir / TENSORS_FILE).read_bytes() == (old_dir / TENSORS_FILE).read_bytes()
    old = json.loads((old_dir / MANIFEST_FILE).read_text())
    new = json.loads((new_dir / MANIFEST_FILE).read_text())
    assert list(new) == list(old)  # the same fields in the same order
    recipe_old, recipe_new = old.pop("recipe"), new.pop("recipe")
    assert {k: recipe_new[k] for k in recipe_old} == recipe_old  # fields added to Recipe later may follow
    assert {k: v for k, v in new.items() if k not in VERSIONS} == {
        k: v for k, v in old.items() if k not in VERSIONS
    }
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(load(new_dir, make_small_net())(x), loaded(x))


@pytest.mark.parametrize("name", ["small_net_w4a8", "small_net_power_w3_tensor"])
def test_the_typed_manifest_reads_and_writes_the_same_text(name):
    text = (WRITTEN_BEFORE / name / MANIFEST_FILE).read_text()
    manifest = Manifest.model_validate_json(text)
    assert isinstance(manifest.layers["conv2"].grid, GridConfig)
    assert manifest.to_json() == text


def test_a_manifest_with_a_field_of_the_wrong_type_names_it(tmp_path):
    saved = tmp_path / "ckpt"
    shutil.copytree(WRITTEN_BEFORE / "small_net_w4a8", saved)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["layers"]["conv2"]["grid"]["group_size"] = "many"
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"malformed or was edited \(layers\.conv2\.grid\.group_size: "):
        load(saved, make_small_net())
