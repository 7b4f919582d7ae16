"""A Hugging Face checkpoint directory read lazily: the model's skeleton on the ``meta`` device, tensors loaded
by name from the safetensors shards when they are needed (and not before).

`LazyCheckpoint(path)` reads ``config.json`` and the shard index (``model.safetensors.index.json``, or the one
``model.safetensors``); `LazyCheckpoint.empty_model` builds the model from its config with every parameter on
``meta`` (buffers such as rotary ``inv_freq`` that no checkpoint holds are computed for real, as
``from_pretrained`` computes them); `LazyCheckpoint.materialize` loads the parameters under a prefix (a
decoder layer, when its turn comes), or all but some prefixes (embeddings, final norm, ``lm_head``).
Tensors keep their stored dtype (a bfloat16 checkpoint gives bfloat16 parameters). A shard is opened for
one tensor, which is copied out of the mapping, and closed again: at most one tensor's pages of a shard are
mapped (resident) at a time, and none after the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from postquant.errors import DataError, UnsupportedModelError

__all__ = ["LazyCheckpoint"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class LazyCheckpoint:
    """The safetensors tensors of a Hugging Face model directory, by name, read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path).expanduser()
        if not (self.dir / "config.json").is_file():
            raise DataError(
                f"{self.dir} is not a Hugging Face model directory (no config.json): pass the folder "
                "save_pretrained wrote"
            )
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{index} is not a safetensors shard index ({exc})") from exc
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        elif (self.dir / SINGLE).is_file():
            with safe_open(str(self.dir / SINGLE), framework="pt") as f:
                self.files = {name: self.dir / SINGLE for name in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise DataError(
                f"{self.dir} has no {SINGLE} or {INDEX}: save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise DataError(f"shards named in {index} are missing: {', '.join(missing[:4])}")

    def fingerprint(self) -> str:
        """sha256 over the tensor names and every shard's bytes (read in chunks, never held whole)."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}:{self.files[name].name};".encode())
        for file in sorted(set(self.files.values())):
            with open(file, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        return h.hexdigest()

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor stored (the checkpoint's weights' dtype)."""
        for name in sorted(self.files):
            with safe_open(str(self.files[name]), framework="pt") as f:
                dtype = _DTYPES.get(f.get_slice(name).get_dtype())
            if dtype is not None:
                return dtype
        return torch.float32

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored tensors `names` (stored dtype), copied out of the shards (each opened and closed per tensor)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise DataError(f"{self.dir} has no tensor {name!r}")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            for name in wanted:
                # A copy, the shard opened for one tensor: the tensor safetensors returns is a view of the
                # mapped shard, whose read pages stay resident while it is mapped (any tensor kept, a norm's
                # weight, would keep it mapped); so at most one tensor's pages are mapped at a time.
                with safe_open(str(file), framework="pt") as f:
                    out[name] = f.get_tensor(name).clone()
        return out

    def empty_model(self, trust_remote_code: bool = False) -> nn.Module:
        """The causal LM of ``config.json`` (eval mode) with every parameter on ``meta``; its buffers (rotary
        tables) computed on the CPU in the dtype ``from_pretrained`` would use. Tied parameters are tied.

        Raises:
            UnsupportedModelError: transformers cannot build the config's architecture.
        """
        import transformers  # optional dependency (the llm extra)
        from accelerate import init_empty_weights  # optional dependency (the llm extra)

        config = transformers.AutoConfig.from_pretrained(self.dir, trust_remote_code=trust_remote_code)
        # the keyword of the construction dtype: `dtype` since transformers 5, `torch_dtype` before
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            with init_empty_weights(include_buffers=False):
                model = transformers.AutoModelForCausalLM.from_config(
                    config, trust_remote_code=trust_remote_code, **{dtype_key: self.dtype()}
                )
        except ValueError as exc:
            raise UnsupportedModelError(f"transformers cannot build the model of {self.dir}: {exc}") from exc
        if hasattr(model, "tie_weights"):  # not tied while the parameters were created on meta
            model.tie_weights()
        return model.eval()

    def materialize(self, model: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Load the parameters (and stored buffers) of `model` under the dotted `prefix` ('' for all) whose
        names do not start with one of `skip`, in their stored dtype. Tied parameters (``lm_head`` sharing the
        embedding) are loaded once under whichever name the checkpoint stores and set at every place.

        Raises:
            DataError: a parameter that the checkpoint does not hold (the message names it).
        """
        start = f"{prefix}." if prefix else ""
        wanted = self._stored_names(model, start, skip)
        buffers = [
            n
            for n, _ in _persistent_buffers(model)
            if n.startswith(start) and not n.startswith(skip) and n in self.files
        ]
        loaded = self.tensors([*wanted, *buffers])
        for key, names in wanted.items():
            old = model.get_parameter(names[0])
            param = nn.Parameter(loaded[key], requires_grad=old.requires_grad)
            for name in names:
                _set(model, name, param, "_parameters")
        for name in buffers:
            _set(model, name, loaded[name], "_buffers")
        log.debug("loaded %d tensors under %r from %s", len(loaded), prefix or "<root>", self.dir)

    def check_complete(self, model: nn.Module) -> None:
        """Raise the `DataError` of `materialize` now if any parameter of `model` has no stored tensor."""
        self._stored_names(model, "", ())

    def _stored_names(self, model: nn.Module, start: str, skip: tuple[str, ...]) -> dict[str, list[str]]:
        """For each parameter object under `start` (not under `skip`): the stored name -> all its names."""
        groups: dict[int, list[str]] = {}  # one entry per parameter object: all its names
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.startswith(start) and not name.startswith(skip):
                groups.setdefault(id(p), []).append(name)
        wanted: dict[str, list[str]] = {}
        for names in groups.values():
            stored = [n for n in names if n in self.files]
            if not stored:
                raise DataError(
                    f"{self.dir} holds no tensor for parameter {names[0]!r} (its tensor names do not match "
                    "the model's: load it with from_pretrained and use quantize_blocks)"
                )
            wanted[stored[0]] = names
        return wanted


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mname, module in model.named_modules():
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, b))
    return out


def _set(model: nn.Module, name: str, value: torch.Tensor, slot: str) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    getattr(module, slot)[leaf] = value
