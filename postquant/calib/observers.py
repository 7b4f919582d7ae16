"""Observers choose the float range of an activation tensor from the tensors they see.

One small class per kind behind one interface (`RangeObserver`: ``update(x)``, ``seen``, ``range(bits)``);
`make_observer` builds the one a recipe names. Observers of one layer in several processes (data-parallel
calibration, `postquant.distributed`) are combined by ``merge([o.state() for o in ranks])``: min/max and
percentile observers then hold exactly what one observer of all the tensors, in order, holds. Statistics are computed on the device of the tensors seen;
seeded draws (the MSE and std samples) come from a CPU generator, so every device draws the same values.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from postquant.calib.quantiles import OrderStatistics, quantiles
from postquant.choices import Observer
from postquant.nn.act import act_qparams

__all__ = [
    "NOISE_STD_MULTIPLIER",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "RangeObserver",
    "StdObserver",
    "make_observer",
    "quantiles",
    "reference_noise_range",
]

# The reference's multiplier s by activation bits (12/14/25 at 4/6/8 bits; other widths interpolated).
NOISE_STD_MULTIPLIER = {2: 12.0, 3: 12.0, 4: 12.0, 5: 13.0, 6: 14.0, 7: 19.5, 8: 25.0}


def _positive_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the positive elements of `x` (as ``x[x > 0].std()``, without the slow gather)."""
    mask = x > 0
    count = torch.count_nonzero(mask)
    mean = torch.where(mask, x, 0).sum() / count
    var = torch.where(mask, (x - mean).square(), 0).sum() / (count - 1)
    return var.sqrt()


