"""SQuant rounding: data-free flips of nearest-rounding decisions (docs/algorithms.md 2.2).

SQuant (Guo et al., "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation",
ICLR 2022) approximates the loss increase of a layer by a Hessian made of three parts: element-wise (E),
one constant block per kernel (K) and one per output channel (C). It minimises them one after the other by
"Constrained Absolute Sum of Error" (CASE) flipping: round to nearest (E), then inside every kernel, and then
inside every output channel, flip the ``k = round(|sum of errors|)`` elements whose errors are closest to 0.5
to their other neighbouring integer, and hand one candidate over to the coarser stage (paper Sec. 3.3, Alg. 1).

This restates the reference's pure-PyTorch path, bit-exact with its integer outputs.
``shared/golden/squant/README.md`` states that behaviour: round-half-to-even everywhere (``torch.round``,
``np.rint``), the tie breaking of its sorts, the ``order[-1]`` hand-off of a group whose error sum is exactly
0, no-op flips of elements that are not candidates (the element keeps its initial rounding, its error
becomes 0 and the flip uses up one of the k), and the range: an up candidate lies below tmax, a down
candidate above tmin (so elements beyond [tmin, tmax] are no candidates towards it), and codes are clamped
at the end. All arithmetic is float32, element for element as in the
reference; the group sums are torch's float32 ``torch.sum`` in its order of additions.

On the CPU (`_kernel_then_channel`) the stages are compiled loops (numba, `postquant.rounding.squant_cpu`)
over kernels and channels. Channels are independent, so the kernel stage runs in blocks of whole output
channels (that only saves memory traffic): it writes each block's codes into the result and its errors into
a reused block-sized buffer, where torch sums each channel's errors; then the channel stage runs on the whole
layer. The buffers of a block and the per-kernel hand-offs come from a per-thread workspace kept between
calls (`_Workspace`), so that their pages are not faulted in again for every block and layer. On an
accelerator whole layers are processed at once (`_squant_dense`, at the end): the same rules as tensor
operations, with the same codes.

How the reference's sorts are reproduced:

* Kernel stage, kernels of at most 16 elements. The reference's ``torch.sort(descending=True)`` is an
  insertion sort on rows this short, so it is stable. The compiled kernel stage transposes chunks of kernels
  to (kh*kw, chunk) rows, so that each of its loops runs along the kernels (vector instructions), and gives
  every element its exact rank in its kernel's stable descending order of priorities (``-e0`` in an up
  kernel, ``e0`` in a down kernel, for a candidate; 0 otherwise): the number of elements of higher
  priority, plus those of equal priority and lower index. Ranks below k flip; the hand-off is rank k-1 on
  overshoot (k >= |sum|), rank kh*kw-1 when that k is 0 (the sum is exactly 0: ``order[-1]``), else rank k.
  The kernels' error sums repeat torch's order of additions where probe rows confirm it (`_sum_order`: one
  by one, or as torch's scalar accumulators or one vector of 8 add them), else torch sums them first.
* Kernel stage, larger kernels (5x5, 7x7): ``torch.sort`` of the very same priority rows as the reference, on
  the CPU like the reference (a GPU's sort orders ties differently), and the compiled loop flips in that
  order.
* Channel stage. It is the last stage, so only the set of the first k elements of the order matters. Where
  the k-th and (k+1)-th largest priorities differ, that set is ``{priority > (k+1)-th largest}``, however
  ties are ordered: the compiled loop keeps each channel's k+1 largest priorities (a sort of them on an
  accelerator). After a kernel stage only the one hand-off per kernel has a nonzero priority, so it looks at
  IC values per channel. The rare channels with a tie at the boundary (or k >= IC) are sorted in full with
  ``torch.sort`` on the CPU, as in the reference, so its tie order is kept (`_redo_tied_channels`).
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
from postquant.rounding import squant_cpu

__all__ = ["SquantMode", "squant_codes", "squant_codes_many"]

# Elements per block of output channels: the block's errors stay in the CPU's cache until torch sums them,
# against the fixed cost of a block's calls (on the ResNet-18 shapes, on a loaded 2-core machine, 2^16
# measured about 6% slower, 2^17 2%, 2^18 1%, 2^20 the same).
_BLOCK_ELEMENTS = 1 << 19
# Rows of up to this length are insertion-sorted (stably) by the reference's std::sort.
_STABLE_SORT_MAX = 16


class _Workspace(threading.local):
    """Scratch arrays of the CPU path, kept per thread between calls and grown on demand.

    A fresh array costs a page fault per 4 KiB on its first write (about as much as a pass of arithmetic
    over it) whenever the allocator hands back memory it returned to the system; these buffers are written
    once per block, so keeping them makes that cost independent of what else the process allocates. Arrays
    of up to _WORKSPACE_KEEP_BYTES are kept (about 4 MiB in all on ResNet-18 with the default block size).
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
            synchronisation (fast on a GPU), instead of in cache-sized blocks of channels by compiled loops
            on the CPU (fast on a CPU; a tensor elsewhere is copied there and back). Both give the same
            codes. Default: whole layer on any device but the CPU.

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
    if x3.device.type != "cpu":  # the blocked path runs on the CPU
        return squant_codes(x3.cpu(), tmin, tmax, mode, whole_layer=False).view(x.shape).to(x.device)
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
    """Kernel stage (compiled loops, `squant_cpu.kernel_stage`) in blocks of channels, each block's channel
    error sums taken while its errors are in the cache, then the channel stage on the whole layer if
    `channel`. Writes the codes into `out` (OC, IC, L), on the CPU."""
    oc, ic, klen = x3.shape
    g = oc * ic
    xk, ok = x3.numpy().reshape(g, klen), out.numpy().reshape(g, klen)  # (G, L) kernels
    h_pos = _workspace.array("h_pos", (g,), np.int32)  # (G,) each kernel's hand-off
    h_pri = _workspace.array("h_pri", (g,), np.float32)
    h_up = _workspace.array("h_up", (g,), bool)
    s = np.empty(oc, dtype=np.float32)  # (OC,) channel error sums after the kernel stage
    order = _sum_order(klen) if klen <= _STABLE_SORT_MAX else None
    sum_order = np.array(order or (0,), dtype=np.intp)
    blocks = _channel_blocks(oc, ic * klen)
    loops = squant_cpu.loops()
    e_all = _workspace.array("e", (max(c1 - c0 for c0, c1 in blocks) * ic, klen), np.float32)
    for c0, c1 in blocks:  # blocks of whole output channels, for cache locality only
        g0, g1 = c0 * ic, c1 * ic
        xb, e, cb = xk[g0:g1], e_all[: g1 - g0], ok[g0:g1]
        hand = (h_pos[g0:g1], h_pri[g0:g1], h_up[g0:g1])
        sums = _NO_SUMS
        if order is None:  # torch's order of additions is not known here: its sums, from the errors
            with np.errstate(invalid="ignore"):  # Inf - Inf: NaN, reported below
                np.subtract(np.rint(xb, out=e), xb, out=e)
            sums = torch.from_numpy(e).sum(1).numpy()  # (g1 - g0,)
        if klen > _STABLE_SORT_MAX:  # the reference's sort orders the rows
            if not np.isfinite(sums.sum()):
                raise NonFiniteWeightError(_NON_FINITE)
            loops.kernel_priorities(xb, sums, tmin, tmax, e)
            orders = _reference_order(torch.from_numpy(e)).numpy()
            loops.kernel_stage_ordered(xb, sums, orders, tmin, tmax, cb, e, *hand)
        elif not loops.kernel_stage(xb, sums, sum_order, tmin, tmax, cb, e, *hand):
            raise NonFiniteWeightError(_NON_FINITE)
        if channel:
            s[c0:c1] = torch.from_numpy(e).view(c1 - c0, -1).sum(-1).numpy()  # the reference's float32 sums
    if not channel:
        return
    pos, pri, hup = h_pos.reshape(oc, ic), h_pri.reshape(oc, ic), h_up.reshape(oc, ic)
    ambiguous = np.empty(oc, dtype=bool)
    loops.channel_handoffs(x3.numpy(), out.numpy(), s, pos, pri, hup, tmin, tmax, ambiguous)
    if ambiguous.any():  # the reference's priority rows of those channels: the hand-offs scattered in zeros
        chans = np.flatnonzero(ambiguous)
        up = s[chans] < 0
        full = torch.zeros(chans.size, ic, klen, dtype=torch.float32)
        pri_t = torch.from_numpy(pri[chans] * (hup[chans] == up[:, None]))
        full.scatter_(2, torch.from_numpy(pos[chans]).long().unsqueeze(2), pri_t.unsqueeze(2))
        _, k, step = _direction(torch.from_numpy(s[chans]))
        _redo_tied_channels(x3, out, torch.from_numpy(chans), full.view(chans.size, -1), k, step, tmin, tmax)


