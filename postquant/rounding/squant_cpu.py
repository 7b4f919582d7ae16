"""SQuant's kernel and channel stages on the CPU as compiled loops (numba).

The rules they follow (the reference's, ``shared/golden/squant/README.md``) are stated in
`postquant.rounding.squant`; this module holds the loops. All arithmetic is float32 as in the reference:
``np.rint`` rounds half to even like ``torch.round``, every constant is a float32 so that nothing is
promoted to float64, and no float32 sum is reordered (sums in torch's order come in as arguments or
follow `sum_order`). `loops()` compiles them (numba) and numba caches the machine code on disk.

`kernel_stage` works on chunks of `_CHUNK` kernels transposed to (L, chunk) rows, so that each of its
loops runs along the kernels of a chunk, and the compiler turns it into vector instructions.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Kernels per chunk of `kernel_stage`: its rows (five per element of a kernel) stay in the CPU's cache
# (128 and 512 measured the same).
_CHUNK = 256

_LOOPS: list[Callable[..., Any]] = []
_LOADED: list[types.SimpleNamespace] = []
_LOAD_LOCK = threading.Lock()


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `fn` as one of the loops that `loops()` compiles."""
    _LOOPS.append(fn)
    return fn


def loops() -> types.SimpleNamespace:
    """This module's loops compiled by numba, by name (e.g. ``loops().kernel_stage``); call them through
    it (the module's own names are the plain Python functions until the first call).

    numba is imported on the first call. Each loop is compiled on its first use (a few seconds in all), or
    loaded from numba's disk cache: beside this file, else in numba's user-wide cache directory (or
    NUMBA_CACHE_DIR). Where no cache location is writable, each process compiles its own.
    """
    if _LOADED:
        return _LOADED[0]
    with _LOAD_LOCK:
        if not _LOADED:
            # numba is imported late: it takes ~0.4 s and loads scipy, which `import postquant` should not pay
            import numba

            compiled, uncached = {}, []
            options = {"nogil": True, "error_model": "numpy"}  # error_model: no Python exceptions from floats
            for fn in _LOOPS:
                try:
                    compiled[fn.__name__] = numba.njit(cache=True, **options)(fn)
                except RuntimeError:  # numba found no writable cache location for this file
                    compiled[fn.__name__] = numba.njit(**options)(fn)
                    uncached.append(fn.__name__)
            if uncached:
                log.warning(
                    "numba has no writable cache location for %s (set NUMBA_CACHE_DIR to a writable "
                    "directory): SQuant's CPU loops are compiled anew in each process",
                    __file__,
                )
            globals().update(compiled)  # the loops call each other by these names
            _LOADED.append(types.SimpleNamespace(**compiled))
    return _LOADED[0]


