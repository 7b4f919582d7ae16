"""Activation chains of block-sequential quantization: in memory up to a byte bound, memory-mapped files beyond.

A chain is one decoder layer's input (or output) for every calibration batch. `ChainMemory` decides once per
run whether the chains that live at the same time fit in its bound; if not, every chain is a file in a
temporary folder, memory-mapped (``torch.from_file``): its pages are read and written by the kernel on access
and can be written back and dropped under memory pressure, instead of being anonymous memory. The file is
unlinked as soon as it is mapped, so it disappears with the tensor (and with a killed process).

When every batch has the same trailing shape, a chain is one tensor of all samples (`Chain.whole`, the
batches are row views of it): learned rounding samples rows from it directly, without concatenating a copy.
`ChainCheckpoint` saves the chains after a finished layer beside the resume checkpoint, one batch at a time
(in a process group, rank 0 writes every rank's batches).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from postquant.distributed import Ranks
from postquant.errors import CheckpointError, OutputError
from postquant.store.files import write_atomic

__all__ = ["DEFAULT_CHAIN_BYTES", "Chain", "ChainCheckpoint", "ChainMemory"]

log = logging.getLogger(__name__)

DEFAULT_CHAIN_BYTES = 2 * 2**30  # the chains live at once (both inputs and both outputs of one layer)


class ChainMemory:
    """Where the chains of one run live: in memory while the live chains fit in `bound` bytes together, else
    memory-mapped files in `spill_dir` (default: a temporary folder, removed by `close`)."""

    def __init__(self, bound: int = DEFAULT_CHAIN_BYTES, spill_dir: str | Path | None = None) -> None:
        if bound < 0:
            raise ValueError(f"chain_bytes must be >= 0, got {bound}")
        self.bound = bound
        self.spill_dir = Path(spill_dir).expanduser() if spill_dir is not None else None
        self.spill = False
        self._folder: Path | None = None
        self._count = 0

    def plan(self, chain_bytes: int, live: int) -> None:
        """Decide for the run: `live` chains of `chain_bytes` each at once fit the bound, or go to disk."""
        self.spill = live * chain_bytes > self.bound
        log.info(
            "activation chains: %d x %.1f MiB %s the bound of %.1f MiB%s",
            live, chain_bytes / 2**20, "exceed" if self.spill else "fit", self.bound / 2**20,
            ": memory-mapped files" if self.spill else ": kept in memory",
        )  # fmt: skip

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor: in memory on `device`, or a memory-mapped file (on the CPU) when the run
        spills."""
        if not self.spill:
            return torch.empty(shape, dtype=dtype, device=device)
        if self._folder is None:
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="postquant-chains-", dir=self.spill_dir))
        path = self._folder / f"chain_{self._count}.bin"
        self._count += 1
        numel = math.prod(shape)
        size = max(numel, 1)
        _reserve(path, size * torch.empty((), dtype=dtype).element_size())
        t = torch.from_file(str(path), shared=True, size=size, dtype=dtype)[:numel].view(shape)
        with contextlib.suppress(OSError):  # mapped: the file goes when the tensor does (not on Windows)
            path.unlink()
        return t

    def chain(self, sizes: list[int], whole: bool) -> Chain:
        """An empty chain for batches of `sizes` samples (one tensor of all samples if `whole`)."""
        return Chain(self, sizes, whole)

    def close(self) -> None:
        """Remove the temporary folder (files still mapped on Windows are left to the system)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` allocated on disk: a full disk is an `OutputError` now, not a SIGBUS when a
    page of the mapped file is first written."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise OutputError(
            f"cannot hold {nbytes / 2**20:.1f} MiB of activation chains in {path.parent}: "
            f"{exc.strerror or exc}; free space, pass spill_dir=... elsewhere, or raise chain_bytes"
        ) from exc


class Chain:
    """One tensor per calibration batch (`parts`), row views of `whole` when the batches share a shape."""

    def __init__(self, memory: ChainMemory, sizes: list[int], whole: bool) -> None:
        self.memory = memory
        self.sizes = sizes
        self.want_whole = whole
        self.whole: torch.Tensor | None = None
        self.parts: list[torch.Tensor | None] = [None] * len(sizes)

    def put(self, b: int, t: torch.Tensor) -> None:
        """Store batch `b`'s tensor (copied into the chain's memory)."""
        t = t.detach()
        if self.want_whole:
            if self.whole is None:
                self.whole = self.memory.empty((sum(self.sizes), *t.shape[1:]), t.dtype, t.device)
            start = sum(self.sizes[:b])
            view = self.whole[start : start + self.sizes[b]]
            if view.shape != t.shape or view.dtype != t.dtype:
                raise ValueError(f"batch {b}: {tuple(t.shape)} {t.dtype} in a chain of {tuple(view.shape)}")
            view.copy_(t)
            self.parts[b] = view
        else:
            if self.memory.spill:
                out = self.memory.empty(tuple(t.shape), t.dtype, t.device)
                t = out.copy_(t)
            self.parts[b] = t

    def batches(self) -> list[torch.Tensor]:
        """The tensors of every batch, in order."""
        missing = [b for b, p in enumerate(self.parts) if p is None]
        if missing:
            raise RuntimeError(f"chain batches {missing} were never stored")
        return self.parts  # type: ignore[return-value]


# dtype names of the safetensors format
_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as a safetensors file, one tensor's bytes at a time (views of one storage are fine,
    nothing is serialised whole in memory); atomically."""
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name here")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in tensors.values():
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().tobytes())

    write_atomic(path, write)