def _channel_stage_full_cpu(xb: torch.Tensor, ob: torch.Tensor, tmin: int, tmax: int) -> None:
    """The channel stage on the initial priorities of every element (`squant_cpu.channel_full`), tied
    channels redone: the codes of channels `xb` (n, IC, L) into `ob`, on the CPU."""
    n = xb.shape[0]
    x = xb.numpy().reshape(n, -1)  # (n, M)
    e = _workspace.array("e", x.shape, np.float32)
    with np.errstate(invalid="ignore"):  # Inf - Inf: NaN, reported below
        np.subtract(np.rint(x, out=e), x, out=e)
    s = torch.from_numpy(e).sum(-1).numpy()  # (n,) the reference's float32 sums over each channel
    if not np.isfinite(s.sum()):  # |s| <= M / 2 for finite x; NaN where x is NaN or Inf
        raise NonFiniteWeightError(_NON_FINITE)
    ambiguous = np.empty(n, dtype=bool)
    squant_cpu.loops().channel_full(x, s, tmin, tmax, ob.numpy().reshape(n, -1), ambiguous)
    if ambiguous.any():
        chans = torch.from_numpy(np.flatnonzero(ambiguous))
        xr = xb.reshape(n, -1)[chans]
        r = torch.round(xr)
        _, k, step = _direction(torch.from_numpy(s)[chans])
        p = _priority(r - xr, r, step.unsqueeze(1), tmin, tmax)  # (R, M) the reference's priority rows
        _redo_tied_channels(xb, ob, chans, p, k, step, tmin, tmax)


