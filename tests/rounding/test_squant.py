"""Tests of SQuant rounding (docs/algorithms.md 2.2): golden vectors, invariants, edge cases.

The golden vectors in ``shared/golden/squant/`` are the integer outputs of the reference implementation
(README there). Every case must match integer for integer, including the cases where a stable sort would
break a tie differently from the reference's ``torch.sort``.
"""

from __future__ import annotations

import functools
import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from postquant.errors import NonFiniteWeightError
from postquant.paths import shared_path
from postquant.rounding import squant as squant_module
from postquant.rounding import squant_cpu
from postquant.rounding.squant import SquantMode, squant_codes, squant_codes_many

GOLDEN = shared_path("golden", "squant")
GOLDEN_FILES = ("edge_cases", "efficientnet_lite0_layers", "random_layers", "resnet20_layers")
GOLDEN_CASES = 269  # README: 36 + 33 + 140 + 60
MODES = {
    "squant-e": SquantMode.E,
    "squant-k": SquantMode.EK,
    "squant-c": SquantMode.EC,
    "squant": SquantMode.EKC,
}


# ----------------------------------------------------------------------------------------------------------
# Golden vectors


@functools.cache
def _golden(stem: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{stem}.npz") as d:
        return {key: d[key] for key in d.files}


def _golden_params() -> list:
    params = []
    for stem in GOLDEN_FILES:
        path = GOLDEN / f"{stem}.npz"
        if not path.is_file():
            reason = f"SQuant golden vectors not found at {path}; set POSTQUANT_SHARED to the shared folder"
            params.append(
                pytest.param(None, None, None, id=f"{stem}:missing", marks=pytest.mark.skip(reason=reason))
            )
            continue
        with np.load(path) as d:
            index = zip(d["index/tensor"], d["index/mode"], d["index/name"], strict=True)
            for tid, mode, name in index:
                short = re.sub(r"[^\w.\[\]*-]+", "_", str(name))[:40].strip("_")
                params.append(pytest.param(stem, str(tid), str(mode), id=f"{stem}:{tid}:{short}:{mode}"))
    return params


@pytest.mark.parametrize(("stem", "tid", "mode"), _golden_params())
def test_golden_case_bit_exact(stem: str, tid: str, mode: str) -> None:
    """Every integer equals the reference's, for all modes (stable-sort-equal or not)."""
    d = _golden(stem)
    x = torch.from_numpy(d[f"{tid}/x"])
    q = squant_codes(x, int(d[f"{tid}/tmin"]), int(d[f"{tid}/tmax"]), MODES[mode])
    expected = torch.from_numpy(d[f"{tid}/q_{mode}"])
    assert q.dtype == torch.int32 and q.shape == expected.shape
    mismatches = int((q != expected).sum())
    assert mismatches == 0, f"{mismatches} of {q.numel()} codes differ from the reference"


@pytest.mark.parametrize("stem", GOLDEN_FILES)
def test_golden_cases_whole_layer_bit_exact(stem: str, device: torch.device) -> None:
    """The whole-layer path (the default on accelerators) reproduces every golden case, on CPU and CUDA."""
    path = GOLDEN / f"{stem}.npz"
    if not path.is_file():
        pytest.skip(f"SQuant golden vectors not found at {path}; set POSTQUANT_SHARED to the shared folder")
    d = _golden(stem)
    wrong = []
    for tid, mode in zip(d["index/tensor"], d["index/mode"], strict=True):
        x = torch.from_numpy(d[f"{tid}/x"]).to(device)
        q = squant_codes(x, int(d[f"{tid}/tmin"]), int(d[f"{tid}/tmax"]), MODES[str(mode)], whole_layer=True)
        assert q.device == x.device
        mismatches = int((q.cpu() != torch.from_numpy(d[f"{tid}/q_{mode}"])).sum())
        if mismatches:
            wrong.append(f"{tid}/{mode}: {mismatches} of {q.numel()}")
    assert not wrong, f"codes differ from the reference in {len(wrong)} cases: {wrong[:10]}"


@pytest.mark.parametrize("mode", list(SquantMode), ids=lambda m: m.value)
def test_many_layers_at_once_equal_each_layer_alone(mode: SquantMode, device: torch.device) -> None:
    """`squant_codes_many` batches layers of one shape (any order, odd shapes and empty ones between)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [
        (8, 6, 3, 3),
        (5, 6, 3, 3),
        (7, 12),
        (0, 6, 3, 3),
        (3, 6, 3, 3),
        (4, 2, 7, 7),
        (9, 12),
        (4, 6, 3, 3),
    ]
    xs = [
        reference_grid(torch.randn(shape, generator=gen) * 0.05, 3)[0].to(device)
        if shape[0]
        else torch.empty(shape, device=device)
        for shape in shapes
    ]
    xs[4] = torch.round(xs[4] * 4) / 4  # exact ties at the channel boundary
    for whole_layer in (None, True, False):
        many = squant_codes_many(xs, -4, 3, mode, whole_layer=whole_layer)
        assert [q.shape for q in many] == [x.shape for x in xs]
        for x, q in zip(xs, many, strict=True):
            assert q.device == x.device
            assert torch.equal(q.cpu(), squant_codes(x.cpu(), -4, 3, mode)), (x.shape, whole_layer)
    assert squant_codes_many([], -4, 3) == []
    bad = [xs[0], xs[1].clone()]
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        squant_codes_many(bad, -4, 3, mode, whole_layer=True)


@pytest.mark.parametrize("block", [300, 1000, 1 << 19])
def test_many_small_layers_stacked_on_the_cpu(block: int) -> None:
    """On the CPU `squant_codes_many` stacks small layers of one shape along their output channels, in
    batches of at most a block (here also smaller blocks, so that batches split): the same codes as alone."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(4, 5, 3, 3), (7, 5, 3, 3), (2, 5, 3, 3), (6, 8), (3, 5, 3, 3), (1, 8), (9, 5, 3, 3), (5, 8)]
    xs = [reference_grid(torch.randn(shape, generator=gen) * 0.05, 4)[0] for shape in shapes]
    alone = [squant_codes(x, -8, 7) for x in xs]
    with mock.patch.object(squant_module, "_BLOCK_ELEMENTS", block):
        many = squant_codes_many(xs, -8, 7)
    assert all(torch.equal(a, b) for a, b in zip(alone, many, strict=True))


def test_golden_set_is_complete() -> None:
    """All four files are there with the 269 cases of the README (guards against a silently smaller set)."""
    missing = [stem for stem in GOLDEN_FILES if not (GOLDEN / f"{stem}.npz").is_file()]
    if missing:
        pytest.skip(
            f"SQuant golden vectors {missing} not found in {GOLDEN}; set POSTQUANT_SHARED to the shared folder"
        )
    n_cases = sum(len(_golden(stem)["index/case"]) for stem in GOLDEN_FILES)
    unstable = sum(int((~_golden(stem)["index/stable_sort_equal"]).sum()) for stem in GOLDEN_FILES)
    assert n_cases == GOLDEN_CASES
    assert unstable == 12  # 7 Lite0 + 5 edge cases where only the reference's own tie order matches


# ----------------------------------------------------------------------------------------------------------
# Helpers: the reference grid, and a literal per-group restatement of the algorithm


def reference_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, int, int]:
    """x = S * w - Z with the reference's per-output-channel min/max grid, all in float32 (golden README)."""
    w = w.float()
    flat = w.reshape(w.shape[0], -1)
    mn, mx = flat.amin(1), flat.amax(1)
    scale = (2.0**bits - 1) / torch.clamp(mx - mn, min=1e-8)
    zero = torch.round(scale * mn) + 2.0 ** (bits - 1)
    view = (-1,) + (1,) * (w.dim() - 1)
    return scale.view(view) * w - zero.view(view), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def loop_squant(x: torch.Tensor, tmin: int, tmax: int, mode: str) -> torch.Tensor:
    """SQuant one group at a time, a literal restatement of the golden README's description (slow)."""
    x3 = x.float().reshape(x.shape[0], x.shape[1], -1)
    r = x3.round()
    e = r - x3
    zeros = torch.zeros_like(e)
    up = (e < 0) & (x3 < tmax)
    down = (e > 0) & (x3 > tmin)
    lists = {  # direction -> (rounding after a flip, error after a flip, priority)
        True: (torch.where(up, r + 1, r), torch.where(up, e + 1, zeros), torch.where(up, e.abs(), zeros)),
        False: (
            torch.where(down, r - 1, r),
            torch.where(down, e - 1, zeros),
            torch.where(down, e.abs(), zeros),
        ),
    }

    def stage(shape: tuple[int, ...], clear: bool) -> None:
        ev, rv = e.view(shape), r.view(shape)
        sums = ev.sum(-1)
        orders = {
            d: torch.sort(lists[d][2].view(shape), dim=-1, descending=True).indices for d in (True, False)
        }
        if clear:
            for d in (True, False):
                lists[d][2].zero_()
        for a in range(shape[0]):
            for b in range(shape[1]):
                s = sums[a, b]
                d = bool(s < 0)
                number, error = lists[d][0].view(shape), lists[d][1].view(shape)
                order, k = orders[d][a, b], int(s.abs().round())
                idx = order[:k]
                ev[a, b, idx] = error[a, b, idx]
                rv[a, b, idx] = number[a, b, idx]
                j, target = (order[k - 1], not d) if k >= s.abs() else (order[k], d)
                lists[target][2].view(shape)[a, b, j] = ev[a, b, j].abs()

    if mode in ("ek", "ekc") and x3.shape[2] > 1:
        stage(tuple(x3.shape), clear=True)
    if mode in ("ec", "ekc"):
        stage((1, x3.shape[0], x3[0].numel()), clear=False)
    return r.clamp(tmin, tmax).to(torch.int32).view(x.shape)