@_compiled
def kernel_stage(
    x: np.ndarray,
    sums: np.ndarray,
    sum_order: np.ndarray,
    tmin: int,
    tmax: int,
    codes: np.ndarray,
    e: np.ndarray,
    h_pos: np.ndarray,
    h_pri: np.ndarray,
    h_up: np.ndarray,
) -> bool:
    """The kernel stage on kernels `x` (G, L) float32, L <= 16, in the stable descending order of
    priorities; False if an error sum is not finite (x holds NaN or Inf).

    Each kernel's error sum is ``sums[g]`` if `sums` holds G values, else the float32 sum of its errors
    added in `sum_order` (L,). Writes the clamped codes into `codes` (G, L) int32, the errors after the
    stage into `e` (G, L) float32, and each kernel's hand-off into `h_pos` (G,) int32 (its index),
    `h_pri` (G,) float32 (its priority) and `h_up` (G,) bool (it joins the up list).

    Each element's rank in the order is the number of elements before it: those of higher priority, and
    those of equal priority and lower index (the stable order). The first k ranks flip; the hand-off is
    rank k - 1 on overshoot (k >= |sum|), rank L - 1 when k == 0 there (a zero sum: ``order[-1]``), else
    rank k.
    """
    g_count, klen = x.shape
    xf, cf, ef = x.reshape(-1), codes.reshape(-1), e.reshape(-1)
    one, zero = np.float32(1.0), np.float32(0.0)
    lo, hi = np.float32(tmin), np.float32(tmax)
    given = sums.shape[0] == g_count
    n_max = _CHUNK
    xt = np.empty((klen, n_max), np.float32)  # rows of a chunk: x, then r0 after the flips
    et = np.empty((klen, n_max), np.float32)  # e0, then the errors after the flips
    pt = np.empty((klen, n_max), np.float32)  # priorities
    rank = np.empty((klen, n_max), np.int32)
    ct = np.empty((klen, n_max), np.int32)  # codes
    s = np.empty(n_max, np.float32)
    step = np.empty(n_max, np.float32)
    lim = np.empty(n_max, np.float32)
    kk = np.empty(n_max, np.int32)
    target = np.empty(n_max, np.int32)
    bad = 0
    for g0 in range(0, g_count, n_max):
        n = min(n_max, g_count - g0)
        xg = xf[g0 * klen : (g0 + n) * klen]
        _transpose_in(xg, klen, n, xt)
        for j in range(klen):
            xr, er = xt[j], et[j]
            for c in range(n):
                er[c] = np.rint(xr[c]) - xr[c]
        if given:
            sg = sums[g0 : g0 + n]
            for c in range(n):
                s[c] = sg[c]
        else:
            er = et[sum_order[0]]
            for c in range(n):
                s[c] = er[c]
            for t in range(1, klen):
                er = et[sum_order[t]]
                for c in range(n):
                    s[c] += er[c]
        hu = h_up[g0 : g0 + n]
        for c in range(n):
            sv = s[c]
            up = sv < zero  # flip up (a zero sum flips down)
            step[c] = one if up else -one
            lim[c] = hi if up else -lo  # a candidate's r0 lies below tmax (up) or above tmin (down)
            a = abs(sv)
            bad += np.int32(not a < np.float32(np.inf))
            k = np.rint(a)
            over = k >= a
            ki = np.int32(k) if a < np.float32(np.inf) else np.int32(0)
            kk[c] = ki
            target[c] = (ki - 1 if ki > 0 else klen - 1) if over else ki
            hu[c] = up != over
        if bad:
            return False
        for j in range(klen):
            xr, er, pr, rk = xt[j], et[j], pt[j], rank[j]
            for c in range(n):
                r0 = np.rint(xr[c])
                xr[c] = r0
                d = er[c] * -step[c]  # |e0| for a candidate of the direction
                pr[c] = d if (d > zero) & (r0 * step[c] < lim[c]) else zero
                rk[c] = 0
        for i in range(klen):
            pi, ri = pt[i], rank[i]
            for j in range(i + 1, klen):
                pj, rj = pt[j], rank[j]
                for c in range(n):
                    before = np.int32(pi[c] >= pj[c])  # i < j: i is first unless j's priority is higher
                    rj[c] += before
                    ri[c] += 1 - before
        for j in range(klen):
            xr, er, pr, rk, cr = xt[j], et[j], pt[j], rank[j], ct[j]
            for c in range(n):
                flip = rk[c] < kk[c]
                cand = pr[c] > zero
                st = step[c]
                cr[c] = np.int32(min(max(xr[c] + (st if flip & cand else zero), lo), hi))
                er[c] = (er[c] + st if cand else zero) if flip else er[c]  # a no-op flip: error 0
        hp, hr = h_pos[g0 : g0 + n], h_pri[g0 : g0 + n]
        for c in range(n):
            hp[c] = 0
        for j in range(klen):
            rk = rank[j]
            jj = np.int32(j)
            for c in range(n):
                hp[c] = jj if rk[c] == target[c] else hp[c]
        for c in range(n):
            hr[c] = abs(et[hp[c], c])
        _transpose_out(ct, klen, n, cf[g0 * klen : (g0 + n) * klen])
        _transpose_out(et, klen, n, ef[g0 * klen : (g0 + n) * klen])
    return True


@_compiled
def _transpose_in(flat: np.ndarray, klen: int, n: int, rows: np.ndarray) -> None:
    """Rows (klen, >= n) of `n` kernels stored one after another in `flat`: ``rows[j, c] = flat[c * klen
    + j]``. Three neighbouring elements per loop, which the compiler loads as vectors and shuffles."""
    for j in range(0, klen - 2, 3):
        r0, r1, r2 = rows[j], rows[j + 1], rows[j + 2]
        for c in range(n):
            r0[c] = flat[c * klen + j]
            r1[c] = flat[c * klen + j + 1]
            r2[c] = flat[c * klen + j + 2]
    for j in range(klen - klen % 3, klen):
        r0 = rows[j]
        for c in range(n):
            r0[c] = flat[c * klen + j]


