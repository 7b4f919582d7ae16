"""SQuant rounding: data-free flips of nearest-rounding decisions (docs/algorithms.md 2.2).

SQuant (Guo et al., "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation",
ICLR 2022) approximates the loss increase of a layer by a Hessian made of three parts: element-wise (E),
one constant block per kernel (K) and one per output channel (C). It minimises them one after the other by
"Constrained Absolute Sum of Error" (CASE) flipping: round to nearest (E), then inside every kernel, and then
inside every output channel, flip the ``k = round(|sum of errors|)`` elements whose errors are closest to 0.5
to their other neighbouring integer, and hand one candidate over to the coarser stage (paper Sec. 3.3, Alg. 1).

This is a vectorised restatement of the reference's pure-PyTorch path, bit-exact with its integer outputs.
``shared/golden/squant/README.md`` states that behaviour: round-half-to-even everywhere, the tie breaking of
its sorts, the ``order[-1]`` hand-off of a group whose error sum is exactly 0, and no-op flips of elements that
are not candidates. Nothing loops over kernels or channels in Python. Channels are independent, so on the CPU
the kernel stage runs in blocks of whole output channels (that only saves memory traffic): a block's rounding
and errors live in reused block-sized buffers, the few kernels its fast path cannot order are redone in the
block, and its channels' error sums are taken there; then the channel stage runs on the whole layer. The
CPU path's block- and layer-sized scratch arrays come from a per-thread workspace kept between calls
(`_Workspace`), so that their pages are not faulted in again for every block and layer. On an accelerator
whole layers are processed at once (`_squant_dense`, at the end).

On the CPU the kernel and channel stages work on numpy arrays that share the tensors' memory: there numpy's
elementwise comparisons, selections and index lists cost a fraction of torch's (whose cost per call also
dominates the small per-kernel and per-channel vectors), and its vectorised row sort is several times faster
than ``torch.topk``. The arithmetic is the same float32, element for element.

How the reference's sorts are reproduced without sorting every row:

* Kernel stage, kernels of at most 16 elements. The reference's ``torch.sort(descending=True)`` is an
  insertion sort on rows this short, so it is stable. The errors are transposed to (kh*kw, kernels), and
  each element gets a uint16 key: its priority in the kernel's direction (``-e0`` for up, ``e0`` for down,
  > 0 for a candidate) scaled to [-32752, 32752] and rounded by a float32 addition of 2^23 + 2^15, whose
  mantissa then holds it (a non-decreasing function of the priority), with the low 4 bits replaced by
  ``15 - index``: keys are unique within a kernel, and their 12-bit classes order the priorities wherever
  they differ. A sorting network whose comparators are elementwise max / min of whole rows orders all
  kernels at once, down to the positions the stage needs. Where two of those positions share a class (a
  few kernels in 1000), the two are ordered by their exact priorities (equal ones keep the index order, as
  the stable sort does). The few kernels where three positions in a row share a class, a needed position
  holds no sure candidate (or an element beyond the range), the error sum is 0, or which flip all four
  elements a 9-element kernel can need (|error sum| > 3.5), are redone with exact stable ranks.
  The kernels' error sums are the reference's float32 ``torch.sum``: its order of additions, where probe
  rows confirm it (`_sum_order`), is repeated on the transposed rows, else torch sums.
* Kernel stage, larger kernels (5x5, 7x7): ``torch.sort`` of the very same rows as the reference, on the
  CPU like the reference (a GPU's sort orders ties differently).
* Channel stage. It is the last stage, so only the set of the first k elements of the order matters. Where
  the k-th and (k+1)-th largest priorities differ, that set is ``{priority > (k+1)-th largest}``, however
  ties are ordered, and a sort of the values finds it (numpy's on the CPU, torch's on an accelerator). After
  a kernel stage only the one hand-off per kernel has a nonzero priority, so the sort runs on an (OC, IC)
  matrix. The rare channels with a tie at the boundary are sorted in full with ``torch.sort`` on the CPU, as
  in the reference, so its tie order is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from postquant.choices import SquantMode
from postquant.errors import NonFiniteWeightError

__all__ = ["SquantMode", "squant_codes", "squant_codes_many"]

# Elements per block of output channels: memory traffic (the intermediates of a block stay in the CPU's
# last-level cache) against the fixed cost of the ~110 numpy calls of a block (on the ResNet-18 shapes, on a
# loaded 2-core machine, 2^18 measured about 5% slower, 2^17 about 15%, 2^20 the same).
_BLOCK_ELEMENTS = 1 << 19
# Rows of up to this length are insertion-sorted (stably) by the reference's std::sort.
_STABLE_SORT_MAX = 16
# The kernel stage's sorting network orders positions 0 .. _FAST_K + 1; kernels flipping more elements
# (|error sum| > 3.5: a few kernels of a layer, if any) take the exact path. Ordering 5 positions of 9 costs
# one comparator more than 4.
_FAST_K = 3


class _Workspace(threading.local):
    """Scratch arrays of the CPU path, kept per thread between calls and grown on demand.

    A fresh array costs a page fault per 4 KiB on its first write (about as much as a pass of arithmetic
    over it) whenever the allocator hands back memory it returned to the system; these buffers are written
    once per block, so keeping them makes that cost independent of what else the process allocates. Arrays
    of up to _WORKSPACE_KEEP_BYTES are kept (about 16 MiB in all with the default block size).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
        """An uninitialised array of `shape` and `dtype` in buffer `name` (which it overwrites)."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.size < nbytes:
            buf = np.empty(max(nbytes + nbytes // 4, 64), dtype=np.uint8)  # room for a slightly larger call
            if nbytes <= _WORKSPACE_KEEP_BYTES:
                self.buffers[name] = buf
        return buf[:nbytes].view(dt).reshape(shape)


_WORKSPACE_KEEP_BYTES = 1 << 24
_workspace = _Workspace()


def _parse_mode(mode: SquantMode | str) -> SquantMode:
    if isinstance(mode, SquantMode):
        return mode
    try:
        return SquantMode(str(mode).lower())
    except ValueError:
        valid = ", ".join(repr(m.value) for m in SquantMode)
        raise ValueError(f"unknown SQuant mode {mode!r}; valid modes are {valid}") from None


def squant_codes(
    x: torch.Tensor,
    tmin: int,
    tmax: int,
    mode: SquantMode | str = SquantMode.EKC,
    *,
    whole_layer: bool | None = None,
) -> torch.Tensor:
    """Integer codes of the integer-domain weight `x` chosen by SQuant's CASE flipping (ICLR 2022, Alg. 1).

    Args:
        x: integer-domain values ``S * w - Z`` shaped like a weight: (OC, IC, kh, kw) conv, (OC, IC, k) conv1d
            or (OC, IC) linear. Any float dtype; the computation is float32, like the reference.
        tmin, tmax: the integer range of the codes, e.g. -8 and 7 at 4 bits.
        mode: ``"e"`` nearest rounding, ``"ek"`` kernel stage only, ``"ec"`` channel stage only, ``"ekc"``
            kernel then channel stage (full SQuant). The kernel stage is skipped for kernels of one element
            (Linear, 1x1 conv).
        whole_layer: process the layer in one piece with a fixed sequence of operations and one host
            synchronisation (fast on a GPU), instead of in cache-sized blocks of channels (fast on a CPU).
            Both give the same codes. Default: whole layer on any device but the CPU.

    Returns:
        torch.int32 codes of the shape of `x`, in ``[tmin, tmax]``, at most one step from ``round(x)``
        (before the clamp). An empty `x` gives an empty result.

    Raises:
        ValueError: for an unknown mode, ``tmin > tmax`` or a non-empty `x` with fewer than 2 dimensions.
        NonFiniteWeightError: (a ValueError) if `x` holds NaN or Inf.
    """
    mode = _parse_mode(mode)
    tmin, tmax = int(tmin), int(tmax)
    if tmin > tmax:
        raise ValueError(f"empty integer range: tmin={tmin} > tmax={tmax}")
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.int32, device=x.device)
    if x.dim() < 2:
        raise ValueError(
            f"SQuant needs a weight of at least 2 dims (OC, IC, ...), got shape {tuple(x.shape)}"
        )
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1).to(torch.float32).contiguous()  # (OC, IC, L)
    kernel = mode in (SquantMode.EK, SquantMode.EKC) and x3.shape[2] > 1
    channel = mode in (SquantMode.EC, SquantMode.EKC)
    if whole_layer if whole_layer is not None else x3.device.type != "cpu":
        return _squant_dense([x3], tmin, tmax, kernel, channel)[0].view(x.shape)
    # NaN and Inf are caught by the stages (an error sum is not finite), or here for nearest rounding.
    if not kernel and not channel:
        _check_finite(x3)
    # numpy's allocation: it advises the kernel to back large arrays with huge pages, which makes the first
    # write of a fresh output (a page fault per 4 KiB otherwise) several times cheaper.
    out = torch.from_numpy(np.empty(x3.shape, dtype=np.int32))  # (OC, IC, L)
    if kernel:
        _kernel_then_channel(x3, out, tmin, tmax, channel)
        return out.view(x.shape)
    oc, ic, klen = x3.shape
    for c0, c1 in _channel_blocks(oc, ic * klen):  # blocks of whole output channels, for cache locality only
        xb, ob = x3[c0:c1], out[c0:c1]  # (n, IC, L)
        if channel:
            _channel_stage_full_cpu(xb, ob, tmin, tmax)
        else:
            ob.copy_(torch.round(xb).clamp_(tmin, tmax))
    return out.view(x.shape)


def _kernel_then_channel(x3: torch.Tensor, out: torch.Tensor, tmin: int, tmax: int, channel: bool) -> None:
    """Kernel stage in cache-sized blocks of channels (the few kernels its fast path cannot order redone in
    the same block), each block's channel error sums taken while its errors are in the cache, then the
    channel stage on the whole layer if `channel`. Writes the codes into `out` (OC, IC, L), on the CPU.

    The errors and roundings of a block live in two block-sized scratch arrays of the workspace: a
    layer-sized array would cost a page fault per 4 KiB on its first write, as much as the arithmetic of a
    pass over it.
    """
    oc, ic, klen = x3.shape
    xk, ok = x3.view(-1, klen), out.view(-1, klen)  # (G, L) kernels
    h_pos = _workspace.array("h_pos", (xk.shape[0],), np.int32)  # (G,) each kernel's hand-off
    h_pri = _workspace.array("h_pri", (xk.shape[0],), np.float32)
    h_up = _workspace.array("h_up", (xk.shape[0],), bool)
    s = np.empty(oc, dtype=np.float32)  # (OC,) channel error sums after the kernel stage
    blocks = _channel_blocks(oc, ic * klen)
    scratch = _workspace.array("re", (2, max(c1 - c0 for c0, c1 in blocks) * ic, klen), np.float32)
    for c0, c1 in blocks:  # blocks of whole output channels, for cache locality only
        g0, g1 = c0 * ic, c1 * ic
        if klen > _STABLE_SORT_MAX:
            _check_finite(xk[g0:g1])
            ks = _kernel_stage_ranked(xk[g0:g1], None, tmin, tmax, stable=False)
            ok[g0:g1], e = ks.r.clamp_(tmin, tmax), ks.e
            h_pos[g0:g1], h_pri[g0:g1], h_up[g0:g1] = ks.h_pos.numpy(), ks.h_pri.numpy(), ks.h_up.numpy()
        else:
            r, e_np = scratch[0, : g1 - g0], scratch[1, : g1 - g0]
            hand = (h_pos[g0:g1], h_pri[g0:g1], h_up[g0:g1])
            with np.errstate(invalid="ignore"):
                _kernel_stage(xk[g0:g1].numpy(), r, e_np, ok[g0:g1].numpy(), *hand, tmin, tmax)
            e = torch.from_numpy(e_np)
        if channel:
            s[c0:c1] = e.view(c1 - c0, -1).sum(-1).numpy()  # the reference's float32 sums (>= 2 rows)
    if channel:
        _channel_stage_handoffs(
            x3, out, s, h_pos.reshape(oc, ic), h_pri.reshape(oc, ic), h_up.reshape(oc, ic), tmin, tmax
        )


_NON_FINITE = "SQuant input holds NaN or Inf values; check the weight and its grid"


def _check_finite(x: torch.Tensor) -> None:
    """Raise NonFiniteWeightError if `x` holds NaN or Inf (a sum is cheap; it overflows only if huge)."""
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise NonFiniteWeightError(_NON_FINITE)


def squant_codes_many(
    xs: Sequence[torch.Tensor],
    tmin: int,
    tmax: int,
    mode: SquantMode | str = SquantMode.EKC,
    *,
    whole_layer: bool | None = None,
) -> list[torch.Tensor]:
    """`squant_codes` of several layers on one integer range: the same codes, fewer operations on a GPU.

    Kernels and output channels are independent, so on the whole-layer path all layers with kernels of one
    length (e.g. every 3x3 convolution of a ResNet) share one kernel stage, those with the same number of
    input channels one channel stage, and each kernel length one host synchronisation. On the blocked (CPU)
    path, small layers of one shape apart from the output channels are stacked along those and rounded
    together, up to a block of channels (a call's fixed cost is about that of 50,000 weights); the others
    are done alone.

    Args:
        xs: integer-domain weights, each as `squant_codes` takes them, on one device.
        tmin, tmax, mode, whole_layer: as in `squant_codes`.

    Returns:
        The codes of each layer, in the order of `xs`.
    """
    if not xs:
        return []
    whole = whole_layer if whole_layer is not None else xs[0].device.type != "cpu"
    if not whole:
        return _squant_blocked_many(xs, tmin, tmax, mode)
    mode = _parse_mode(mode)
    groups: dict[int, list[int]] = {}  # kernel length -> layers
    out: list[torch.Tensor] = [torch.empty(0)] * len(xs)
    for i, x in enumerate(xs):
        if x.dim() >= 2 and x.numel():
            groups.setdefault(x[0, 0].numel(), []).append(i)
        else:  # empty, or an error to raise as squant_codes does
            out[i] = squant_codes(x, tmin, tmax, mode, whole_layer=True)
    for klen, members in groups.items():
        x3s = [xs[i].detach().reshape(xs[i].shape[0], xs[i].shape[1], -1).to(torch.float32) for i in members]
        kernel = mode in (SquantMode.EK, SquantMode.EKC) and klen > 1
        channel = mode in (SquantMode.EC, SquantMode.EKC)
        for i, codes in zip(members, _squant_dense(x3s, int(tmin), int(tmax), kernel, channel), strict=True):
            out[i] = codes.view(xs[i].shape)
    return out


def _squant_blocked_many(
    xs: Sequence[torch.Tensor], tmin: int, tmax: int, mode: SquantMode | str
) -> list[torch.Tensor]:
    """The blocked path of `squant_codes_many`: layers of fewer than _BLOCK_ELEMENTS weights with the same
    shape past the output channels and the same dtype are concatenated along the output channels, up to
    _BLOCK_ELEMENTS, and rounded by one `squant_codes` call (channels are independent, so the codes are
    the same); each layer's codes are a view of that call's result. Other layers are rounded alone."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(xs)
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = {}
    for i, x in enumerate(xs):
        if x.dim() >= 2 and 0 < x.numel() < _BLOCK_ELEMENTS:
            groups.setdefault((tuple(x.shape[1:]), x.dtype), []).append(i)
        else:  # large, empty, or an error to raise as squant_codes does
            out[i] = squant_codes(x, tmin, tmax, mode, whole_layer=False)
    for members in groups.values():
        start = 0
        while start < len(members):
            stop, size = start + 1, xs[members[start]].numel()
            while stop < len(members) and size + xs[members[stop]].numel() <= _BLOCK_ELEMENTS:
                size += xs[members[stop]].numel()
                stop += 1
            batch = members[start:stop]
            if len(batch) == 1:
                out[batch[0]] = squant_codes(xs[batch[0]], tmin, tmax, mode, whole_layer=False)
            else:
                stacked = torch.cat([xs[i].detach() for i in batch])
                codes = squant_codes(stacked, tmin, tmax, mode, whole_layer=False)
                for i, part in zip(batch, codes.split([xs[i].shape[0] for i in batch]), strict=True):
                    out[i] = part
            start = stop
    return out


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def _channel_blocks(oc: int, per_channel: int) -> list[tuple[int, int]]:
    """[start, stop) of blocks of about _BLOCK_ELEMENTS elements, none of a single channel if oc > 1.

    A float32 sum over the rows of a one-row tensor may be split across threads, which changes its
    rounding; with two rows or more torch sums each row in one piece, like the reference's sum over all
    channels at once.
    """
    block = max(2, _BLOCK_ELEMENTS // per_channel)
    bounds = [*range(0, oc, block), oc]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def _direction(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: flip up (sum < 0; a zero sum flips down), ``k = round_half_even(|s|)`` and the step +-1."""
    up = s < 0
    k = s.abs().round().to(torch.int64)
    step = up.to(torch.float32).mul_(2).sub_(1)
    return up, k, step


def _priority_bits(
    e0: torch.Tensor, r0: torch.Tensor, step: torch.Tensor, tmin: int, tmax: int
) -> torch.Tensor:
    """Float32 bits (as int32, +0 for non-candidates) of the priority in the group's direction list.

    The priority is |e0| (``e0 = r0 - x``, ``r0 = round(x)``) for a candidate, else 0. Up candidates
    (step +1) have ``x > r0`` and ``x < tmax``; down candidates (step -1) ``x < r0`` and ``x > tmin``. With
    ``lim`` the bound of the direction, ``min(-step * e0, step * (lim - r0))`` is |e0| for a candidate and
    <= 0 otherwise (both terms are exact). `step` broadcasts against `e0`.
    """
    lim_step = (step + 1).mul_(0.5 * (tmax + tmin)).sub_(tmin)  # tmax for up, -tmin for down
    d = e0 * -step
    torch.minimum(d, torch.addcmul(lim_step, r0, step, value=-1), out=d)
    return d.view(torch.int32).clamp_min_(0)  # negative floats (and -0.0) have negative bits


def _priority(e0: torch.Tensor, r0: torch.Tensor, step: torch.Tensor, tmin: int, tmax: int) -> torch.Tensor:
    """The priority of `_priority_bits` as float32 (>= +0)."""
    return _priority_bits(e0, r0, step, tmin, tmax).view(torch.float32)


def _new_rounding(x: torch.Tensor, step: torch.Tensor, tmin: int, tmax: int) -> torch.Tensor:
    """Rounding of flipped elements: one step from round(x) for a candidate of that direction, else round(x)."""
    r0 = torch.round(x)
    return r0 + step * (_priority(r0 - x, r0, step, tmin, tmax) > 0)


# ----------------------------------------------------------------------------------------------------------
# Kernel stage


@dataclasses.dataclass
class _KernelResult:
    """The kernel stage's output: rounding and error of every element, and each kernel's hand-off."""

    r: torch.Tensor  # (G, L) rounding after the flips (not clamped yet)
    e: torch.Tensor  # (G, L) error the reference carries on (0 after a no-op flip)
    h_pos: torch.Tensor  # (G,) index of the hand-off inside its kernel
    h_pri: torch.Tensor  # (G,) its priority for the channel stage
    h_up: torch.Tensor  # (G,) True: it joins the up list, False: the down list


def _kernel_stage(
    x: np.ndarray,
    r: np.ndarray,
    e: np.ndarray,
    codes: np.ndarray,
    h_pos: np.ndarray,
    h_pri: np.ndarray,
    h_up: np.ndarray,
    tmin: int,
    tmax: int,
) -> None:
    """The kernel stage on the kernels `x` (G, L), L <= 16, on the CPU (numpy arrays sharing the tensors'
    memory: numpy's elementwise comparisons, selections and index lists cost a fraction of torch's here).

    `r` and `e` (G, L) float32 are scratch; on return `e` holds the errors after the stage. Writes the
    clamped codes into `codes` (G, L) int32 and each kernel's hand-off into `h_pos` (G,) int32, `h_pri` (G,)
    float32 and `h_up` (G,) bool. The kernels this fast path cannot order are redone from exact stable ranks
    (`_kernel_stage_stable`). The transposed errors, keys and order live in the workspace. The caller
    silences numpy's invalid-value warnings (Inf - Inf, reported as NonFiniteWeightError).
    """
    g, klen = x.shape
    np.rint(x, out=r)  # (G, L) r0, half to even like torch.round
    np.subtract(r, x, out=e)  # e0 = r0 - x, exact (Inf - Inf: NaN, reported below)
    # The rest works on the errors transposed to (L, G): every row is contiguous, and a per-kernel value
    # broadcasts along it.
    et = _workspace.array("et", (klen, g), np.float32)
    np.copyto(et, e.T)  # (L, G)
    s = _kernel_sums(e, et)  # (G,) the reference's float32 sum over each kernel (never -0.0)
    if not np.isfinite(s.sum()):  # |s| <= L / 2 for finite x; NaN where x is NaN or Inf
        raise NonFiniteWeightError(_NON_FINITE)
    up = s < 0  # flip up (a zero sum flips down)
    top = min(_FAST_K + 2, klen)  # positions of the order that the sorting network finds
    step = up.astype(np.float32)
    step *= 2
    step -= 1  # (G,) +-1

    # Keys (uint16). In the kernel's direction an element's signed priority is -e0 (up) or e0 (down), in
    # [-0.5, 0.5]; it is > 0 for a candidate (the range is checked below). Scaled by _KEY_SCALE and added to
    # _KEY_MAGIC, a float32 in [2^23, 2^24) whose mantissa (the low 16 bits) is 32768 + round(scaled): a
    # non-decreasing function of the priority, > 32768 + 15 only for a candidate. A key is that mantissa
    # with its low 4 bits replaced by 15 - index: its class (mantissa >> 4) orders the priorities where
    # two classes differ, equal classes are ordered by index (unique keys), and class >= _CANDIDATE_CLASS
    # implies a candidate.
    ett = torch.from_numpy(et)
    torch.addcmul(_KEY_MAGIC_T, ett, torch.from_numpy(step * np.float32(-_KEY_SCALE)), out=ett)
    keys = _workspace.array("keys", (klen + 1 + top, g), np.uint16)  # the keys, a spare row, the order
    key = keys[:klen]
    np.copyto(key, et.view(np.uint32), casting="unsafe")  # the low 16 bits
    key |= 15
    key ^= _INDEX16[:klen]
    beyond = _beyond_range(x, tmin, tmax)
    if beyond.size:  # x above tmax is no up candidate, x below tmin no down candidate: class 0
        kern, pos = np.divmod(beyond, klen)
        sel = np.flatnonzero(up[kern] == (x.reshape(-1)[beyond] > tmax))
        key[pos[sel], kern[sel]] = 15 - pos[sel]

    # The first `top` keys of every kernel's order (descending keys) by a sorting network over the rows
    # (it overwrites the keys).
    srt = keys[klen + 1 :]  # (top, G): position t of the order
    rows = list(keys)
    for is_max, a, b, o in _network_program(klen, top):
        (np.maximum if is_max else np.minimum)(rows[a], rows[b], out=rows[o])

    # Flips: positions 0 .. k-1 of the order; hand-off (order[k-1] on overshoot k >= |s|, else order[k]) at
    # position `at`. The key order is the reference's (stable) order at positions 0 .. at if these hold
    # candidates of strictly decreasing priorities, and the priority at `at` is above the next one's (or
    # the kernel ends there). Where neighbouring classes differ, so do the priorities. Kernels with a
    # position t <= at that holds no sure candidate, which flip more than _FAST_K elements, or with a zero
    # sum (their hand-off is order[-1]), are redone; so are those where three positions in a row share a
    # class. Two positions t, t + 1 (t <= at) that share a class are ordered by their exact priorities.
    k = np.rint(np.abs(s))  # (G,) float32 flips per kernel
    kk = k.astype(np.int32)
    over = k >= np.abs(s)
    at = kk - over  # (G,) int32, -1 where s == 0
    nb = min(_FAST_K + 1, top)  # positions that can be the hand-off (at <= _FAST_K)
    relevant = _POSITION[:nb] <= at  # (nb, G)
    low = srt[:nb] < _CANDIDATE_CLASS << 4
    low &= relevant
    clash = low.any(0)
    clash |= at < 0
    clash |= kk > _FAST_K
    ne = min(nb, top - 1)
    tie = np.zeros((nb, g), dtype=bool)  # position t shares its class with t + 1: as keys are unique and
    np.less_equal(srt[:ne], srt[1 : ne + 1] | 15, out=tie[:ne])  # descending, srt[t] <= srt[t + 1] | 15
    tid = np.flatnonzero(tie & relevant)  # t * G + kernel (a few per 1000 kernels)
    if tid.size:
        kern = tid % g
        # three in a row, or t + 2 is not in `srt` (the kernel has more elements): redo
        nxt = tid + g
        known = nxt < ne * g
        clash[kern[np.where(known, tie.reshape(-1)[np.minimum(nxt, ne * g - 1)], top < klen)]] = True
        flat_srt = srt.reshape(-1)
        key_a, key_b = flat_srt[tid], flat_srt[tid + g]
        base = kern * klen + 15
        swap = np.abs(np.take(e, base - (key_b & 15))) > np.abs(np.take(e, base - (key_a & 15)))  # |e0|
        flat_srt[tid[swap]] = key_b[swap]
        flat_srt[tid[swap] + g] = key_a[swap]

    # Flips: position 0 of every kernel, with a step of 0 where k == 0 (adding +-0.0 changes no error, none
    # is -0.0, nor any code), and positions 1 .. k-1 of the few kernels with k >= 2.
    starts = _row_starts(g, klen)
    flat = starts - (srt[0] & 15)
    flat += 15  # kernel * L + index of the element at position 0
    flats, steps = [flat], [(kk > 0) * step]
    kern2 = kern = np.flatnonzero(kk > 1)  # (few) kernels that flip positions 1 and up
    for t in range(1, min(_FAST_K, top)):
        if t > 1:
            kern = kern[kk[kern] > t]
        flat = kern * klen
        flat += 15
        flat -= np.take(srt[t], kern) & 15
        flats.append(flat)
        steps.append(np.take(step, kern))
    ft, st = torch.from_numpy(np.concatenate(flats)), torch.from_numpy(np.concatenate(steps))
    torch.from_numpy(e).view(-1).scatter_add_(0, ft, st)  # e0 + step (no index twice)
    torch.from_numpy(r).view(-1).scatter_add_(0, ft, st)  # r0 + step

    # Hand-off: its priority is |current error|; it joins the opposite list on overshoot. Its key is
    # srt[at]: srt[0] or srt[1] selected by a mask (a gather costs several times more), then the few others.
    mask = (at == 0).astype(np.uint16)
    np.negative(mask, out=mask)  # 0xFFFF where at == 0
    hk = srt[0] ^ srt[1]
    hk &= mask
    hk ^= srt[1]
    rare = kern2[at[kern2] > 1]  # (at <= k)
    if rare.size:
        hk[rare] = np.take(srt, np.minimum(at[rare], top - 1) * g + rare)
    hk &= 15
    np.subtract(15, hk, out=h_pos)
    np.abs(np.take(e, starts + h_pos), out=h_pri)
    np.not_equal(up, over, out=h_up)
    # A candidate's flip stays in [tmin, tmax] (a flip of any other element is redone below), so only the
    # elements beyond that range can need the clamp.
    if beyond.size:
        rf = r.reshape(-1)
        rf[beyond] = np.clip(rf[beyond], tmin, tmax)
    np.copyto(codes, r, casting="unsafe")  # exact integers
    ids = np.flatnonzero(clash)
    if ids.size:
        _kernel_stage_stable(x[ids], s[ids], tmin, tmax, ids, codes, e, h_pos, h_pri, h_up)


def _row_starts(rows: int, length: int) -> np.ndarray:
    """Flat index of the first element of each row of a (rows, length) array (cached per length)."""
    starts = _ROW_STARTS.get(length)
    if starts is None or starts.size < rows:
        starts = np.arange(max(rows, 1 << 16), dtype=np.int64) * length
        _ROW_STARTS[length] = starts
    return starts[:rows]


_ROW_STARTS: dict[int, np.ndarray] = {}
# `_beyond_range` scans flags 8 at a time from this many elements on (below, two comparisons cost less).
_BEYOND_SCAN_MIN = 1 << 17


def _beyond_range(x: np.ndarray, tmin: int, tmax: int) -> np.ndarray:
    """Flat indices of the elements of `x` outside [tmin, tmax] (few: a min/max grid puts at most a
    channel's extremes there). The two comparisons are scanned 8 bytes at a time, as np.flatnonzero on a
    bool array is several times slower than the comparison."""
    n = x.size
    if n < _BEYOND_SCAN_MIN:
        return np.flatnonzero((x > tmax) | (x < tmin))
    words = -(-n // 8)
    flags = _workspace.array("flags", (2, words * 8), bool)
    flags[:, n:] = False
    np.greater(x.reshape(-1), tmax, out=flags[0, :n])
    np.less(x.reshape(-1), tmin, out=flags[1, :n])
    w = flags.view(np.uint64)  # (2, words)
    hit = np.flatnonzero((w[0] | w[1]) != 0)  # (numpy's nonzero is fast on bool arrays only)
    if not hit.size:
        return hit
    near = (hit[:, None] * 8 + np.arange(8)).reshape(-1)
    return near[flags[0, near] | flags[1, near]]


def _kernel_stage_stable(
    x: np.ndarray,
    s: np.ndarray,
    tmin: int,
    tmax: int,
    ids: np.ndarray,
    codes: np.ndarray,
    e: np.ndarray,
    h_pos: np.ndarray,
    h_pri: np.ndarray,
    h_up: np.ndarray,
) -> None:
    """The kernel stage of the kernels `x` (n, L) with error sums `s` (n,) from exact stable ranks (what
    `_kernel_stage_ranked` does with ``stable=True``, in numpy for the few kernels `_kernel_stage` leaves):
    writes rows `ids` of `codes`, `e` (G, L) and of the hand-offs `h_pos`, `h_pri`, `h_up` (G,)."""
    klen = x.shape[1]
    r0 = np.rint(x)
    e0 = r0 - x
    up = s < 0
    k = np.rint(np.abs(s))  # (n,) float32
    over = k >= np.abs(s)
    step = up.astype(np.float32)
    step *= 2
    step -= 1
    lim_step = (step + 1) * np.float32(0.5 * (tmax + tmin)) - np.float32(tmin)  # tmax for up, -tmin for down
    step = step[:, None]  # (n, 1)
    pri = np.minimum(e0 * -step, lim_step[:, None] - r0 * step)  # |e0| for a candidate, <= 0 otherwise
    pbits = pri.view(np.int32)  # negative floats (and -0.0) have negative bits
    cand = pbits > 0
    key = np.maximum(pbits, 0).astype(np.int64)
    key *= 16
    key += _DESCENDING_INDEX[:klen]  # unique; an earlier index wins ties
    desc = np.sort(key, axis=1)[:, ::-1].reshape(-1)  # each kernel's keys in descending order
    first = np.arange(0, desc.size, klen)  # (n,) where each kernel's keys start in `desc`
    kk = k.astype(np.intp)
    flip = key >= desc[first + np.maximum(kk - 1, 0)][:, None]  # the first k of the order (unique keys)
    flip &= (kk > 0)[:, None]
    moved = flip & cand
    r = r0 + moved * step  # (a step of 0 where not moved)
    e_new = e0 + moved * step
    e_new[flip > cand] = 0  # a flip of a non-candidate: no move, error 0
    np.maximum(r, tmin, out=r)
    np.minimum(r, tmax, out=r)
    codes[ids] = r
    e[ids] = e_new
    target = (kk - over) % klen  # order[k-1] on overshoot (order[-1] if k == 0), else order[k]
    pos = (key == desc[first + target][:, None]).argmax(1)
    h_pos[ids] = pos
    h_pri[ids] = np.abs(e_new.reshape(-1)[first + pos])
    h_up[ids] = up != over


def _kernel_sums(e: np.ndarray, et: np.ndarray) -> np.ndarray:
    """Float32 sums over the rows of `e` (G, L) exactly as ``torch.sum(e, 1)`` adds them (the reference's
    sums), from its transpose `et` (L, G) where `_sum_order` found torch's order of additions (one add per
    row of `et`, far cheaper than torch's reduction over rows of a few elements), else by torch."""
    order = _sum_order(e.shape[1])
    if order is None:
        return torch.from_numpy(e).sum(1).numpy()
    s = et[order[0]].copy()
    for j in order[1:]:
        s += et[j]
    return s


@functools.cache
def _sum_order(klen: int) -> tuple[int, ...] | None:
    """The order in which ``torch.sum(e, 1)`` adds the `klen` elements of a float32 row on this machine,
    if it is one that probe rows of widely spread magnitudes confirm bit for bit: one by one, or (a row
    longer than a vector of 8 floats but shorter than two) the elements after the first 8, then the first 8
    one by one. None (use torch) otherwise, e.g. for another vector width."""
    gen = torch.Generator().manual_seed(0)
    probe = (torch.rand(4096, klen, generator=gen) - 0.5) * torch.exp2(
        torch.randint(-24, 2, (4096, klen), generator=gen).float()
    )
    expected = probe.sum(1).numpy()
    pt = probe.numpy().T
    candidates = [tuple(range(klen))]
    if 8 < klen < 16:
        candidates.append((*range(8, klen), *range(8)))
    for order in candidates:
        s = pt[order[0]].copy()
        for j in order[1:]:
            s += pt[j]
        if np.array_equal(s, expected):
            return order
    return None


# Index of each element of a kernel (at most 16), a column: ``key ^ index`` sets the key's low 4 bits to
# 15 - index, the tie-break of the kernel stage's keys.
_INDEX16 = np.arange(16, dtype=np.uint16)[:, None]
# 15 - index of each element of a kernel: the tie-break of `_kernel_stage_stable`'s keys.
_DESCENDING_INDEX = np.arange(15, -1, -1, dtype=np.int64)
# Positions in the kernel stage's order, a column.
_POSITION = np.arange(16, dtype=np.int32)[:, None]
_INT32_MIN = np.int32(-(2**31))
# Kernel stage keys: priorities in [-0.5, 0.5] times _KEY_SCALE (so in [-32752, 32752]) plus _KEY_MAGIC
# (2^23 + 32768) are float32 in [2^23, 2^24), whose mantissas count units of 1: 32768 + the rounded scaled
# priority, in [16, 65520]. Classes (mantissa >> 4) from _CANDIDATE_CLASS up hold positive priorities only.
_KEY_SCALE = 16 * 4094
_KEY_MAGIC_T = torch.tensor(2.0**23 + 2**15, dtype=torch.float32)
_CANDIDATE_CLASS = 2**11 + 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Best known sorting network for 9 inputs (25 comparators in 7 layers; Floyd), for the 3x3 kernel.
_NETWORK_9 = tuple(
    pair
    for layer in (
        ((0, 3), (1, 7), (2, 5), (4, 8)),
        ((0, 7), (2, 4), (3, 8), (5, 6)),
        ((0, 2), (1, 3), (4, 5), (7, 8)),
        ((1, 4), (3, 6), (5, 7)),
        ((0, 1), (2, 4), (3, 5), (6, 8)),
        ((2, 3), (4, 5), (6, 7)),
        ((1, 2), (3, 4), (5, 6)),
    )
    for pair in layer
)


@functools.cache
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of a sorting network for n inputs: the best known one for 9, else
    Batcher's odd-even merge sort (padded to a power of two, then pruned)."""
    if n == 9:
        return _NETWORK_9
    size = 1 << max(0, (n - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.cache
def _selection_steps(n: int, top: int) -> tuple[tuple[int, int, bool, bool, bool, bool], ...]:
    """`_selection_plan` with, per comparator, whether its max / min is the last value written to an
    output position (< top): (i, j, max?, min?, last max?, last min?)."""
    plan = _selection_plan(n, top)
    last = {}
    for step, (i, j, hi, lo) in enumerate(plan):
        if hi:
            last[i] = (step, "hi")
        if lo:
            last[j] = (step, "lo")
    return tuple(
        (i, j, hi, lo, i < top and last.get(i) == (step, "hi"), j < top and last.get(j) == (step, "lo"))
        for step, (i, j, hi, lo) in enumerate(plan)
    )


@functools.cache
def _selection_plan(n: int, top: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The sorting network for n inputs pruned to what the first `top` outputs need: (i, j, max?, min?)."""
    need, plan = set(range(top)), []
    for i, j in reversed(_sorting_network(n)):
        hi, lo = i in need, j in need
        if hi or lo:
            plan.append((i, j, hi, lo))
            need |= {i, j}
    return tuple(reversed(plan))


@functools.cache
def _network_program(n: int, top: int) -> tuple[tuple[bool, int, int, int], ...]:
    """`_selection_steps` as elementwise operations on rows: (max?, input a, input b, output), each an
    index into n input rows (overwritten), one spare row (index n) and the `top` output rows (n + 1 + t).
    Each value goes to its output row on its last write, else into a row that holds no live value."""
    slot = list(range(n))  # the row that holds wire i
    free = [n]
    ops: list[tuple[bool, int, int, int]] = []
    for i, j, hi, lo, last_hi, last_lo in _selection_steps(n, top):
        a, b = slot[i], slot[j]
        out_i, out_j = n + 1 + i, n + 1 + j
        if hi and lo:
            if last_hi and last_lo:
                ops += [(True, a, b, out_i), (False, a, b, out_j)]
                free += [a, b]
            elif last_hi:
                ops += [(True, a, b, out_i), (False, a, b, b)]  # the min in place of b
                free.append(a)
                out_j = b
            elif last_lo:
                ops += [(False, a, b, out_j), (True, a, b, a)]  # the max in place of a
                free.append(b)
                out_i = a
            else:
                out_i, out_j = a, free.pop()
                ops += [(False, a, b, out_j), (True, a, b, a)]
                free.append(b)
            slot[i], slot[j] = out_i, out_j
        elif hi:
            out = out_i if last_hi else a
            ops.append((True, a, b, out))
            free += [b, a] if last_hi else [b]
            slot[i] = out
        elif lo:
            out = out_j if last_lo else b
            ops.append((False, a, b, out))
            free += [a, b] if last_lo else [a]
            slot[j] = out
    return tuple(ops)


def _kernel_stage_ranked(
    xg: torch.Tensor, s: torch.Tensor | None, tmin: int, tmax: int, stable: bool
) -> _KernelResult:
    """The kernel stage from explicit ranks: stable ranks, or those of ``torch.sort`` as in the reference.

    Used for kernels longer than 16 elements (``stable=False``), for the kernels the key classes of
    `_kernel_stage` cannot order (``stable=True``) and for every kernel on the whole-layer path. `s` (G,)
    are the kernels' error sums (None: computed here).
    """
    g, klen = xg.shape
    r0 = torch.round(xg)
    e0 = r0 - xg
    if s is None:
        s = e0.sum(1)  # (G,) the reference's float32 reduction over each kernel
    up, k, step = _direction(s)
    st = step.unsqueeze(1)
    pbits = _priority_bits(e0, r0, st, tmin, tmax)  # (G, L)
    if stable:
        key = pbits.to(torch.int64) * 16 + torch.arange(15, 15 - klen, -1, device=xg.device)
        rank = (key.unsqueeze(1) > key.unsqueeze(2)).sum(2)  # (G, L): how many keys are above
    else:
        order = _reference_order(pbits.view(torch.float32))  # the reference's rows
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(klen, device=xg.device).expand(g, klen)
        )
    flip = rank < k.unsqueeze(1)
    cand = pbits > 0
    e = torch.where(flip, torch.where(cand, e0 + st, 0.0), e0)
    r = torch.where(flip & cand, r0 + st, r0)
    over = k >= s.abs()
    target = torch.where(over, torch.where(k == 0, klen - 1, k - 1), k)
    h_pos = (rank == target.unsqueeze(1)).to(torch.int8).argmax(1)
    h_pri = e.gather(1, h_pos.unsqueeze(1)).squeeze(1).abs()
    return _KernelResult(r, e, h_pos, h_pri, up ^ over)


# ----------------------------------------------------------------------------------------------------------
# Channel stage


def _flip_threshold(values: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `values` (n, M) float32 >= +0: the value at position k of its descending order, so that the
    first k are those above it, and whether that is ambiguous (k >= M, or the values at positions k-1 and k
    are equal: the reference's sort decides those rows). The threshold is inf (no flips) where k == 0 or
    ambiguous."""
    m = values.shape[1]
    # Ascending; position t of the descending order is column M-1-t. Non-negative floats are ordered like
    # their bits, and numpy sorts int32 faster than float32.
    asc_bits = _workspace.array("sorted", values.shape, np.int32)
    np.copyto(asc_bits, values.view(np.int32))
    asc_bits.sort(axis=1)
    asc = asc_bits.view(np.float32)
    kk = m - 1 - np.minimum(k, m - 1).astype(np.intp)
    rows = np.arange(values.shape[0])
    v_k = asc[rows, kk]
    ambiguous = (k > 0) & ((k >= m) | (asc[rows, np.minimum(kk + 1, m - 1)] == v_k))
    v_k[(k == 0) | ambiguous] = np.inf
    return v_k, ambiguous


def _channel_stage_handoffs(
    xb: torch.Tensor,
    ob: torch.Tensor,
    s: np.ndarray,
    h_pos: np.ndarray,
    h_pri: np.ndarray,
    h_up: np.ndarray,
    tmin: int,
    tmax: int,
) -> None:
    """Channel stage after a kernel stage; only the one hand-off per kernel has a nonzero priority.

    `s` (n,) float32 is each channel's current error sum; `h_pos`, `h_pri`, `h_up` (n, IC) give each
    kernel's hand-off: its index in the kernel, priority and list. A flip sets the element to its initial
    rounding moved one step if it was an initial candidate of that direction, else to its initial rounding.
    """
    n, ic, klen = xb.shape
    up = s < 0
    k = np.rint(np.abs(s))  # (n,) float32 flips per channel
    if not k.any():
        return
    step = up.astype(np.float32) * 2 - 1  # (n,)
    pri = _workspace.array("pri", h_pri.shape, np.float32)  # (n, IC): the nonzero entries of the list
    np.multiply(h_pri, h_up == up[:, None], out=pri)
    # The first k of the order are the priorities above the one at position k, unless those two are equal.
    v_k, ambiguous = _flip_threshold(pri, k)  # the ambiguous ones are done below
    rows = np.flatnonzero(pri > v_k[:, None])  # flat kernel ids
    if rows.size:
        flat = rows * klen + h_pos.ravel()[rows]  # the hand-offs' elements
        xs, st = xb.numpy().ravel()[flat], step[rows // ic]
        r0 = np.rint(xs)
        # A candidate of the direction moves one step (`_priority_bits`: x < tmax for up, x > tmin for down)
        # a non-candidate is set to its initial rounding.
        cand = np.where(st > 0, (r0 < xs) & (xs < tmax), (r0 > xs) & (xs > tmin))
        ob.numpy().ravel()[flat] = np.clip(r0 + st * cand, tmin, tmax)
    if ambiguous.any():
        chans_n = np.flatnonzero(ambiguous)
        chans_t = torch.from_numpy(chans_n)
        kt, stept = torch.from_numpy(k[chans_n]).long(), torch.from_numpy(step[chans_n])
        full = torch.zeros(chans_n.size, ic, klen, dtype=torch.float32)
        pri_t = torch.from_numpy(pri[chans_n])
        pos_t = torch.from_numpy(h_pos[chans_n]).long()
        full.scatter_(2, pos_t.unsqueeze(2), pri_t.unsqueeze(2))  # the reference's priority rows
        ridx, cols = _first_k_sorted(full.view(chans_t.numel(), -1), kt)
        new = _new_rounding(xb.reshape(n, -1)[chans_t[ridx], cols], stept[ridx], tmin, tmax)
        ob.view(n, -1)[chans_t[ridx], cols] = new.clamp_(tmin, tmax).to(torch.int32)


def _reference_order(p: torch.Tensor) -> torch.Tensor:
    """Indices of ``torch.sort(p, dim=1, descending=True)`` on the CPU, as the reference ran it.

    Equal values are ordered by the sort's algorithm, which differs between devices (a GPU's sort orders
    ties otherwise: 12 of the golden cases differ there), so rows are sorted on the CPU wherever `p` lives.
    Only the rows whose order depends on ties come here, and kernels of more than 16 elements (small layers).
    """
    if p.device.type == "cpu":
        return torch.sort(p, dim=1, descending=True).indices
    return torch.sort(p.cpu(), dim=1, descending=True).indices.to(p.device)


def _first_k_sorted(p: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the first k elements of ``torch.sort(p, descending=True)`` of each row of `p`, the
    very call of the reference, so that equal priorities are taken in its order."""
    order = _reference_order(p)[:, : int(k.max())]  # (R, kmax)
    ridx, pos = (torch.arange(order.shape[1], device=p.device) < k.unsqueeze(1)).nonzero(as_tuple=True)
    return ridx, order[ridx, pos]


# ----------------------------------------------------------------------------------------------------------
# Whole layers at once (accelerators)
#
# On a GPU the cost of the blocked path above is its number of operations and host synchronisations (each
# launch costs microseconds whatever its size), not memory traffic. So there every stage runs on whole
# layers in a fixed, short sequence of tensor operations: the kernel stage from exact stable ranks
# (L^2 comparisons per kernel of L <= 16 elements; the reference's sort of the rows beyond), the channel
# stage from a full sort of each channel's priorities instead of a top-k whose size needs k.max() on the
# host. Layers with kernels of one length share one kernel stage (kernels are independent), and those with
# the same number of input channels share one channel stage (channels are independent). The only host
# synchronisation is at the end: are there NaN/Inf inputs, or channels whose boundary is a tie (rare), which
# are then redone with the reference's sort as on the CPU path.


@dataclasses.dataclass
class _ChannelTies:
    """What redoing the tied channels of one channel stage needs, kept until the host synchronisation."""

    x3: torch.Tensor  # (n, IC, L) integer-domain input
    out: torch.Tensor  # (n, IC, L) int32 codes, a view of the result
    p: torch.Tensor  # (n, IC*L) the priorities the reference sorts (hand-offs scattered into zeros, or all)
    k: torch.Tensor  # (n,) flips per channel
    step: torch.Tensor  # (n,) +-1
    ambiguous: torch.Tensor  # (n,) bool: channels whose first k elements depend on the sort's tie order
    pos: torch.Tensor | None  # (n, IC, 1) hand-off positions after a kernel stage, else None
    pri: torch.Tensor | None  # (n, IC) hand-off priorities after a kernel stage, else None

    def redo(self, tmin: int, tmax: int) -> None:
        chans = self.ambiguous.nonzero().squeeze(1)
        n, ic, klen = self.x3.shape
        if self.pos is not None and self.pri is not None:  # the reference's priority rows, mostly zeros
            p = torch.zeros(chans.numel(), ic, klen, dtype=torch.float32, device=self.x3.device)
            p = p.scatter_(2, self.pos[chans], self.pri[chans].unsqueeze(2)).view(chans.numel(), -1)
        else:
            p = self.p[chans]
        ridx, cols = _first_k_sorted(p, self.k[chans])
        rows = chans[ridx]
        new = _new_rounding(self.x3.reshape(n, -1)[rows, cols], self.step[rows], tmin, tmax)
        self.out.view(n, -1)[rows, cols] = new.clamp_(tmin, tmax).to(torch.int32)


def _squant_dense(
    xs: Sequence[torch.Tensor], tmin: int, tmax: int, kernel: bool, channel: bool
) -> list[torch.Tensor]:
    """SQuant codes of layers `xs` (each (OC, IC, L) float32, one L) with one host synchronisation.

    Bit-identical to the blocked path (the tests run both on the golden vectors); any device.
    """
    klen = xs[0].shape[2]
    by_ic: dict[int, list[int]] = {}  # layers of one input width are adjacent, so they share a channel stage
    for i, x in enumerate(xs):
        by_ic.setdefault(x.shape[1], []).append(i)
    order = [i for members in by_ic.values() for i in members]
    flat = torch.cat([xs[i].reshape(-1) for i in order]) if len(xs) > 1 else xs[0].reshape(-1)
    bad = ~(flat.abs().amax() < float("inf"))  # () NaN or Inf anywhere; checked at the synchronisation
    flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)  # until then: no wild indices
    out = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    ks = None
    if kernel:
        ks = _kernel_stage_ranked(flat.view(-1, klen), None, tmin, tmax, stable=klen <= _STABLE_SORT_MAX)
        out.view(-1, klen).copy_(ks.r.clamp(tmin, tmax))
    elif not channel:
        out.copy_(torch.round(flat).clamp_(tmin, tmax))
    ties: list[_ChannelTies] = []
    start = 0
    for ic, members in by_ic.items():
        n = sum(xs[i].shape[0] for i in members)
        stop = start + n * ic * klen
        x3, ob = flat[start:stop].view(n, ic, klen), out[start:stop].view(n, ic, klen)
        if channel and ks is not None:
            g0, g1 = start // klen, stop // klen
            part = _KernelResult(ks.r[g0:g1], ks.e[g0:g1], ks.h_pos[g0:g1], ks.h_pri[g0:g1], ks.h_up[g0:g1])
            ties.append(_channel_stage_handoffs_dense(x3, ob, part, tmin, tmax))
        elif channel:
            ties.append(_channel_stage_full(x3, ob, tmin, tmax, _boundary_sorted))
        start = stop
    flags = torch.stack([bad, *(t.ambiguous.any() for t in ties)]).tolist()  # the one synchronisation
    if flags[0]:
        raise NonFiniteWeightError(_NON_FINITE)
    for t, tied in zip(ties, flags[1:], strict=True):
        if tied:
            t.redo(tmin, tmax)
    parts = out.split([xs[i].numel() for i in order])
    codes: list[torch.Tensor] = [out] * len(xs)
    for i, part in zip(order, parts, strict=True):
        codes[i] = part.view(xs[i].shape)
    return codes


def _channel_stage_handoffs_dense(
    x3: torch.Tensor, ob: torch.Tensor, ks: _KernelResult, tmin: int, tmax: int
) -> _ChannelTies:
    """`_channel_stage_handoffs` on whole layers, flips of untied channels done; tied ones returned."""
    n, ic, _ = x3.shape
    up, k, step = _direction(ks.e.view(n, -1).sum(-1))  # (n,) channel sums after the kernel stage
    pri = ks.h_pri.view(n, ic) * (ks.h_up.view(n, ic) == up.unsqueeze(1))  # (n, IC) the direction's list
    v_k, ambiguous = _boundary_sorted(pri, k)
    flip = (pri > v_k.unsqueeze(1)) & ((k > 0) & ~ambiguous).unsqueeze(1)  # (n, IC)
    pos = ks.h_pos.view(n, ic, 1)
    new = _new_rounding(x3.gather(2, pos).squeeze(2), step.unsqueeze(1), tmin, tmax)  # (n, IC)
    kept = ob.gather(2, pos).squeeze(2)
    ob.scatter_(2, pos, torch.where(flip, new.clamp_(tmin, tmax).to(torch.int32), kept).unsqueeze(2))
    return _ChannelTies(x3, ob, pri, k, step, ambiguous, pos, pri)


def _channel_stage_full(
    x3: torch.Tensor,
    ob: torch.Tensor,
    tmin: int,
    tmax: int,
    boundary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> _ChannelTies:
    """Channel stage on the initial priorities of every element (mode "ec", or Linear / 1x1 conv): the flips
    of untied channels are done; the tied ones are returned to be redone (`_ChannelTies.redo`).

    `boundary` is `_boundary_sorted` (no host sync); the CPU path has its own `_channel_stage_full_cpu`.
    """
    n = x3.shape[0]
    xr = x3.view(n, -1)  # (n, IC*L)
    r = torch.round(xr)
    e = r - xr
    _, k, step = _direction(e.sum(-1))  # (n,)
    p = _priority(e, r, step.unsqueeze(1), tmin, tmax)  # (n, IC*L)
    v_k, ambiguous = boundary(p, k)
    flip = (p > v_k.unsqueeze(1)) & ((k > 0) & ~ambiguous).unsqueeze(1)
    ob.view(n, -1).copy_(torch.addcmul(r, flip, step.unsqueeze(1)).clamp_(tmin, tmax))
    return _ChannelTies(x3, ob, p, k, step, ambiguous, None, None)


def _channel_stage_full_cpu(xb: torch.Tensor, ob: torch.Tensor, tmin: int, tmax: int) -> None:
    """`_channel_stage_full` on the CPU, in numpy, tied channels redone: the codes of channels `xb` (n, IC, L)
    into `ob`."""
    n = xb.shape[0]
    x = xb.reshape(n, -1).numpy()  # (n, M)
    r = _workspace.array("re", (2, *x.shape), np.float32)
    r, e = r[0], r[1]
    np.rint(x, out=r)
    with np.errstate(invalid="ignore"):  # Inf - Inf: NaN, reported below
        np.subtract(r, x, out=e)
    s = torch.from_numpy(e).sum(-1).numpy()  # (n,) the reference's float32 sums over each channel
    if not np.isfinite(s.sum()):  # |s| <= M / 2 for finite x; NaN where x is NaN or Inf
        raise NonFiniteWeightError(_NON_FINITE)
    up = s < 0
    k = np.rint(np.abs(s))  # (n,) float32 flips per channel
    step = (up.astype(np.float32) * 2 - 1)[:, None]  # (n, 1)
    # The priority bits as in `_kernel_stage` (without the key classes): the bits of e0 plus 2^31 (wrapping)
    # in an up channel, then elements beyond the range in the direction and non-candidates (< 0) set to 0.
    pb = e.view(np.int32)  # e is not needed any more
    pb += (s.view(np.int32) & _INT32_MIN)[:, None]
    beyond = _beyond_range(x, tmin, tmax)
    if beyond.size:
        row = beyond // x.shape[1]
        pb.reshape(-1)[beyond[up[row] == (x.reshape(-1)[beyond] > tmax)]] = 0
    torch.from_numpy(pb).clamp_min_(0)
    p = pb.view(np.float32)  # (n, M) |e0| for a candidate, +0.0 otherwise
    v_k, ambiguous = _flip_threshold(p, k)  # the ambiguous ones are redone below
    flips = np.flatnonzero(p > v_k[:, None])  # only candidates (p > 0) flip: they stay in [tmin, tmax]
    r.reshape(-1)[flips] += step[flips // x.shape[1], 0]
    if beyond.size:
        rf = r.reshape(-1)
        rf[beyond] = np.clip(rf[beyond], tmin, tmax)
    np.copyto(ob.view(n, -1).numpy(), r, casting="unsafe")  # exact integers
    if ambiguous.any():
        pt, kt, st = torch.from_numpy(p), torch.from_numpy(k).long(), torch.from_numpy(step[:, 0])
        _ChannelTies(xb, ob, pt, kt, st, torch.from_numpy(ambiguous), None, None).redo(tmin, tmax)


def _boundary_sorted(p: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of `p` (R, M): the value at position k of the descending order, and whether the first k
    elements are not determined by value alone (a tie across positions k-1 and k), from a full sort of each
    row (no k.max() on the host)."""
    top = torch.sort(p, dim=1, descending=True).values  # (R, M)
    kk = k.clamp(max=p.shape[1] - 1).unsqueeze(1)
    v_k = top.gather(1, kk).squeeze(1)
    v_prev = top.gather(1, (kk - 1).clamp(min=0)).squeeze(1)
    ambiguous = (k > 0) & ((k >= p.shape[1]) | (v_prev == v_k))
    return v_k, ambiguous