def _redo_tied_channels(
    x3: torch.Tensor,
    out: torch.Tensor,
    chans: torch.Tensor,
    p: torch.Tensor,
    k: torch.Tensor,
    step: torch.Tensor,
    tmin: int,
    tmax: int,
) -> None:
    """Channel stage of channels `chans` (R,) of `x3` / `out` (n, IC, L) whose first k elements depend on
    the sort's order of ties: the first `k` (R,) of ``torch.sort`` of their priority rows `p` (R, IC*L)
    move `step` (R,), as in the reference. `out` holds those channels' codes before the stage."""
    n = x3.shape[0]
    ridx, cols = _first_k_sorted(p, k)
    rows = chans[ridx]
    new = _new_rounding(x3.reshape(n, -1)[rows, cols], step[ridx], tmin, tmax)
    out.view(n, -1)[rows, cols] = new.clamp_(tmin, tmax).to(torch.int32)


# `squant_cpu.kernel_stage`'s argument for "add each kernel's errors in `sum_order`".
_NO_SUMS = np.empty(0, dtype=np.float32)


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


@functools.cache
def _sum_order(klen: int) -> tuple[int, ...] | None:
    """The order in which ``torch.sum(e, 1)`` adds the `klen` elements of a float32 row on this machine,
    if it is one that probe rows of widely spread magnitudes confirm bit for bit: one by one; or, for a row
    of 5 to 7 elements (torch's four scalar accumulators), the first, those after the fourth, then the
    second to fourth; or, for a row longer than a vector of 8 floats but shorter than two, the elements
    after the first 8, then the first 8. None (use torch) otherwise, e.g. for another vector width."""
    gen = torch.Generator().manual_seed(0)
    probe = (torch.rand(4096, klen, generator=gen) - 0.5) * torch.exp2(
        torch.randint(-24, 2, (4096, klen), generator=gen).float()
    )
    expected = probe.sum(1).numpy()
    pt = probe.numpy().T
    candidates = [tuple(range(klen))]
    if 4 < klen < 8:
        candidates.append((0, *range(4, klen), 1, 2, 3))
    if 8 < klen < 16:
        candidates.append((*range(8, klen), *range(8)))
    for order in candidates:
        s = pt[order[0]].copy()
        for j in order[1:]:
            s += pt[j]
        if np.array_equal(s, expected):
            return order
    return None


def _kernel_stage_ranked(xg: torch.Tensor, tmin: int, tmax: int, stable: bool) -> _KernelResult:
    """The kernel stage of the whole-layer path from explicit ranks: stable ranks (kernels of at most 16
    elements), or those of ``torch.sort`` as in the reference."""
    g, klen = xg.shape
    r0 = torch.round(xg)
    e0 = r0 - xg
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
        _, ic, klen = self.x3.shape
        if self.pos is not None and self.pri is not None:  # the reference's priority rows, mostly zeros
            p = torch.zeros(chans.numel(), ic, klen, dtype=torch.float32, device=self.x3.device)
            p = p.scatter_(2, self.pos[chans], self.pri[chans].unsqueeze(2)).view(chans.numel(), -1)
        else:
            p = self.p[chans]
        _redo_tied_channels(self.x3, self.out, chans, p, self.k[chans], self.step[chans], tmin, tmax)


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
        ks = _kernel_stage_ranked(flat.view(-1, klen), tmin, tmax, stable=klen <= _STABLE_SORT_MAX)
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