@_compiled
def _transpose_out(rows: np.ndarray, klen: int, n: int, flat: np.ndarray) -> None:
    """The inverse of `_transpose_in`: ``flat[c * klen + j] = rows[j, c]`` for the first `n` columns."""
    for j in range(0, klen - 2, 3):
        r0, r1, r2 = rows[j], rows[j + 1], rows[j + 2]
        for c in range(n):
            flat[c * klen + j] = r0[c]
            flat[c * klen + j + 1] = r1[c]
            flat[c * klen + j + 2] = r2[c]
    for j in range(klen - klen % 3, klen):
        r0 = rows[j]
        for c in range(n):
            flat[c * klen + j] = r0[c]


@_compiled
def kernel_stage_ordered(
    x: np.ndarray,
    sums: np.ndarray,
    orders: np.ndarray,
    tmin: int,
    tmax: int,
    codes: np.ndarray,
    e: np.ndarray,
    h_pos: np.ndarray,
    h_pri: np.ndarray,
    h_up: np.ndarray,
) -> None:
    """The kernel stage on kernels `x` (G, L) float32 with error sums `sums` (G,) (all finite) and each
    kernel's order of priorities given, `orders` (G, L) (the reference's sort of `kernel_priorities`).
    Writes what `kernel_stage` writes."""
    g_count, klen = x.shape
    one, zero = np.float32(1.0), np.float32(0.0)
    lo, hi = np.float32(tmin), np.float32(tmax)
    for g in range(g_count):
        s = sums[g]
        up = s < zero
        step = one if up else -one
        lim = hi if up else -lo
        a = abs(s)
        k = np.rint(a)
        over = k >= a
        kk = np.int64(k)
        for j in range(klen):
            xv = x[g, j]
            r0 = np.rint(xv)
            e[g, j] = r0 - xv
            codes[g, j] = np.int32(min(max(r0, lo), hi))
        for t in range(kk):
            j = orders[g, t]
            xv = x[g, j]
            r0 = np.rint(xv)
            ev = r0 - xv
            if ev * -step > zero and r0 * step < lim:
                codes[g, j] = np.int32(min(max(r0 + step, lo), hi))
                e[g, j] = ev + step
            else:
                e[g, j] = zero  # a no-op flip: error 0
        hp = orders[g, (kk - 1) % klen] if over else orders[g, kk]  # order[-1] where k == 0
        h_pos[g] = hp
        h_pri[g] = abs(e[g, hp])
        h_up[g] = up != over


@_compiled
def kernel_priorities(x: np.ndarray, sums: np.ndarray, tmin: int, tmax: int, p: np.ndarray) -> None:
    """Each element's priority in its kernel's direction (`sums` (G,) the kernels' error sums): |e0| for a
    candidate, +0.0 otherwise, into `p` (G, L) float32: the rows the reference sorts."""
    g_count, klen = x.shape
    one, zero = np.float32(1.0), np.float32(0.0)
    lo, hi = np.float32(tmin), np.float32(tmax)
    for g in range(g_count):
        up = sums[g] < zero
        step = one if up else -one
        lim = hi if up else -lo
        for j in range(klen):
            xv = x[g, j]
            r0 = np.rint(xv)
            d = (r0 - xv) * -step
            p[g, j] = d if d > zero and r0 * step < lim else zero


@_compiled
def _largest(row: np.ndarray, kk: int, top: np.ndarray, idx: np.ndarray) -> bool:
    """The kk + 1 largest values of `row` (values >= 0, 0 < kk < len(row)) in descending order into `top`,
    their indices into `idx`; whether the values at positions kk - 1 and kk are equal (then the first kk
    are not determined by value alone)."""
    for i in range(kk + 1):
        _insert(top, idx, i, row[i], i)
    v_k = top[kk]
    for i in range(kk + 1, row.shape[0]):
        v = row[i]
        if v > v_k:
            _insert(top, idx, kk, v, i)  # drops the smallest of the kk + 1
            v_k = top[kk]
    return top[kk - 1] == v_k


@_compiled
def _insert(top: np.ndarray, idx: np.ndarray, last: int, v: np.float32, i: int) -> None:
    """Insert value `v` of index `i` into the descending `top[:last]` (stable: after equal values), at
    most to position `last`; the value at `last` is overwritten."""
    t = last
    while t > 0 and top[t - 1] < v:
        top[t] = top[t - 1]
        idx[t] = idx[t - 1]
        t -= 1
    top[t] = v
    idx[t] = i


