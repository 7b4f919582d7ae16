"""Exact quantiles of large 1-D tensors by selection instead of sorting (pure tensor math).

``torch.quantile`` sorts all of its input; the tail quantiles of an activation observer (99.99 %) need only
the few hundred values at either end. `OrderStatistics` finds them from the extremes of the tensor's rows,
in one vectorised pass over the data per side, and `quantiles` interpolates between them exactly as
``torch.quantile`` does, so the result is the same bit for bit.
"""

from __future__ import annotations

import torch

# Below this many values, a quantile is taken by sorting (torch.quantile); above it, by selection.
_SELECT_MIN = 1 << 14
# Values per row: the row extremes are 1/_ROW of the data; the rows that hold the k most extreme values
# are at most k * _ROW values.
_ROW = 256


class OrderStatistics:
    """The extreme values of a 1-D float tensor `x` without NaN, found from the extremes of its rows.

    `x` is read as rows of `_ROW` values (a view; the last ``n % _ROW`` values, the `rest`, are kept apart).
    Let t be the k-th largest row maximum: k rows reach t, so `x` holds at least k values >= t and each of
    its k largest values is >= t. Every value above t lies in a row whose maximum is above t (fewer than k
    rows) or in the rest: those are gathered and ranked. When they hold fewer than k values above t, the
    others of the k largest all equal t. The smallest values are found alike from the row minima.

    Args:
        x: a 1-D floating tensor (made contiguous if it is not), on any device.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.contiguous()
        self.n = self.x.numel()
        rows = self.n // _ROW
        self._body = self.x[: rows * _ROW].view(rows, _ROW)  # (rows, _ROW), a view
        self._rest = self.x[rows * _ROW :]  # (n % _ROW,)
        self._row_extremes: dict[bool, torch.Tensor] = {}

    def _extremes(self, largest: bool) -> torch.Tensor:
        """The maximum (`largest`) or minimum of each row, computed once."""
        if largest not in self._row_extremes:
            body = self._body
            self._row_extremes[largest] = body.amax(1) if largest else body.amin(1)  # (rows,)
        return self._row_extremes[largest]

    def extreme(self, largest: bool) -> float:
        """The maximum (`largest`) or the minimum of `x`."""
        if self.n == 0:
            raise ValueError("no values")
        parts = [t for t in (self._extremes(largest), self._rest) if t.numel()]
        values = torch.cat(parts)
        return (values.max() if largest else values.min()).item()

    def values(self, k: int, largest: bool) -> torch.Tensor:
        """The `k` largest (or smallest) values of `x`, sorted from the extreme inwards.

        Equal to ``x.topk(k, largest=largest).values``; when k rows would be a large part of `x`, it is that.
        """
        rows = self._body.shape[0]
        if k > rows or 4 * k * _ROW > self.n:
            return self.x.topk(k, largest=largest).values
        ext = self._extremes(largest)
        threshold = ext.topk(k, largest=largest).values[-1]  # the k-th most extreme row extreme
        beyond_rows = (ext > threshold if largest else ext < threshold).nonzero().squeeze(1)  # < k rows
        candidates = torch.cat([self._body[beyond_rows].reshape(-1), self._rest])  # (< k * _ROW + _ROW,)
        beyond = candidates[candidates > threshold if largest else candidates < threshold]
        if beyond.numel() >= k:
            return beyond.topk(k, largest=largest).values
        ranked = beyond.sort(descending=largest).values
        return torch.cat([ranked, threshold.expand(k - beyond.numel())])

    def quantiles(self, probs: list[float]) -> list[float]:
        """``torch.quantile(x, probs)`` (linear interpolation), bit for bit.

        As ``torch.quantile``: ``rank = q * (n - 1)`` in `x`'s dtype, then
        ``lerp(x_(floor(rank)), x_(ceil(rank)), rank - floor(rank))`` on the sorted values; only the values
        at those ranks are selected (`values`), from whichever end is nearer.
        """
        x, n = self.x, self.n
        q = x.new_tensor(probs)
        if n < _SELECT_MIN:
            return torch.quantile(x, q).tolist()
        ranks = q * (n - 1)  # (P,) in x's dtype, as torch.quantile computes them
        below, above = ranks.long(), ranks.ceil().long()
        weights = ranks - below
        wanted = below.tolist() + above.tolist()
        low = [r for r in wanted if r < n // 2]
        high = [r for r in wanted if r >= n // 2]
        at: dict[int, torch.Tensor] = {}
        if low:
            smallest = self.values(max(low) + 1, largest=False)  # ascending: rank r at index r
            at |= {r: smallest[r] for r in low}
        if high:
            largest = self.values(n - min(high), largest=True)  # descending: rank r at index n - 1 - r
            at |= {r: largest[n - 1 - r] for r in high}
        return [
            torch.lerp(at[b], at[a], w).item()
            for b, a, w in zip(below.tolist(), above.tolist(), weights, strict=True)
        ]


def quantiles(x: torch.Tensor, probs: list[float]) -> list[float]:
    """``torch.quantile(x, probs)`` (linear interpolation) of a 1-D float tensor without NaN, bit for bit,
    by selecting the values at the needed ranks instead of sorting (`OrderStatistics`)."""
    return OrderStatistics(x).quantiles(probs)