def reference_noise_range(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """SQuant's data-free range for one activation tensor (docs/algorithms.md 2.2)."""
    s = NOISE_STD_MULTIPLIER[bits]
    x = x.detach().float()
    if x.min() >= 0:
        count = int(torch.count_nonzero(x > 0))
        alpha = s * _positive_std(x).item() if count > 1 else x.max().item()
        if bits < 6:
            alpha = min(alpha, x.max().item())
        return 0.0, alpha
    alpha = s * x.std().item() / 1.25
    if bits < 6:
        alpha = min(alpha, x.abs().max().item())
    return -alpha, alpha


def _values(x: torch.Tensor) -> torch.Tensor:
    """The values of `x` as a float 1-D tensor in memory order: a view when `x` is dense (contiguous, or a
    permutation of a contiguous tensor such as channels-last), else a copy. For order-free statistics."""
    x = x.detach().float()
    if not x.is_contiguous() and x.dim() > 1:
        order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
        permuted = x.permute(order)
        if permuted.is_contiguous():
            return permuted.view(-1)
    return x.reshape(-1)


class RangeObserver(abc.ABC):
    """Accumulates statistics of the tensors it sees and proposes a range [lo, hi] for `bits`-bit codes.

    Every observer tracks the extreme values seen (`lo`, `hi`); `seen` says whether it saw any value.
    """

    kind: ClassVar[Observer]

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")

    def update(self, x: torch.Tensor) -> None:
        """Observe one tensor (any shape; empty tensors are ignored)."""
        if x.numel():
            self._observe(x)

    def _extend(self, lo: float, hi: float) -> None:
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    @abc.abstractmethod
    def _observe(self, x: torch.Tensor) -> None:
        """Observe one non-empty tensor (updating `lo` and `hi`)."""

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def state(self) -> dict[str, Any]:
        """A small picklable summary of what this observer has accumulated, for `values_for` and `merge`."""
        return {"lo": self.lo, "hi": self.hi, **self._state()}

    def values_for(self, states: list[dict[str, Any]], index: int) -> Any:
        """What this observer, the `index`-th of the observers whose `state`s these are, must send for a
        `merge` (picklable; None when the states suffice)."""
        return None

    def merge(self, states: list[dict[str, Any]], values: list[Any] | None = None) -> None:
        """Replace what this observer holds by what observers that saw consecutive parts of one stream of
        tensors, in stream order, accumulated: their `state`s and what each sent (`values_for`)."""
        self.lo = min(s["lo"] for s in states)
        self.hi = max(s["hi"] for s in states)
        self._merge(states, values if values is not None else [None] * len(states))

    def _state(self) -> dict[str, Any]:
        return {}

    def _merge(self, states: list[dict[str, Any]], values: list[Any]) -> None:  # noqa: B027 (min/max: nothing)
        """Merge the kind's own statistics (`lo` and `hi` are done)."""

    def range(self, bits: int) -> tuple[float, float]:
        """The chosen range [lo, hi] for `bits`-bit activation codes.

        Raises:
            RuntimeError: the observer saw no data.
        """
        if not self.seen:
            raise RuntimeError("observer saw no data")
        return self._range(bits)

    @abc.abstractmethod
    def _range(self, bits: int) -> tuple[float, float]: ...


class MinMaxObserver(RangeObserver):
    """The extreme values seen."""

    kind = Observer.MINMAX

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(_values(x))
        self._extend(lo.item(), hi.item())

    def _range(self, bits: int) -> tuple[float, float]:
        return self.lo, self.hi


class PercentileObserver(RangeObserver):
    """The mean over the tensors seen of each tensor's (100 - `percentile`)-th and `percentile`-th
    percentiles (``torch.quantile`` of all its values, computed by selection: `OrderStatistics`). The low
    end is 0 unless a negative value was seen."""

    kind = Observer.PERCENTILE

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        self.percentile = percentile
        self._quantiles: list[tuple[float, float]] = []

    def _observe(self, x: torch.Tensor) -> None:
        stats = OrderStatistics(_values(x))
        self._extend(stats.extreme(largest=False), stats.extreme(largest=True))
        q_lo, q_hi = stats.quantiles([1 - self.percentile / 100, self.percentile / 100])
        self._quantiles.append((q_lo, q_hi))

    def _state(self) -> dict[str, Any]:
        return {"quantiles": list(self._quantiles)}

    def _merge(self, states: list[dict[str, Any]], values: list[Any]) -> None:
        # the per-tensor quantiles in stream order: the same list, so the same sums, as one observer's
        self._quantiles = [q for s in states for q in s["quantiles"]]

    def _range(self, bits: int) -> tuple[float, float]:
        lo = sum(q[0] for q in self._quantiles) / len(self._quantiles)
        hi = sum(q[1] for q in self._quantiles) / len(self._quantiles)
        return min(lo, 0.0) if self.lo < 0 else 0.0, hi


class _SamplingObserver(RangeObserver):
    """Keeps a seeded uniform sample (with replacement) of at most `sample_size` values of each tensor.

    Merged observers (`merge`) hold the values one observer holding all the samples in stream order chooses
    the range from: all of them (std), or the MSE observer's final subsample of them, of which each part
    sends only the values it holds (at most `sample_size` values in all, not every sample). That is exactly
    one observer's when no tensor had more than `sample_size` values (each was kept whole, and the
    generator was not used before the final draw). Otherwise the observers after the first drew their
    subsamples from a generator in another state than one observer would have: other uniform draws from the
    same tensors, so the range is close but not equal (tests/calib/test_observers.py measures it); the
    final draw uses the last observer's generator, so every merge chooses the same range.
    """

    def __init__(self, sample_size: int = 1 << 20, seed: int = 0) -> None:
        super().__init__()
        self.sample_size = sample_size
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()  # logical order: the seeded indices pick the same values anywhere
        lo, hi = torch.aminmax(x)
        self._extend(lo.item(), hi.item())
        self._samples.append(self._subsample(x))

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.sample_size:
            return x
        idx = torch.randint(0, x.numel(), (self.sample_size,), generator=self._generator)  # on the CPU
        return x.index_select(0, idx.to(x.device))

    # MSE subsamples the values seen once more when choosing the range; std uses them all
    _final_draw: ClassVar[bool] = False

    def _state(self) -> dict[str, Any]:
        return {"count": sum(t.numel() for t in self._samples), "generator": self._generator.get_state()}

    def _final_indices(self, states: list[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The indices into all the observers' values, in order, that the range is chosen from (None: all),
        and the generator's state after drawing them (from the last observer's state: every merge agrees)."""
        generator = torch.Generator().set_state(states[-1]["generator"])
        total = sum(s["count"] for s in states)
        if not self._final_draw or total <= self.sample_size:
            return None, generator.get_state()
        return torch.randint(0, total, (self.sample_size,), generator=generator), generator.get_state()

    def values_for(self, states: list[dict[str, Any]], index: int) -> Any:
        own = torch.cat(self._samples).cpu() if self._samples else torch.empty(0)
        idx, _ = self._final_indices(states)
        if idx is None:
            return own
        offset = sum(s["count"] for s in states[:index])
        mine = (idx >= offset) & (idx < offset + own.numel())
        return own[idx[mine] - offset]  # only the values the range is chosen from

    def _merge(self, states: list[dict[str, Any]], values: list[Any]) -> None:
        device = self._samples[0].device if self._samples else torch.device("cpu")
        idx, generator_state = self._final_indices(states)
        if idx is None:
            merged = torch.cat(values)
        else:  # the values one observer's final subsample picks, each sent by the observer that holds it
            merged = torch.empty(idx.numel(), dtype=values[0].dtype)
            offset = 0
            for s, part in zip(states, values, strict=True):
                mine = (idx >= offset) & (idx < offset + s["count"])
                merged[mine] = part
                offset += s["count"]
        self._samples = [merged.to(device)] if merged.numel() else []
        self._generator.set_state(generator_state)


class MSEObserver(_SamplingObserver):
    """The clipping of the min/max range (by a ratio in [0.3, 1], 50 steps) that minimises the mean squared
    quantization error over a seeded sample of at most `sample_size` of the values seen."""

    kind = Observer.MSE
    _final_draw = True

    def _range(self, bits: int) -> tuple[float, float]:
        values = self._subsample(torch.cat(self._samples))  # (<= sample_size,)
        best, best_err = (self.lo, self.hi), float("inf")
        q = torch.empty_like(values)
        for ratio in torch.linspace(1.0, 0.3, 50).tolist():
            lo, hi = self.lo * ratio, self.hi * ratio
            scale, zp, qmin, qmax = act_qparams(lo, hi, bits)
            # ((clamp(round(v / scale) + zp, qmin, qmax) - zp) * scale - v)^2 in place on one buffer; adding the
            # integer zp to integer-valued floats is exact, so clamping round(v / scale) to [qmin - zp,
            # qmax - zp] gives the same floats with two passes fewer (beyond 2^24 both clamp to the bound)
            torch.div(values, scale, out=q)
            q.round_().clamp_(qmin - zp, qmax - zp).mul_(scale).sub_(values)
            err = q.square_().mean().item()
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


class StdObserver(_SamplingObserver):
    """SQuant's rule on the values seen (`reference_noise_range` of a seeded sample of each tensor)."""

    kind = Observer.STD

    def _range(self, bits: int) -> tuple[float, float]:
        return reference_noise_range(torch.cat(self._samples), bits)


_KINDS: dict[Observer, type[RangeObserver]] = {
    cls.kind: cls for cls in (MinMaxObserver, PercentileObserver, MSEObserver, StdObserver)
}


def make_observer(
    kind: Observer | str = Observer.MINMAX,
    *,
    percentile: float = 99.99,
    sample_size: int = 1 << 20,
    seed: int = 0,
) -> RangeObserver:
    """The observer of `kind` (minmax, percentile, mse, std); each takes only the settings it uses:
    `percentile` (percentile), `sample_size` and `seed` (mse, std).

    Raises:
        ValueError: an unknown kind.
    """
    cls = _KINDS[Observer(kind)]
    if cls is PercentileObserver:
        return PercentileObserver(percentile)
    if issubclass(cls, _SamplingObserver):
        return cls(sample_size, seed)
    return cls()