@_compiled
def _channel_direction(
    s: np.float32, lo: np.float32, hi: np.float32
) -> tuple[bool, np.int64, np.float32, np.float32]:
    """A channel's flips from its float32 error sum `s`: up (s < 0; a zero sum flips down), their number
    ``k = rint(|s|)``, the step (+1 or -1) and the bound a candidate's initial rounding lies below in the step's
    direction (``tmax`` up, ``-tmin`` down)."""
    up = s < np.float32(0.0)
    return up, np.int64(np.rint(abs(s))), np.float32(1.0) if up else np.float32(-1.0), hi if up else -lo


@_compiled
def channel_handoffs(
    x: np.ndarray,
    codes: np.ndarray,
    sums: np.ndarray,
    h_pos: np.ndarray,
    h_pri: np.ndarray,
    h_up: np.ndarray,
    tmin: int,
    tmax: int,
    ambiguous: np.ndarray,
) -> None:
    """The channel stage after a kernel stage: only each kernel's hand-off has a nonzero priority.

    `x` (OC, IC, L) float32, `codes` (OC, IC, L) int32 after the kernel stage, `sums` (OC,) the channels'
    error sums; `h_pos`, `h_pri`, `h_up` (OC, IC) the hand-offs. The first k of a channel's order are the
    priorities above the one at position k, unless those at positions k-1 and k are equal (or k >= IC):
    such channels are marked in `ambiguous` (OC,) bool and left alone (the reference's sort orders them).
    A flip sets the element to its initial rounding moved one step if it was an initial candidate of the
    direction, else to its initial rounding.
    """
    oc, ic, _ = x.shape
    zero = np.float32(0.0)
    lo, hi = np.float32(tmin), np.float32(tmax)
    top = np.empty(ic + 1, np.float32)
    idx = np.empty(ic + 1, np.int64)
    row = np.empty(ic, np.float32)
    for c in range(oc):
        up, kk, step, lim = _channel_direction(sums[c], lo, hi)
        ambiguous[c] = kk >= ic
        if kk == 0 or kk >= ic:
            continue
        pri, hup = h_pri[c], h_up[c]
        for i in range(ic):  # the direction's list
            row[i] = pri[i] if hup[i] == up else zero
        if _largest(row, kk, top, idx):
            ambiguous[c] = True
            continue
        for t in range(kk):  # the first k of the order: the values above the one at position k
            i = idx[t]
            j = h_pos[c, i]
            xv = x[c, i, j]
            r0 = np.rint(xv)
            if (r0 - xv) * -step > zero and r0 * step < lim:
                r0 += step
            codes[c, i, j] = np.int32(min(max(r0, lo), hi))


@_compiled
def channel_full(
    x: np.ndarray, sums: np.ndarray, tmin: int, tmax: int, codes: np.ndarray, ambiguous: np.ndarray
) -> None:
    """The channel stage on the initial priorities of every element (mode "ec", or kernels of one element).

    `x` (n, M) float32, `sums` (n,) the channels' float32 error sums (finite). Writes the codes into
    `codes` (n, M) int32: nearest rounding moved one step for the k candidates of highest priority of each
    channel. Where the k-th and (k+1)-th priorities are equal (or k >= M) the channel gets nearest rounding
    and is marked in `ambiguous` (n,) bool, for the reference's sort to order.
    """
    n_ch, m = x.shape
    zero = np.float32(0.0)
    lo, hi = np.float32(tmin), np.float32(tmax)
    top = np.empty(m + 1, np.float32)
    idx = np.empty(m + 1, np.int64)
    row = np.empty(m, np.float32)
    for c in range(n_ch):
        _, kk, step, lim = _channel_direction(sums[c], lo, hi)
        xc, cc = x[c], codes[c]
        for i in range(m):
            xv = xc[i]
            r0 = np.rint(xv)
            d = (r0 - xv) * -step
            row[i] = d if (d > zero) & (r0 * step < lim) else zero
            cc[i] = np.int32(min(max(r0, lo), hi))
        ambiguous[c] = kk >= m
        if kk == 0 or kk >= m:
            continue
        if _largest(row, kk, top, idx):
            ambiguous[c] = True
            continue
        for t in range(kk):  # the first k of the order: candidates (priority > 0 = the one at position k)
            i = idx[t]
            cc[i] = np.int32(min(max(np.rint(xc[i]) + step, lo), hi))
