"""postquant.store.files: whole files and directories or nothing, file hashes, stable fingerprints."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postquant.store.files import (
    atomic_path,
    file_sha256,
    fingerprint,
    write_atomic,
    write_dir_atomic,
    write_json_atomic,
    write_text_atomic,
)


class Killed(BaseException):
    """A writer stopped mid-write (as by Ctrl-C: not an `Exception`)."""


def _half_then_killed(tmp: str) -> None:
    Path(tmp).write_text('{"half": ')
    raise Killed


def test_a_writer_killed_mid_write_leaves_the_previous_file_and_nothing_else(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(Killed):
        write_atomic(path, _half_then_killed)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_a_writer_killed_before_the_first_write_leaves_no_file(tmp_path):
    with pytest.raises(Killed):
        write_atomic(tmp_path / "new.json", _half_then_killed)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_renames_on_success_and_lets_the_block_move_the_file_elsewhere(tmp_path):
    with atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"graph")
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.")
    assert (tmp_path / "model.onnx").read_bytes() == b"graph"
    with pytest.raises(ValueError), atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"rejected graph")
        tmp.replace(tmp_path / "model.rejected.onnx")
        raise ValueError("verification failed")
    assert (tmp_path / "model.onnx").read_bytes() == b"graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.rejected.onnx"]


def test_json_and_text_are_written_as_asked(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1, 2]}, indent=2, sort_keys=True, newline=True)
    assert (tmp_path / "a.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    write_text_atomic(tmp_path / "t.md", "| a |\n")
    assert (tmp_path / "t.md").read_text() == "| a |\n"


def _fill(files: dict[str, str]):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)

    return write


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomic(target, _fill({"a": "1", "b": "2"}))
    write_dir_atomic(target, _fill({"c": "3"}))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"c": "3"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # neither the new nor the old copy left beside


def test_a_directory_writer_killed_mid_write_leaves_the_previous_directory(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomic(target, _fill({"a": "1"}))

    def killed(tmp: Path) -> None:
        (tmp / "a").write_text("half")
        raise Killed

    with pytest.raises(Killed):
        write_dir_atomic(target, killed)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_directory_that_may_not_be_replaced_is_kept(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.md").write_text("keep me")

    def refuse(directory: Path) -> None:
        raise PermissionError(f"{directory} is not ours")

    with pytest.raises(PermissionError, match="not ours"):
        write_dir_atomic(target, _fill({"a": "1"}), replaceable=refuse)
    assert (target / "notes.md").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read block
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_fingerprints_keep_their_values():
    """Cached study runs, importance tables and learned-rounding checkpoints are named by these values."""
    parts = {
        "model": "resnet20",
        "recipe": {"w_bits": 4, "learned": {"iters": 100}},
        "limit": None,
        "path": Path("/x"),
    }
    assert fingerprint(parts) == "c3ed17faa8dc406a"  # the value `run_key` gave before the store existed
    assert fingerprint(parts, 12) == "c3ed17faa8dc"  # and the study's `digest`


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def _reordered(obj, rng):
    """`obj` with the keys of every mapping inserted in another order (lists keep theirs)."""
    if isinstance(obj, dict):
        keys = list(obj)
        rng.shuffle(keys)
        return {k: _reordered(obj[k], rng) for k in keys}
    if isinstance(obj, list):
        return [_reordered(v, rng) for v in obj]
    return obj


@settings(max_examples=100, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=8), JSON, max_size=6), seed=st.integers(0, 2**16))
def test_a_fingerprint_does_not_depend_on_key_order(obj, seed):
    other = _reordered(obj, random.Random(seed))
    assert fingerprint(other) == fingerprint(obj)
    assert fingerprint({**obj, "\x00added-key": 1}) != fingerprint(obj)  # and it sees the content