def _sums(err: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return err.reshape(shape).sum(-1).abs()


# ----------------------------------------------------------------------------------------------------------
# Properties on random layers

SHAPES = [
    (6, 4, 3, 3),
    (5, 3, 2, 2),
    (4, 2, 5, 5),
    (3, 2, 7, 7),
    (7, 12),
    (5, 8, 1, 1),
    (6, 1, 3, 3),
    (4, 5, 3),
]


@st.composite
def layers(
    draw: st.DrawFn, repeated: st.SearchStrategy[bool] = st.booleans()
) -> tuple[torch.Tensor, int, int]:
    """x on the reference grid of random weights; `repeated` weights give many exactly tied priorities."""
    shape = draw(st.sampled_from(SHAPES))
    bits = draw(st.integers(2, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    w = torch.randn(shape, generator=gen) * 0.05
    if draw(repeated):
        w = torch.round(w * 60) / 60  # repeated values
    return reference_grid(w, bits)


@settings(max_examples=50, deadline=None)
@given(layers(), st.sampled_from(list(SquantMode)), st.booleans())
def test_equals_per_group_restatement(
    layer: tuple[torch.Tensor, int, int], mode: SquantMode, whole_layer: bool
) -> None:
    """The vectorised codes (blocked and whole-layer paths) equal a one-group-at-a-time restatement, ties
    and clamping included."""
    x, tmin, tmax = layer
    q = squant_codes(x, tmin, tmax, mode, whole_layer=whole_layer)
    assert torch.equal(q, loop_squant(x, tmin, tmax, mode.value))


@st.composite
def lattice_layers(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    """x of a random shape and bit width on a lattice of step 1/2^j, reaching one step beyond [tmin, tmax]:
    coarse lattices give exact ties of priorities, errors of exactly +-0.5, kernels and channels whose error
    sum is exactly 0 or a half-integer, and elements at and beyond the range's ends."""
    oc, ic = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kernel = draw(st.sampled_from([(), (2,), (3,), (1, 1), (2, 2), (3, 3), (1, 3), (4, 5), (5, 5)]))
    bits = draw(st.integers(2, 8))
    tmin, tmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    denom = 2 ** draw(st.sampled_from([0, 1, 2, 3, 12]))  # 2^12: practically no ties
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randint((tmin - 1) * denom, (tmax + 1) * denom + 1, (oc, ic, *kernel), generator=gen)
    return x.float() / denom, tmin, tmax


@settings(max_examples=80, deadline=None)
@given(lattice_layers(), st.sampled_from(list(SquantMode)), st.sampled_from([1, 64, 1 << 18]))
def test_equals_restatement_on_random_shapes_with_ties(
    layer: tuple[torch.Tensor, int, int], mode: SquantMode, block_elements: int
) -> None:
    """The CPU path (in blocks of channels as small as one kernel's worth, so that kernels the fast kernel
    stage cannot order are collected from several blocks) and the whole-layer path give the codes of the
    one-group-at-a-time restatement, on any shape and bit width, with many exact ties."""
    x, tmin, tmax = layer
    expected = loop_squant(x, tmin, tmax, mode.value)
    with mock.patch.object(squant_module, "_BLOCK_ELEMENTS", block_elements):
        q = squant_codes(x, tmin, tmax, mode, whole_layer=False)
    assert torch.equal(q, expected)
    assert torch.equal(squant_codes(x, tmin, tmax, mode, whole_layer=True), expected)


@settings(max_examples=50, deadline=None)
@given(layers(), st.sampled_from(list(SquantMode)))
def test_codes_in_range_and_one_step_from_nearest(
    layer: tuple[torch.Tensor, int, int], mode: SquantMode
) -> None:
    x, tmin, tmax = layer
    q = squant_codes(x, tmin, tmax, mode)
    assert q.dtype == torch.int32 and q.shape == x.shape
    assert int(q.min()) >= tmin and int(q.max()) <= tmax
    assert int((q - torch.round(x).to(torch.int32)).abs().max()) <= 1
    if mode is SquantMode.E:
        assert torch.equal(q, torch.round(x).clamp(tmin, tmax).to(torch.int32))


@settings(max_examples=50, deadline=None)
@given(layers(repeated=st.just(False)))
def test_error_sum_bounds(layer: tuple[torch.Tensor, int, int]) -> None:
    """CASE bounds (docs/algorithms.md 2.2): |kernel sum| <= 0.5 after K alone, |channel sum| <= 0.5 after C
    (alone or after K), |kernel sum| <= 1 after K+C.

    They hold exactly when x lies inside [tmin, tmax]: then every element with a negative (positive) error is
    an up (down) candidate, so a group needing k flips has k candidates, and no code is clamped. The
    reference grid puts x up to 0.5 outside, so x is clipped here first. Continuous random weights also
    avoid groups whose float32 error sum is exactly 0 (their `order[-1]` hand-off can be a no-op flip).
    """
    x, tmin, tmax = layer
    x = x.clamp(tmin, tmax)
    oc, ic = x.shape[0], x.shape[1]
    kernels, channels = (oc, ic, -1), (oc, -1)
    tol = 1e-4

    def err(mode: SquantMode) -> torch.Tensor:
        return squant_codes(x, tmin, tmax, mode).double() - x.double()

    if x[0, 0].numel() > 1:
        assert float(_sums(err(SquantMode.EK), kernels).max()) <= 0.5 + tol
    assert float(_sums(err(SquantMode.EC), channels).max()) <= 0.5 + tol
    e = err(SquantMode.EKC)
    assert float(_sums(e, channels).max()) <= 0.5 + tol
    assert float(_sums(e, kernels).max()) <= 1 + tol
    assert float(e.abs().max()) < 1


# ----------------------------------------------------------------------------------------------------------
# Edge cases


def test_empty_tensor_gives_empty_codes() -> None:
    for shape in [(0,), (0, 3, 3, 3), (4, 0)]:
        q = squant_codes(torch.empty(shape), -8, 7)
        assert q.shape == shape and q.dtype == torch.int32


@pytest.mark.parametrize("mode", list(SquantMode), ids=lambda m: m.value)
def test_zero_and_constant_channels(mode: SquantMode) -> None:
    """All-zero and constant channels (error sums exactly 0) give finite codes equal to nearest rounding."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 3, 3, generator=gen) * 0.05
    w[1] = 0.0
    w[2] = 0.0123
    x, tmin, tmax = reference_grid(w, 4)
    q = squant_codes(x, tmin, tmax, mode)
    assert torch.equal(q[1:3], torch.round(x[1:3]).clamp(tmin, tmax).to(torch.int32))
    assert torch.equal(q, loop_squant(x, tmin, tmax, mode.value))


@pytest.mark.parametrize("whole_layer", [False, True], ids=["blocked", "whole"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad: float, whole_layer: bool) -> None:
    x = torch.zeros(4, 3, 3, 3)
    x[2, 1, 0, 0] = bad
    for mode in SquantMode:
        with pytest.raises(NonFiniteWeightError, match="NaN or Inf"):  # a ValueError
            squant_codes(x, -8, 7, mode, whole_layer=whole_layer)
    with pytest.raises(NonFiniteWeightError):
        squant_codes(x.view(4, 27), -8, 7, whole_layer=whole_layer)  # channel stage only


def test_huge_finite_values_are_not_reported_as_non_finite() -> None:
    x = torch.full((2, 3, 3, 3), 3e38)  # their float32 sum overflows, the values do not
    assert int(squant_codes(x, -8, 7).min()) == 7


@pytest.mark.parametrize(
    "shape",
    [(10, 12), (6, 8, 1, 1), (6, 5, 3), (8, 1, 3, 3)],
    ids=["linear", "conv1x1", "conv1d", "depthwise"],
)
def test_layer_shapes(shape: tuple[int, ...]) -> None:
    """Linear and 1x1 skip the kernel stage; conv1d and depthwise kernels are the trailing dims."""
    gen = torch.Generator().manual_seed(1)
    x, tmin, tmax = reference_grid(torch.randn(shape, generator=gen), 3)
    codes = {mode: squant_codes(x, tmin, tmax, mode) for mode in SquantMode}
    for mode, q in codes.items():
        assert q.shape == shape
        assert torch.equal(q, loop_squant(x, tmin, tmax, mode.value))
    if len(shape) == 2 or shape[2:] == (1, 1):
        assert torch.equal(codes[SquantMode.EK], codes[SquantMode.E])
        assert torch.equal(codes[SquantMode.EKC], codes[SquantMode.EC])
    else:
        assert not torch.equal(codes[SquantMode.EK], codes[SquantMode.E])


def test_mode_accepts_enum_and_string_and_rejects_unknown() -> None:
    x, tmin, tmax = reference_grid(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2)), 4)
    q = squant_codes(x, tmin, tmax, SquantMode.EKC)
    assert torch.equal(q, squant_codes(x, tmin, tmax, "ekc"))
    assert torch.equal(q, squant_codes(x, tmin, tmax))  # full SQuant is the default
    with pytest.raises(ValueError, match="'e', 'ek', 'ec', 'ekc'"):
        squant_codes(x, tmin, tmax, "kc")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tmin"):
        squant_codes(torch.zeros(2, 2, 3, 3), 7, -8)
    with pytest.raises(ValueError, match="at least 2 dims"):
        squant_codes(torch.zeros(5), -8, 7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_any_float_dtype_is_computed_in_float32(dtype: torch.dtype) -> None:
    x, tmin, tmax = reference_grid(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(3)), 4)
    x = x.to(dtype)
    assert torch.equal(squant_codes(x, tmin, tmax), squant_codes(x.float(), tmin, tmax))


def test_large_layer_matches_restatement_on_sampled_channels() -> None:
    """A layer large enough for several blocks of channels: every channel is independent, so the
    codes of a few channels equal those of the same channels rounded alone; the whole-layer path agrees."""
    gen = torch.Generator().manual_seed(4)
    x, tmin, tmax = reference_grid(torch.randn(300, 128, 3, 3, generator=gen) * 0.05, 4)
    q = squant_codes(x, tmin, tmax)
    assert torch.equal(q, squant_codes(x, tmin, tmax, whole_layer=True))
    for c in (0, 150, 299):
        assert torch.equal(q[c : c + 1], squant_codes(x[c : c + 1], tmin, tmax))
    assert torch.equal(q[:2], loop_squant(x[:2], tmin, tmax, "ekc"))


@pytest.mark.parametrize("oc", [1, 2, 3, 5, 229, 455])
def test_channel_blocks_never_hold_a_single_channel(oc: int) -> None:
    """Channel sums must not run over a one-row tensor: torch may split such a sum across threads, which
    changes its float32 rounding (the reference sums all channels at once)."""
    from postquant.rounding.squant import _channel_blocks

    for per_channel in (1152, 4608, 1 << 16, 1 << 20):
        blocks = _channel_blocks(oc, per_channel)
        assert blocks[0][0] == 0 and blocks[-1][1] == oc
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
        assert all(c1 - c0 >= min(2, oc) for c0, c1 in blocks)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600), st.integers(2, 16), st.integers(0, 2**32 - 1))
def test_kernel_sums_are_torch_sums_bit_for_bit(kernels: int, klen: int, seed: int) -> None:
    """The compiled kernel stage adds each kernel's errors in the order torch.sum uses (`_sum_order`, where a
    probe confirmed it): it decides every kernel as with torch's float32 sums given. The errors come in pairs
    +-v of widely spread magnitudes, so that the exact sums are 0 and the float32 sums are rounding residues
    whose sign (the direction, a zero sum's hand-off) depends on the order of the additions."""
    order = squant_module._sum_order(klen)
    assume(order is not None)  # known on this machine (else torch's sums are taken)
    gen = np.random.default_rng(seed)
    v = gen.uniform(0.01, 0.49, (kernels, klen // 2)) * np.exp2(gen.integers(-20, 1, (kernels, klen // 2)))
    e = np.concatenate([v, -v, np.zeros((kernels, klen % 2))], axis=1).astype(np.float32)
    e = np.take_along_axis(e, gen.permuted(np.tile(np.arange(klen), (kernels, 1)), axis=1), axis=1)
    x = -e  # rounds to 0: its error is e
    torch_sums = torch.from_numpy(e).sum(1).numpy()
    results = []
    for sums in (squant_module._NO_SUMS, torch_sums):
        out = (
            np.empty((kernels, klen), np.int32),
            np.empty((kernels, klen), np.float32),
            np.empty(kernels, np.int32),
            np.empty(kernels, np.float32),
            np.empty(kernels, bool),
        )
        assert squant_cpu.loops().kernel_stage(x, sums, np.array(order, dtype=np.intp), -8, 7, *out)
        results.append(out)
    for computed, given_sums in zip(*results, strict=True):
        assert np.array_equal(computed, given_sums)


def test_unknown_sum_order_takes_torch_sums() -> None:
    """Where the probe does not confirm torch's order of additions (another vector width), the kernel sums
    are torch's own: the same codes."""
    gen = torch.Generator().manual_seed(8)
    x, tmin, tmax = reference_grid(torch.randn(9, 7, 3, 3, generator=gen) * 0.05, 3)
    x[2] = torch.round(x[2] * 4) / 4  # exact ties and zero sums
    with mock.patch.object(squant_module, "_sum_order", lambda klen: None):
        for mode in (SquantMode.EK, SquantMode.EKC):
            assert torch.equal(squant_codes(x, tmin, tmax, mode), loop_squant(x, tmin, tmax, mode.value))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([(2,), (3,), (2, 2), (3, 3), (4, 4)]),
    st.integers(2, 8),
    st.sampled_from([1, 2, 4, 4096]),
    st.integers(0, 2**32 - 1),
)
def test_compiled_stages_on_chunk_tails(
    oc: int, ic: int, kernel: tuple[int, ...], bits: int, denom: int, seed: int
) -> None:
    """Layers of up to 1600 kernels (the compiled kernel stage works in chunks of `squant_cpu._CHUNK`, so
    any number of whole chunks and a tail) give the codes of the whole-layer path, an independent torch
    statement of the same rules, in every mode, on lattices with many exact ties."""
    tmin, tmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(seed)
    shape = (oc, ic, *kernel)
    x = torch.randint((tmin - 1) * denom, (tmax + 1) * denom + 1, shape, generator=gen).float() / denom
    for mode in SquantMode:
        expected = squant_codes(x, tmin, tmax, mode, whole_layer=True)
        assert torch.equal(squant_codes(x, tmin, tmax, mode, whole_layer=False), expected), mode


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([SquantMode.EK, SquantMode.EKC]))
def test_priorities_nearly_or_exactly_equal(seed: int, mode: SquantMode) -> None:
    """Kernels where two, three or more priorities are a few float32 steps apart or exactly equal, anywhere
    in the order: the codes equal the restatement's (the kernel stage ranks exact float32 priorities, equal
    ones by index as the reference's stable sort does)."""
    gen = np.random.default_rng(seed)
    oc, ic = 6, 20
    near = gen.uniform(0.02, 0.5, (oc, ic, 1)) + gen.choice([0.0, 1e-5, 4e-5, 1e-4, 2e-4], (oc, ic, 9))
    e = np.where(gen.random((oc, ic, 9)) < 0.6, np.minimum(near, 0.5), gen.uniform(0, 0.5, (oc, ic, 9)))
    sign = gen.choice([-1, 1], (oc, ic, 9))
    x = torch.from_numpy((gen.integers(-7, 7, (oc, ic, 9)) - sign * e).astype(np.float32)).view(oc, ic, 3, 3)
    assert torch.equal(squant_codes(x, -8, 7, mode), loop_squant(x, -8, 7, mode.value))


def test_workspace_reuses_grows_and_separates_its_buffers() -> None:
    """Named scratch arrays: a name's buffer is reused by later calls and grown when too small; distinct
    names never share memory; arrays above the keep limit are not kept."""
    ws = squant_module._Workspace()
    a = ws.array("a", (3, 4), np.float32)
    b = ws.array("b", (5,), np.int64)
    a[:] = 1.0
    b[:] = 2
    assert a.shape == (3, 4) and a.dtype == np.float32 and not np.shares_memory(a, b)
    assert np.shares_memory(ws.array("a", (2, 2), np.uint16), a)
    big = ws.array("a", (1000,), np.float64)
    assert big.shape == (1000,) and not np.shares_memory(big, a)
    assert np.shares_memory(ws.array("a", (10,), np.float64), big)
    with mock.patch.object(squant_module, "_WORKSPACE_KEEP_BYTES", 100):
        huge = ws.array("a", (10_000,), np.float64)
        assert huge.shape == (10_000,) and np.shares_memory(ws.array("a", (10,), np.float64), big)


def test_threads_have_their_own_workspace() -> None:
    """Concurrent calls on the CPU (each thread's scratch arrays are its own) give the serial codes."""
    gen = torch.Generator().manual_seed(9)
    layers = [
        reference_grid(torch.randn(s, generator=gen) * 0.05, 4)
        for s in [(40, 30, 3, 3), (30, 60), (20, 50, 3, 3)] * 3
    ]
    serial = [squant_codes(x, tmin, tmax) for x, tmin, tmax in layers]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(lambda layer: squant_codes(*layer), layers))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
