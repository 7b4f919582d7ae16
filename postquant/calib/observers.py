"""Observers choose the float range of an activation tensor from calibration data."""

from __future__ import annotations

import enum

import torch

from postquant.nn.act import act_qparams


class Observer(enum.StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    STD = "std"  # SQuant's rule: alpha = s * std (ALGORITHMS.md 2.2), capped at the max below 6 bits


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
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())
        if self.kind is Observer.PERCENTILE:
            sample = self._subsample(x, 1 << 22)
            q = torch.quantile(sample, sample.new_tensor([1 - self.percentile / 100, self.percentile / 100]))
            self._pct.append((q[0].item(), q[1].item()))
        elif self.kind in (Observer.MSE, Observer.STD):
            self._samples.append(self._subsample(x, self.sample_size))

    def _subsample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if x.numel() <= n:
            return x
        idx = torch.randint(0, x.numel(), (n,), generator=self._generator)  # seeded on the CPU, any device
        return x[idx.to(x.device)]

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
