"""Resuming learned rounding: finished units saved as safetensors plus a JSON index (and distilled data).

The directory is keyed by a hash of the recipe, the learned config, the float model's weights and the unit
names, so a resume never mixes runs. Every RNG of unit k is seeded from (seed, k) and earlier units are
restored bit-exactly, so an interrupted run finishes with the same codes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from postquant.errors import CheckpointError, OutputError
from postquant.store.files import fingerprint, read_json, write_atomic, write_json_atomic

log = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of a model's parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(batches: Any) -> str:
    """sha256 over the shapes and bytes of every tensor in (nested dicts, tuples and lists of) batches.

    Other leaves (strings, numbers) are ignored: calibration batches are tensors.
    """
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(str(tuple(obj.shape)).encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, tuple | list):
            for o in obj:
                feed(o)

    feed(batches)
    return h.hexdigest()


def unit_seed(seed: int, index: int) -> int:
    """The seed of every RNG of unit `index` (independent of what ran before)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:7], "little")


def read_tensors(path: Path, advice: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file this package wrote; a damaged file is a `CheckpointError` that ends
    with `advice` (what to delete)."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise CheckpointError(f"{path} cannot be read ({exc}); {advice}") from exc


class CheckpointStore:
    """Finished units of one run in ``root/<key>/``: ``index.json`` and ``unit_<k>.safetensors``."""

    def __init__(self, root: str | Path, key: str, units: list[str]) -> None:
        self.dir = Path(root).expanduser() / key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the checkpoint directory {self.dir}: {exc.strerror}") from exc
        self.key = key
        self.units = units
        self.index_path = self.dir / "index.json"
        self.index: dict[str, Any] = {"key": key, "units": units, "done": {}}
        try:
            index = read_json(self.index_path)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.index_path} is not valid JSON; delete it to start over") from exc
        if isinstance(index, dict) and index.get("key") == key and index.get("units") == units:
            self.index = self._checked(index)

    def _checked(self, index: dict[str, Any]) -> dict[str, Any]:
        """`index` if every finished-unit entry is one this class writes, else a CheckpointError: a file name
        is only ever ``unit_<k>.safetensors`` inside this directory (never a path that leaves it)."""
        done = index.get("done")
        if not isinstance(done, dict):
            raise CheckpointError(
                f"{self.index_path}: 'done' is not a mapping; delete {self.dir} to start over"
            )
        for k, entry in done.items():
            ok = (
                isinstance(k, str)
                and k.isdigit()
                and int(k) < len(self.units)
                and isinstance(entry, dict)
                and entry.get("file") == _unit_file(int(k))
                and isinstance(entry.get("outcome"), dict)
            )
            if not ok:
                raise CheckpointError(
                    f"{self.index_path}: entry {str(k)[:40]!r} is not one postquant writes (a unit file is "
                    f"{_unit_file(0)!r}, ... in this directory); delete {self.dir} to start over"
                )
        return index

    def finished(self) -> list[int]:
        """Indices of the saved units, in order, up to the first gap."""
        done = []
        for k in range(len(self.units)):
            if (
                str(k) not in self.index["done"]
                or not (self.dir / self.index["done"][str(k)]["file"]).is_file()
            ):
                break
            done.append(k)
        return done

    def load(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The state tensors and the outcome of finished unit `k`."""
        entry = self.index["done"][str(k)]
        path = self.dir / entry["file"]
        return read_tensors(path, "delete it to redo that unit"), entry["outcome"]

    def save(self, k: int, state: dict[str, torch.Tensor], outcome: dict[str, Any]) -> None:
        """Save unit `k` (tensors first, then the index, both atomically)."""
        name = _unit_file(k)
        tensors = {key: t.detach().cpu().contiguous() for key, t in state.items()}
        try:
            write_atomic(self.dir / name, lambda tmp: save_file(tensors, tmp))
            self.index["done"][str(k)] = {"file": name, "unit": self.units[k], "outcome": outcome}
            write_json_atomic(self.index_path, self.index)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as a SafetensorError
            raise OutputError(
                f"cannot save unit {k} to {self.dir}: {getattr(exc, 'strerror', None) or exc}; free space or "
                "choose another checkpoint_dir (finished units stay)"
            ) from exc
        log.debug("checkpointed unit %d (%s) to %s", k, self.units[k], self.dir)


def _unit_file(k: int) -> str:
    """The file of finished unit `k` in a checkpoint directory."""
    return f"unit_{k:04d}.safetensors"


def cached_batches(
    root: str | Path | None, parts: dict[str, Any], make: Callable[[], list[torch.Tensor]]
) -> list[torch.Tensor]:
    """`make()`'s batches, saved in ``root/data_<key>.safetensors`` and loaded from there next time.

    For calibration data that is costly and deterministic to build (synthetic BatchNorm-matched images: a
    forward and backward pass of the model per step), so that resuming an interrupted run does not build it
    again. `parts` must hold everything the data depends on (the key is their hash). No `root`: no cache.
    """
    if root is None:
        return make()
    path = Path(root).expanduser() / f"data_{fingerprint(parts)}.safetensors"
    if path.is_file():
        tensors = read_tensors(path, "delete it to build the data again")
        log.info("calibration data loaded from %s", path)
        return [tensors[f"batch_{i}"] for i in range(len(tensors))]
    batches = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"batch_{i}": b.detach().cpu().contiguous() for i, b in enumerate(batches)}
        write_atomic(path, lambda tmp: save_file(tensors, tmp))
    except (OSError, SafetensorError) as exc:
        raise OutputError(
            f"cannot write {path}: {exc.strerror or exc}; choose a writable checkpoint_dir"
        ) from exc
    return batches
