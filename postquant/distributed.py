"""Quantization inside a torch.distributed process group (``torchrun``, or a group the caller initialised).

When `quantize` runs in an initialised process group of more than one process, it finds it here
(`current`) and spreads its work:

* **start-of-run check**: every rank all-gathers a hash of its recipe, its model weights and its
  calibration data; ranks that differ from rank 0 are named in a `DistributedMismatchError` on every rank.
* **activation calibration, data parallel**: the calibration batches (the same list on every rank) are split
  into contiguous shards (`shard`), each rank observes its shard, and the observers' states are all-gathered
  and merged in rank order (`postquant.calib.observers.RangeObserver.merge`). Min/max and percentile ranges
  are then bit-identical to one process; MSE and std are too unless a single observed tensor holds more
  values than the observer's sample (see `postquant.calib.observers`).
* **weights, work split**: each rank fits the grids and chooses the codes (RTN, SQuant) of a share of the
  layers, balanced by weight size (`split_work`), and the grids and codes are all-gathered, so every rank
  installs the same codes, bit for bit, as one process.
* **GPTQ, data parallel**: each rank accumulates the layers' Hessians on its shard of the calibration
  batches, one all-reduce sums them (`postquant.weights.reduce_hessians`), and the solves are split over the
  ranks, their codes all-gathered (`postquant.weights.solve_gptq`).
* **mixed-precision importance** (`postquant.mixed.importance`): ``loss`` importance splits the layers (each
  rank measures whole rows, all-gathered: one process's table bit for bit); ``fisher`` and ``taylor`` shard
  the batches and all-reduce the gradient sums; rank 0 alone reads and writes the importance cache. Every
  rank then allocates the same bits from the same table.
* **learned rounding, data parallel** (`postquant.reconstruct.shards`): each step's batch is split over the
  ranks and the loss gradients summed; the weight side of a step (soft weights from the rounding variables,
  the regulariser, their backward pass and the optimizer step) is split by layers, each rank owning a share
  of a unit's layers (its SQuant starting codes, soft weights and optimizer steps) and sending the soft
  weights to the others; on the block path each batch's rows are balanced over the ranks.
* **the block path** (`postquant.blockwise.quantize_blocks`): each rank carries its shard of the chains from
  decoder layer to decoder layer; learned rounding draws one process's batch from the sharded cache
  (`postquant.reconstruct.cache.Shard`) and sums the gradients as above.
* **end-of-run agreement**: the ranks compare a hash of their quantized models; a rank whose model differs
  (e.g. learned rounding, which every rank runs on all the data, computed with other float reduction orders)
  takes rank 0's (`agree`).

Work that is independent per rank (the runs of a study: each rank quantizes other models alone) runs inside
`alone`: there `current` is None, so `quantize` runs as one process would, with no collective.

Every collective waits at most `Ranks.timeout` (``POSTQUANT_DIST_TIMEOUT`` seconds, default 1800); a rank
that died or hung makes the others raise `DistributedError` within it. Without a process group (or with a
group of one process) `current` is None and nothing here runs; this module imports only
``torch.distributed``.

Objects are exchanged as pickles between the ranks of one job (as ``torch.distributed.all_gather_object``
does): run only ranks you trust, as for any torch.distributed job.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from postquant.errors import DataError, DistributedError, DistributedMismatchError

__all__ = [
    "TIMEOUT_ENV",
    "Ranks",
    "active",
    "alone",
    "current",
    "init_from_env",
    "is_main",
    "rank",
    "shard_bounds",
    "split_work",
    "world_size",
]

log = logging.getLogger(__name__)

TIMEOUT_ENV = "POSTQUANT_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 1800.0


def active() -> bool:
    """Whether this process is in an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (or runs alone): the one that prints and writes outputs."""
    return rank() == 0


def _timeout_from_env() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: the timeout must be positive")
    return datetime.timedelta(seconds=seconds)


def init_from_env(timeout: datetime.timedelta | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment), once.

    The backend is NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo. Returns whether a
    group of more than one process is active afterwards; without ``WORLD_SIZE`` (a plain run) it does nothing.
    """
    if active():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout or _timeout_from_env())
    log.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