class ChainCheckpoint:
    """Both chains after finished layer k, saved in the resume directory (``chains_<k>.safetensors``).

    With `ranks`, each rank holds batches `part` of the chains: saving gathers them (rank 0 writes the file
    one process writes), loading takes this rank's part of it (so a run resumes on any number of ranks)."""

    def __init__(self, folder: Path | None, ranks: Ranks | None = None, part: range | None = None) -> None:
        self.folder = folder
        self.ranks = ranks
        self.part = part

    def path(self, k: int) -> Path | None:
        return None if self.folder is None else self.folder / f"chains_{k:04d}.safetensors"

    def save(self, k: int, q: Chain, f: Chain) -> None:
        path = self.path(k)
        if path is None:
            return
        qs, fs = q.batches(), f.batches()
        if self.ranks is not None:
            mine = ([t.cpu() for t in qs], [t.cpu() for t in fs])
            parts = self.ranks.gather_objects(mine, "gathering the chains for the checkpoint")
            if not self.ranks.is_main:
                return
            qs, fs = [t for p in parts for t in p[0]], [t for p in parts for t in p[1]]
        tensors = {f"q.{b}": t for b, t in enumerate(qs)}
        tensors.update({f"f.{b}": t for b, t in enumerate(fs)})
        write_tensors(path, tensors)

    def load(self, k: int, memory: ChainMemory, sizes: list[int], whole: bool) -> tuple[Chain, Chain]:
        """The quantized and float chains after layer `k` (this rank's batches `part` of them with ranks, of
        `sizes` samples), read one batch at a time into `memory`."""
        path = self.path(k)
        if path is None or not path.is_file():
            raise CheckpointError(
                f"the chains of finished layer {k} are missing ({path}); delete the checkpoint directory "
                f"{self.folder} to start over"
            )
        part = self.part if self.part is not None else range(len(sizes))
        q, f = memory.chain(sizes, whole), memory.chain(sizes, whole)
        try:
            with safe_open(str(path), framework="pt") as file:
                for i, b in enumerate(part):
                    q.put(i, file.get_tensor(f"q.{b}"))
                    f.put(i, file.get_tensor(f"f.{b}"))
        except Exception as exc:  # safetensors raises its own error types on a damaged file
            raise CheckpointError(
                f"{path} cannot be read ({exc}); delete it and the checkpoint to redo"
            ) from exc
        return q, f

    def drop(self, k: int) -> None:
        path = self.path(k)
        if path is not None and (self.ranks is None or self.ranks.is_main):
            path.unlink(missing_ok=True)
