"""Observers choose the float range of an activation tensor from calibration data."""

from __future__ import annotations

import torch

from postquant.choices import Observer
from postquant.nn.act import act_qparams

# Below this many values, a quantile is taken by sorting (torch.quantile); above it, by selection.
_SELECT_MIN = 1 << 14


def _extreme_values(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The `k` largest (or smallest) values of the 1-D `x`, sorted from the extreme inwards.

    Equal to ``x.topk(k, largest=largest).values``, faster for k << n: a threshold t (one of x's values) is
    guessed from a strided subsample, the values strictly beyond it are kept (one pass) and ranked; when they
    are fewer than k, the rest are copies of t as long as x holds enough of them (ties, e.g. the zeros of a
    ReLU). The guess only steers the work: otherwise the whole tensor is ranked.
    """
    n = x.numel()
    stride = max(1, n // (1 << 16))
    if k * 64 < n and stride > 1:
        sub = x[::stride]  # (~65536,)
        m = min(sub.numel(), 4 * k * sub.numel() // n + 8)
        threshold = sub.topk(m, largest=largest).values[-1]
        beyond = x[x > threshold] if largest else x[x < threshold]
        if beyond.numel() >= k:
            return beyond.topk(k, largest=largest).values
        missing = k - beyond.numel()
        if int((x == threshold).sum()) >= missing:
            ranked = beyond.sort(descending=largest).values
            return torch.cat([ranked, threshold.expand(missing)])
    return x.topk(k, largest=largest).values


def quantiles(x: torch.Tensor, probs: list[float]) -> list[float]:
    """``torch.quantile(x, probs)`` (linear interpolation) of a 1-D float tensor without NaN, bit for bit.

    ``torch.quantile`` sorts all of `x`; for the tail quantiles of an observer (99.99 %) only a few hundred
    values at either end are needed, so they are selected instead (`_extreme_values`), and interpolated as
    ``torch.quantile`` does: ``rank = q * (n - 1)`` in `x`'s dtype, ``lerp(x_(floor), x_(ceil), rank - floor)``.
    """
    n = x.numel()
    q = x.new_tensor(probs)
    if n < _SELECT_MIN:
        return torch.quantile(x, q).tolist()
    ranks = q * (n - 1)  # (P,) in x's dtype, as torch.quantile computes them
    below, above = ranks.long(), ranks.ceil().long()
    weights = ranks - below
    low = [r for r in below.tolist() + above.tolist() if r < n // 2]
    high = [r for r in below.tolist() + above.tolist() if r >= n // 2]
    values: dict[int, torch.Tensor] = {}
    if low:
        smallest = _extreme_values(x, max(low) + 1, largest=False)  # ascending: rank r at index r
        values |= {r: smallest[r] for r in low}
    if high:
        largest = _extreme_values(x, n - min(high), largest=True)  # descending: rank r at index n - 1 - r
        values |= {r: largest[n - 1 - r] for r in high}
    out = [
        torch.lerp(values[b], values[a], w).item()
        for b, a, w in zip(below.tolist(), above.tolist(), weights, strict=True)
    ]
    return out


class RangeObserver:
    """Accumulates statistics of the tensors it sees and proposes a range [lo, hi].

    minmax: the extreme values seen. percentile: the mean over batches of the `percentile`-th and
    (100 - `percentile`)-th percentiles. mse: the clipping of the min/max range (by a ratio in [0.3, 1]) that
    minimises the mean squared quantization error over a bounded sample of the values seen. Statistics
    are computed on the device of the tensors seen.
    """

    def __init__(
        self,
        kind: Observer | str = Observer.MINMAX,
        percentile: float = 99.99,
        sample_size: int = 1 << 20,
        seed: int = 0,
    ) -> None:
        self.kind = Observer(kind)
        self.percentile = percentile
        self.sample_size = sample_size
        self.lo = float("inf")
        self.hi = float("-inf")
        self._pct: list[tuple[float, float]] = []
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        self.lo = min(self.lo, lo.item())
        self.hi = max(self.hi, hi.item())
        if self.kind is Observer.PERCENTILE:
            sample = self._subsample(x, 1 << 22)
            q_lo, q_hi = quantiles(sample, [1 - self.percentile / 100, self.percentile / 100])
            self._pct.append((q_lo, q_hi))
        elif self.kind in (Observer.MSE, Observer.STD):
            self._samples.append(self._subsample(x, self.sample_size))

    def _subsample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if x.numel() <= n:
            return x
        idx = torch.randint(0, x.numel(), (n,), generator=self._generator)  # seeded on the CPU, any device
        return x.index_select(0, idx.to(x.device))

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(self, bits: int) -> tuple[float, float]:
        if not self.seen:
            raise RuntimeError("observer saw no data")
        if self.kind is Observer.MINMAX:
            return self.lo, self.hi
        if self.kind is Observer.PERCENTILE:
            lo = sum(p[0] for p in self._pct) / len(self._pct)
            hi = sum(p[1] for p in self._pct) / len(self._pct)
            return min(lo, 0.0) if self.lo < 0 else 0.0, hi
        if self.kind is Observer.STD:
            from postquant.calib.act_ranges import reference_noise_range

            return reference_noise_range(torch.cat(self._samples), bits)
        return self._mse_range(bits)

    def _mse_range(self, bits: int) -> tuple[float, float]:
        values = self._subsample(torch.cat(self._samples), self.sample_size)
        best, best_err = (self.lo, self.hi), float("inf")
        for ratio in torch.linspace(1.0, 0.3, 50).tolist():
            lo, hi = self.lo * ratio, self.hi * ratio
            scale, zp, qmin, qmax = act_qparams(lo, hi, bits)
            q = torch.clamp(torch.round(values / scale) + zp, qmin, qmax)
            err = ((q - zp) * scale - values).pow(2).mean().item()
            if err < best_err:
                best, best_err = (lo, hi), err
        return best