@dataclass(frozen=True)
class Ranks:
    """The process group one `quantize` call runs in: this process's `rank` of `world`, and the longest a
    collective waits for the others (`timeout`)."""

    rank: int
    world: int
    timeout: datetime.timedelta
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ collectives

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as exc:  # torch's DistBackendError is a RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({first[:300]}); another rank died or did not "
                f"answer within {self.timeout.total_seconds():g} s ({TIMEOUT_ENV}): see the other ranks' logs. "
                "Nothing was written."
            ) from exc

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """`obj` of every rank, in rank order (pickled; tensors should be on the CPU)."""
        payload = torch.frombuffer(
            bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self._wait(dist.all_gather(sizes, size, async_op=True), what)
        lengths = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        padded[: payload.numel()] = payload.to(self.device)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self._wait(dist.all_gather(out, padded, async_op=True), what)
        return [pickle.loads(t[:n].cpu().numpy().tobytes()) for t, n in zip(out, lengths, strict=True)]

    def all_reduce_sum_(self, tensors: list[torch.Tensor], what: str) -> None:
        """Sum `tensors` (same shapes on every rank) over the ranks, in place, in one flat buffer."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self.device)
        self._wait(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), what)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str) -> None:
        """Rank `src`'s `tensor` into `tensor` on every rank, in place (same shape and dtype on every rank)."""
        buf = tensor.to(self.device)
        self._wait(dist.broadcast(buf, src, async_op=True), what)
        if buf is not tensor:
            tensor.copy_(buf)

    def exchange(
        self, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor], what: str
    ) -> None:
        """Send ``sends[r]`` to each rank r and receive ``recvs[r]`` (in place) from each rank r, all at once
        (point to point, every direction at the same time: one `torch.distributed.batch_isend_irecv`, which
        NCCL needs to run sends and receives between the same ranks without a deadlock); each pair of ranks must
        post matching tensors."""
        bufs = {r: t.to(self.device) for r, t in recvs.items()}
        ops = [dist.P2POp(dist.isend, t.to(self.device), r) for r, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, buf, r) for r, buf in bufs.items()]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            self._wait(work, what)
        for r, buf in bufs.items():
            if buf is not recvs[r]:
                recvs[r].copy_(buf)

    def send_object(self, obj: Any, dst: int, what: str) -> None:
        """Send `obj` (pickled; tensors should be on the CPU) to rank `dst`, which calls `recv_object`."""
        payload = torch.frombuffer(
            bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        ).to(self.device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        self._wait(dist.isend(size, dst), what)
        self._wait(dist.isend(payload, dst), what)

    def recv_object(self, src: int, what: str) -> Any:
        """The object rank `src` sends with `send_object`."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(size, src), what)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self._wait(dist.irecv(data, src), what)
        return pickle.loads(data.cpu().numpy().tobytes())

    def broadcast_object(self, obj: Any, what: str, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (pickled; tensors should be on the CPU)."""
        payload = (
            torch.frombuffer(
                bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
            )
            if self.rank == src
            else torch.empty(0, dtype=torch.uint8)
        )
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        self._wait(dist.broadcast(size, src, async_op=True), what)
        data = (
            payload.to(self.device)
            if self.rank == src
            else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        )
        self._wait(dist.broadcast(data, src, async_op=True), what)
        return obj if self.rank == src else pickle.loads(data.cpu().numpy().tobytes())

    # ------------------------------------------------------------------------------------------- checks

    def check_consistent(self, hashes: Mapping[str, str]) -> None:
        """Raise `DistributedMismatchError` (on every rank) when any rank's `hashes` (input name -> hash of
        it, e.g. ``{"recipe": ..., "model weights": ...}``) differ from rank 0's."""
        every = self.gather_objects(dict(hashes), "the start-of-run consistency check")
        for what in hashes:
            differ = [r for r, h in enumerate(every) if h.get(what) != every[0].get(what)]
            if differ:
                raise DistributedMismatchError(
                    f"ranks {differ} of {self.world} were given another {what} than rank 0: every rank must run "
                    f"the same recipe on the same model and calibration data (load them the same way on every "
                    "rank; postquant shards the calibration data itself)",
                    what,
                    differ,
                )

    def agree(self, obj: Any, digest: str, what: str) -> Any:
        """`obj` when every rank's `digest` of its own copy equals rank 0's; else rank 0's `obj` (broadcast),
        so every rank ends with the same one. Logs which ranks differed."""
        digests = self.gather_objects(digest, f"comparing {what}")
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if not differ:
            return obj
        log.warning(
            "ranks %s computed another %s than rank 0 (float reduction order differs between processes); "
            "they take rank 0's",
            differ,
            what,
        )
        return self.broadcast_object(obj, f"sending rank 0's {what}")


_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("postquant_alone", default=False)


@contextmanager
def alone() -> Iterator[None]:
    """Inside the ``with`` block this process works alone: `current` is None, so `quantize` (and everything
    else here) runs as in a single process, with no collective, even in a process group. For work the
    caller has already split over the ranks (e.g. each rank quantizing its own study runs)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def current() -> Ranks | None:
    """The process group `quantize` runs in, or None without one (or with one process: nothing to split, or
    inside `alone`)."""
    if _ALONE.get() or not active() or dist.get_world_size() <= 1:
        return None
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), _timeout_from_env(), device)


# ------------------------------------------------------------------------------------- splitting work


def shard_bounds(n_items: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) shards of `n_items` items for `world` ranks, sizes differing by at most one
    (the first ``n_items % world`` ranks take one more)."""
    bounds, start = [], 0
    for r in range(world):
        stop = start + n_items // world + (1 if r < n_items % world else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard(ranks: Ranks, batches: Sequence[Any], samples: int) -> list[Any]:
    """This rank's contiguous shard of the calibration `batches` (whole batches, so each rank's observers see
    the very tensors one process sees); `samples` is their total sample count.

    Raises:
        DataError: fewer calibration samples than ranks.
    """
    if samples < ranks.world:
        raise DataError(
            f"{samples} calibration samples for {ranks.world} ranks: every rank needs at least one sample; pass "
            f"more calibration data (calib_size) or start fewer processes"
        )
    if len(batches) < ranks.world:
        log.warning(
            "%d calibration batches for %d ranks: ranks %d-%d have no batch and wait (smaller batches spread the "
            "work)",
            len(batches),
            ranks.world,
            len(batches),
            ranks.world - 1,
        )
    start, stop = shard_bounds(len(batches), ranks.world)[ranks.rank]
    return list(batches[start:stop])


def split_work(sizes: Sequence[int], world: int) -> list[int]:
    """The rank that does item i, balancing the total size per rank: items from largest to smallest (ties:
    earlier first), each to the least loaded rank (ties: lowest rank). Deterministic, so every rank agrees."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner
