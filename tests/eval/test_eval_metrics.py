"""Metrics against scipy / numpy references, and their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from postquant.errors import DataError
from postquant.eval import average_ranks, pearson, spearman, sqnr_db, topk_accuracy

finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)
# Few distinct values, so ties are common.
tied = st.integers(-3, 3).map(float)


@st.composite
def paired(draw, elements):
    n = draw(st.integers(2, 60))
    a = draw(st.lists(elements, min_size=n, max_size=n))
    b = draw(st.lists(elements, min_size=n, max_size=n))
    return np.array(a), np.array(b)


@settings(max_examples=150, deadline=None)
@given(st.one_of(paired(finite), paired(tied)))
def test_spearman_matches_scipy(pair):
    a, b = pair
    assume(np.ptp(a) > 0 and np.ptp(b) > 0)  # scipy gives NaN (with a warning) for constant input
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.one_of(paired(finite), paired(tied)))
def test_pearson_matches_scipy(pair):
    a, b = pair
    assume(np.ptp(a) > 0 and np.ptp(b) > 0)
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b).statistic, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(tied, min_size=1, max_size=50))
def test_average_ranks_match_scipy(values):
    x = np.array(values)
    np.testing.assert_array_equal(average_ranks(x), scipy.stats.rankdata(x, method="average"))


def test_spearman_edge_cases():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])


@st.composite
def logits_and_labels(draw):
    n, c = draw(st.integers(1, 40)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = np.stack([rng.permutation(c) for _ in range(n)]).astype(np.float32)  # distinct per row
    logits += rng.normal(0, 0.1, (n, 1)).astype(np.float32)
    labels = rng.integers(0, c, n)
    return logits, labels


@settings(max_examples=150, deadline=None)
@given(logits_and_labels(), st.lists(st.integers(1, 15), min_size=1, max_size=3, unique=True))
def test_topk_matches_numpy_argsort(data, ks):
    logits, labels = data
    order = np.argsort(-logits, axis=1)
    expected = {
        f"top{k}": 100.0 * np.mean([labels[i] in order[i, :k] for i in range(len(labels))]) for k in ks
    }
    got = topk_accuracy(torch.from_numpy(logits), torch.from_numpy(labels), ks)
    assert got == pytest.approx(expected)


def test_topk_ties_and_nans_count_as_wrong():
    labels = torch.tensor([0, 1, 2])
    assert topk_accuracy(torch.zeros(3, 10), labels, ks=(1, 5)) == {"top1": 0.0, "top5": 0.0}
    assert topk_accuracy(torch.zeros(3, 10), labels, ks=(10,)) == {"top10": 100.0}
    logits = torch.eye(3)
    logits[1, 0] = float("nan")
    assert topk_accuracy(logits, labels, ks=(1,))["top1"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match=r"\(N, C\) logits"):
        topk_accuracy(torch.zeros(3), labels)


arrays = hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e3, 1e3, allow_nan=False))


def test_sqnr_known_value():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)  # 10 log10(100 / 1)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(torch.zeros(3), torch.zeros(4))


@settings(max_examples=100, deadline=None)
@given(arrays)
def test_sqnr_equal_is_inf(x):
    t = torch.from_numpy(x)
    assert sqnr_db(t, t.clone()) == math.inf


U = 2.0**-53  # float64 unit roundoff
TINY = 2.0**-1074  # the smallest float64: the absolute rounding step of subnormal results


def _sqnr_error_db(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """A bound on how far float64 `sqnr_db(ref, cand)` is from the exact SQNR of the values `ref` and `cand`
    stand for, when each of them was rounded once (``ref = fl(r)``, ``cand = fl(c)``: error u|x| + TINY).

    Each of the power sums S = sum ref^2 and N = sum (ref - cand)^2 has an error e of at most: the inputs'
    rounding (2|x|(u|x| + TINY) per square, through the difference for N), the squares' and the sum's rounding
    (n u S), and underflow (TINY per square). The dB value is then within 10 log10((S + e)/(S - e)) for each
    sum; a sum no larger than its error has no significant digit (a signal near -3200 dB is subnormal): inf.
    """
    x, d = ref.double().abs(), (ref - cand).double().abs()
    n = x.numel()
    signal, noise = float(x.square().sum()), float(d.square().sum())
    e_signal = float((2 * x * (U * x + TINY)).sum()) + 2 * n * (U * signal + TINY)
    e_noise = float((2 * d * (2 * U * (x + cand.double().abs()) + 2 * TINY)).sum()) + 2 * n * (
        U * noise + TINY
    )

    def db(value: float, error: float) -> float:
        return 10 * math.log10((value + error) / (value - error)) if value > error else math.inf

    return db(signal, e_signal) + db(noise, e_noise)


@settings(max_examples=100, deadline=None)
@given(arrays, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_sqnr_scale_invariant(x, seed, scale):
    # exact in real arithmetic; in float64 within the rounding bound of each side (tiny for normal numbers:
    # ~1e-13 dB; unbounded only where a power sum underflows to a few subnormal steps)
    ref = torch.from_numpy(x)
    assume(float(ref.square().sum()) > 0)
    noise = torch.from_numpy(np.random.default_rng(seed).normal(0, 1.0, x.shape))
    cand = ref + noise
    base = sqnr_db(ref, cand)
    tol = _sqnr_error_db(ref, cand) + _sqnr_error_db(scale * ref, scale * cand) + 1e-9  # + log10's rounding
    assert abs(sqnr_db(scale * ref, scale * cand) - base) <= tol
    half = ref + 0.5 * noise
    tol = _sqnr_error_db(ref, cand) + _sqnr_error_db(ref, half) + 1e-9
    assert abs(sqnr_db(ref, half) - (base + 20 * math.log10(2))) <= tol


def test_sqnr_error_bound_is_tight_for_normal_numbers():
    """The property test's tolerance stays meaningful: far below 1e-6 dB unless the powers underflow."""
    ref = torch.linspace(-3.0, 3.0, 50, dtype=torch.float64)
    assert _sqnr_error_db(ref, ref + 0.1) < 1e-10
    assert _sqnr_error_db(torch.full((3,), 1e-162, dtype=torch.float64), torch.ones(3)) == math.inf


@pytest.mark.parametrize("labels", [[0, 10, 2], [0, -1, 2]], ids=["too-large", "negative"])
def test_labels_outside_the_models_classes_are_a_data_error(labels):
    """An out-of-range label was a raw index error on the CPU (a device-side assert on CUDA)."""
    with pytest.raises(DataError, match=r"class indices in \[0, 10\)"):
        topk_accuracy(torch.randn(3, 10), torch.tensor(labels))
