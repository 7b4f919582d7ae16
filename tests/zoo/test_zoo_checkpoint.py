"""Checkpoint reading: weights-only loads, clear errors for missing, corrupt and untrusted files."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from postquant.errors import CheckpointError
from postquant_lab.zoo.checkpoint import load_state_dict, load_weights, read_checkpoint


class NotATensor:
    """A custom class: pickling it puts a Python global into the file."""

    def __init__(self) -> None:
        self.value = 3


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content",
    [bytes(range(7, 250)) * 4, b"", b"hello world\n"],
    ids=["random-bytes", "empty", "text"],
)
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(path)


def test_truncated_torch_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_linear().state_dict(), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(bad)


def test_torch_save_with_python_object_is_refused(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"weight": torch.zeros(2), "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="contains Python objects, not only tensors") as info:
        read_checkpoint(path)
    assert "weights_only=True" in str(info.value)
    assert "NotATensor" in str(info.value)  # torch's detail names the offending class


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    with path.open("wb") as f:
        pickle.dump({"thing": NotATensor()}, f, protocol=4)
    with pytest.raises(CheckpointError, match="contains Python objects"):
        read_checkpoint(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(path)


def test_safetensors_roundtrip(tmp_path):
    model = _linear()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    other = nn.Linear(4, 3)
    load_weights(other, path)
    torch.testing.assert_close(other.weight, model.weight, rtol=0, atol=0)


def test_nested_state_dict_with_dataparallel_prefix(tmp_path):
    model = _linear()
    path = tmp_path / "ckpt.th"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 91.0}, path)
    assert set(load_state_dict(path)) == {"weight", "bias"}
    other = load_weights(nn.Linear(4, 3), path)
    torch.testing.assert_close(other.bias, model.bias, rtol=0, atol=0)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_linear().state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape keys: weight"):
        load_weights(nn.Linear(5, 3), path)
    with pytest.raises(
        CheckpointError, match=r"missing keys: 0.bias, 0.weight; unexpected keys: bias, weight"
    ):
        load_weights(nn.Sequential(nn.Linear(4, 3)), path)


def test_no_tensors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_state_dict(path)
