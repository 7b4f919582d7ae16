"""Integer residuals in the simulation (recipe ``a_residual``): which tensors get quantized, and with what."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import postquant
from postquant.errors import DataError, RecipeError
from postquant.nn.act import ActQuantizer
from postquant.nn.residual import INPUT, OUTPUT, POOL, remove_points, residual_points, tracking
from tests.conftest import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class ResidualNet(nn.Module):
    """A stem, an identity block, a downsampling block with an option-A shortcut (strided slice and zero
    channel padding), global pooling and a linear head; `inplace`: ``out += shortcut`` and in-place ReLUs,
    as the original CIFAR ResNets write it."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem = conv_bn(3, 8)
        self.a1, self.a2 = conv_bn(8, 8), conv_bn(8, 8, relu=False)
        self.b1, self.b2 = conv_bn(8, 16, stride=2), conv_bn(16, 16, relu=False)
        self.fc = nn.Linear(16, 10)

    def join(self, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            out += shortcut
            return F.relu(out, inplace=True)
        return F.relu(out + shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.join(self.a2(self.a1(x)), x)
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))  # (N, 16, H/2, W/2)
        x = self.join(self.b2(self.b1(x)), shortcut)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PlainNet(nn.Module):
    """No residual add, max pooling before global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 8), conv_bn(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(F.max_pool2d(self.c1(x), 2))
        return self.fc(nn.AdaptiveAvgPool2d(1)(x).flatten(1))


def make(cls: type[nn.Module], **kw) -> nn.Module:
    torch.manual_seed(0)
    model = cls(**kw)
    randomize_bn(*(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)))
    return model.eval()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(3)]


W8A8 = {"w_bits": 8, "a_bits": 8, "symmetric": True}
RESIDUAL = {**W8A8, "a_residual": True}


def points_seen(qmodel: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """The (kind, key) of every point of one forward, in order."""
    seen: list[tuple[str, str]] = []

    def record(kind: str, key: str, t: torch.Tensor) -> torch.Tensor:
        seen.append((kind, key))
        return t

    model = copy.deepcopy(qmodel)
    remove_points(model)
    quantizing = {n for n, m in model.named_modules() if getattr(m, "act_quant", None) is not None}
    with tracking(model, quantizing, record), torch.no_grad():
        model(x)
    return seen


@pytest.mark.parametrize("inplace", [False, True], ids=["add", "inplace-add"])
def test_the_points_are_the_residual_operands_and_the_pool_input(inplace, batches):
    qmodel = postquant.quantize(make(ResidualNet, inplace=inplace), W8A8, calib=batches[:2])
    # the conv output of each block gets its output point; the block input (also through the strided
    # slice and the zero padding) the quantizer of the block's first conv; the last feature map a pool point
    assert points_seen(qmodel, batches[2]) == [
        (OUTPUT, "a2.0"),
        (INPUT, "a1.0"),
        (OUTPUT, "b2.0"),
        (INPUT, "b1.0"),
        (POOL, "0"),
    ]


@pytest.mark.parametrize("inplace", [False, True], ids=["add", "inplace-add"])
def test_the_simulation_quantizes_its_points(inplace, batches):
    model = make(ResidualNet, inplace=inplace)
    qmodel = postquant.quantize(model, RESIDUAL, calib=batches[:2])
    points = residual_points(qmodel)
    assert type(qmodel) is ResidualNet
    assert set(points.output_points()) == {"a2.0", "b2.0"} and set(points.pool_points()) == {0}
    assert all(q.bits == 8 for q in [*points.output_points().values(), *points.pool_points().values()])

    # by hand: the same model without points, with each point applied where it sits
    bare = copy.deepcopy(qmodel)
    remove_points(bare)
    out_a2, out_b2 = points.output_points()["a2.0"], points.output_points()["b2.0"]
    pool, a1, b1 = points.pool_points()[0], bare.a1[0].act_quant, bare.b1[0].act_quant
    with torch.no_grad():
        x = bare.stem(batches[2])
        x = F.relu(out_a2(bare.a2(bare.a1(x))) + a1(x))
        shortcut = b1(F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)))
        x = F.relu(out_b2(bare.b2(bare.b1(x))) + shortcut)
        expected = bare.fc(F.adaptive_avg_pool2d(pool(x), 1).flatten(1))
        got = qmodel(batches[2])
        without = bare(batches[2])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, without)  # the points change the function


def test_without_the_option_nothing_changes(batches):
    model = make(ResidualNet)
    plain = postquant.quantize(model, W8A8, calib=batches[:2])
    off = postquant.quantize(model, {**W8A8, "a_residual": False}, calib=batches[:2])
    assert residual_points(off) is None and not off._forward_pre_hooks and not off._forward_hooks
    assert plain.state_dict().keys() == off.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(off(batches[2]), plain(batches[2]), rtol=0, atol=0)
    assert "a_residual" not in postquant.result(off).recipe.model_dump()  # the same recipe fingerprint


def test_a_model_without_adds_gets_only_its_pool_point(batches):
    qmodel = postquant.quantize(make(PlainNet), RESIDUAL, calib=batches[:2])
    assert points_seen(qmodel, batches[2]) == [(POOL, "0")]
    points = residual_points(qmodel)
    assert not points.output_points() and set(points.pool_points()) == {0}


def test_the_points_survive_a_copy_and_an_exception(batches):
    qmodel = postquant.quantize(make(ResidualNet), RESIDUAL, calib=batches[:2])
    twin = copy.deepcopy(qmodel)
    assert residual_points(twin) is not residual_points(qmodel)
    with pytest.raises(RuntimeError):
        twin(torch.randn(2, 5, 16, 16))  # a wrong input: the forward fails inside the tracked forward
    with torch.no_grad():  # the mode was left: plain torch ops run untracked, the model again tracked
        torch.testing.assert_close(twin(batches[2]), qmodel(batches[2]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"a_residual": True}, "set a_bits"),
        ({**RESIDUAL, "act_ranges": "squant-noise"}, "data-free"),
    ],
    ids=["weight-only", "data-free-ranges"],
)
def test_the_recipe_refuses_integer_residuals_it_cannot_calibrate(fields, message):
    with pytest.raises(RecipeError, match=message):
        postquant.Recipe.coerce(fields)


def test_integer_residuals_need_calibration_data(batches):
    with pytest.raises(DataError, match="a_residual"):
        postquant.quantize(make(ResidualNet), RESIDUAL, example_inputs=batches[0])


@pytest.mark.parametrize("method", ["squant", "adaround"])
def test_other_rounding_methods_keep_the_points(method, batches):
    recipe = {**RESIDUAL, "method": method}
    if method == "adaround":
        recipe["learned"] = {"iters": 2, "progress": False, "batch_size": 16}
    qmodel = postquant.quantize(make(ResidualNet), recipe, calib=batches[:2])
    assert set(residual_points(qmodel).output_points()) == {"a2.0", "b2.0"}
    assert points_seen(qmodel, batches[2])[-1] == (POOL, "0")


@settings(max_examples=40, deadline=None)
@given(
    lo=st.floats(-4, 0),
    hi=st.floats(0.01, 4),
    stride=st.integers(1, 3),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_a_moved_operand_quantized_is_the_moved_quantized_tensor(lo, hi, stride, pad, seed):
    """Why quantizing a shortcut with the quantizer of the layer that takes the block input is exact: strided
    slicing, zero padding and max pooling commute with an activation quantizer (zero is on its grid)."""
    q = ActQuantizer(8, lo, hi)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 3

    def move(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(t[:, :, ::stride, ::stride], (0, 0, 0, 0, pad, pad)), 1)

    torch.testing.assert_close(q(move(x)), move(q(x)), rtol=0, atol=0)
