"""Reading state dicts safely (``weights_only=True`` or safetensors) and loading them strictly into a model."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from postquant.errors import CheckpointError

__all__ = ["CHECKPOINT_SUFFIXES", "load_state_dict", "load_weights", "read_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt", ".safetensors")

# Keys under which training scripts commonly nest the state dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")

_PYTHON_OBJECTS = (
    "this checkpoint contains Python objects, not only tensors; postquant loads weights_only=True for safety. "
    "Re-save it as a state_dict (torch.save(model.state_dict(), path)) or safetensors"
)


def _weights_only_detail(err: Exception) -> str:
    """The informative line of torch's weights-only error (e.g. ``Unsupported global: GLOBAL mymod.Foo``)."""
    text = str(err)
    start = text.find("WeightsUnpickler error:")
    if start < 0:
        return ""
    detail = " ".join(text[start + len("WeightsUnpickler error:") :].split())
    return detail.split(" Check the documentation")[0].split(" Please use")[0][:200]


def _looks_like_pickle_or_torch(path: Path) -> bool:
    """True for a pickle stream (protocol >= 2 starts with 0x80) or a torch.save zip archive."""
    with path.open("rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def read_checkpoint(path: str | Path) -> object:
    """Read a checkpoint file on the CPU without running any pickled code.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; every other file with
    ``torch.load(map_location="cpu", weights_only=True)``.

    Args:
        path: the checkpoint file.

    Returns:
        What the file holds: usually a dict of tensors, possibly nested (e.g. ``{"state_dict": ...}``).

    Raises:
        CheckpointError: the file is missing, corrupt, or holds Python objects beyond tensors.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({err}).") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _weights_only_detail(err)
        if "Unsupported global" in detail or _looks_like_pickle_or_torch(path):
            hint = f" (torch: {detail})" if detail else ""
            raise CheckpointError(f"cannot load {path}: {_PYTHON_OBJECTS}{hint}.") from err
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch checkpoint (torch: {detail or err})."
        ) from err
    except (EOFError, RuntimeError, KeyError, ValueError, OSError) as err:
        reason = str(err).strip() or type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a PyTorch checkpoint ({reason[:200]})."
        ) from err


def _find_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict": {...}}``-style nesting and check that the values are tensors."""
    for _ in range(3):  # e.g. {"state_dict": {...}, "best_prec1": ...} or {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict (a dict of parameter name -> tensor)."
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"checkpoint {path} has no tensors; keys: {', '.join(map(str, list(obj)[:8]))}."
        )
    return tensors


def load_state_dict(path: str | Path, strip_prefix: str = "module.") -> dict[str, Tensor]:
    """Read the state dict in a checkpoint, unwrapping ``{"state_dict": ...}`` and stripping a key prefix.

    Args:
        path: ``.pt/.pth/.th/.bin/.ckpt`` (torch.save) or ``.safetensors`` file.
        strip_prefix: removed from every key that starts with it (``nn.DataParallel`` adds ``module.``).

    Returns:
        Parameter and buffer name -> tensor.

    Raises:
        CheckpointError: see `read_checkpoint`; also when the file holds no tensors.
    """
    path = Path(path).expanduser()
    state = _find_state_dict(read_checkpoint(path), path)
    if strip_prefix and all(k.startswith(strip_prefix) for k in state):
        state = {k[len(strip_prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, strip_prefix: str = "module.") -> nn.Module:
    """Load a checkpoint into ``model`` strictly: every key must match, with the same shape.

    Args:
        model: the module to fill (modified in place).
        path: the checkpoint file.
        strip_prefix: see `load_state_dict`.

    Returns:
        ``model``.

    Raises:
        CheckpointError: unreadable file, or keys / shapes that do not fit the architecture.
    """
    state = load_state_dict(path, strip_prefix)
    expected = model.state_dict()
    # Checkpoints saved before torch 0.4.1 have no BatchNorm `num_batches_tracked`: keep the model's counter.
    for key in set(expected) - set(state):
        if key.endswith("num_batches_tracked"):
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label} keys: {', '.join(keys[:5])}{more}")
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Is it the checkpoint of another architecture?"
        )
    model.load_state_dict(state, strict=True)
    log.debug("loaded %d tensors from %s into %s", len(state), path, type(model).__name__)
    return model
