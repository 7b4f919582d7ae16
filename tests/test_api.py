from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import postquant
from postquant.errors import DataError, NonFiniteWeightError, UnsupportedModelError
from postquant.eval import sqnr_db
from postquant.model import quantized_layers
from postquant.nn import QuantizedLayer
from postquant.plan import make_plan
from postquant.recipe import Recipe


def test_quantize_leaves_original_alone_and_returns_plain_module(tiny_cnn, images):
    before = copy.deepcopy(tiny_cnn.state_dict())
    q = postquant.quantize(tiny_cnn, {"w_bits": 4}, example_inputs=images)
    assert isinstance(q, nn.Module) and q is not tiny_cnn
    for k, v in tiny_cnn.state_dict().items():
        assert torch.equal(v, before[k])
    assert set(quantized_layers(q)) == {"conv1", "conv2", "conv3", "fc"}
    assert all(isinstance(m, nn.Identity) for m in (q.bn1, q.bn2))  # folded


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_more_bits_less_error(tiny_cnn, images, bits):
    with torch.no_grad():
        ref = tiny_cnn(images)
        lo = postquant.quantize(tiny_cnn, {"w_bits": bits}, example_inputs=images)(images)
        hi = postquant.quantize(tiny_cnn, {"w_bits": min(bits + 2, 8)}, example_inputs=images)(images)
    if bits < 8:
        assert sqnr_db(ref, hi) > sqnr_db(ref, lo)
    assert sqnr_db(ref, postquant.quantize(tiny_cnn, {"w_bits": 8}, example_inputs=images)(images)) > 30


def test_weight_only_codes_equal_nearest_rounding(tiny_cnn, images):
    q = postquant.quantize(tiny_cnn, {"w_bits": 3, "fold_bn": False})
    layer = q.conv2
    assert isinstance(layer, QuantizedLayer)
    w = tiny_cnn.conv2.weight.detach()
    assert torch.equal(layer.codes.int(), layer.grid.nearest(w))
    assert layer.act_quant is None


def test_first_last_policy_and_overrides(tiny_cnn, images):
    r = Recipe.coerce(
        {
            "w_bits": 4,
            "a_bits": 4,
            "overrides": {
                "@first": {"a_bits": None},
                "@last": {"a_bits": 8, "w_bits": 8},
                "conv3": {"w_bits": None},
            },
        }
    )
    plan = make_plan(tiny_cnn, r)
    assert (plan["conv1"].w_bits, plan["conv1"].a_bits) == (4, None)
    assert (plan["conv2"].w_bits, plan["conv2"].a_bits) == (4, 4)
    assert plan["conv3"].w_bits is None
    assert (plan["fc"].w_bits, plan["fc"].a_bits) == (8, 8)
    q = postquant.quantize(tiny_cnn, r, calib=images)
    assert isinstance(q.conv3, nn.Conv2d) and not isinstance(q.conv3, QuantizedLayer)
    assert q.conv1.act_quant is None and q.conv2.act_quant.bits == 4 and q.fc.act_quant.bits == 8


def test_weight_only_recipe_never_quantizes_activations(tiny_cnn):
    plan = make_plan(tiny_cnn, Recipe(w_bits=4))
    assert all(p.a_bits is None for p in plan.values())


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_activation_calibration_from_data(tiny_cnn, images, observer):
    q = postquant.quantize(tiny_cnn, {"w_bits": 8, "a_bits": 8, "a_observer": observer}, calib=images)
    assert q.conv2.act_quant is not None
    with torch.no_grad():
        assert sqnr_db(tiny_cnn(images), q(images)) > 20


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"w_bits": 4, "a_bits": 4}, "minmax"),
        ({"method": "squant", "w_bits": 4, "a_bits": 4}, "minmax"),
        ({"method": "learned", "w_bits": 4, "a_bits": 4}, "mse"),
        ({"method": "qdrop", "w_bits": 4, "a_bits": 4}, "mse"),
        ({"method": "learned", "w_bits": 4, "a_bits": 4, "a_observer": "minmax"}, "minmax"),
        ({"w_bits": 4, "a_bits": 4, "a_observer": "percentile"}, "percentile"),
    ],
)
def test_activation_observer_default_depends_on_the_method(tiny_cnn, images, recipe, expected):
    """Learned rounding calibrates activations with MSE unless the recipe names an observer; a saved recipe
    (null observer) keeps meaning "the method's default" when it is loaded again."""
    learned = (
        {"learned": {"iters": 1, "progress": False}} if recipe.get("method") in ("learned", "qdrop") else {}
    )
    r = Recipe.coerce({**recipe, **learned, "calib_size": 16})
    done = postquant.result(postquant.quantize(tiny_cnn, r, calib=images[:16]))
    assert (str(done.act_ranges), str(done.act_observer)) == ("calib", expected)
    assert Recipe.model_validate(r.model_dump(mode="json")).a_observer == r.a_observer


def test_data_free_noise_rule_needs_only_example_inputs(tiny_cnn, images):
    q = postquant.quantize(tiny_cnn, {"method": "squant", "w_bits": 4, "a_bits": 4}, example_inputs=images)
    assert q.conv2.act_quant is not None and q.conv1.act_quant is None
    q2 = postquant.quantize(tiny_cnn, {"method": "squant", "w_bits": 4, "a_bits": 4}, example_inputs=images)
    assert torch.equal(q(images), q2(images))  # seeded: same result twice


def test_calib_rule_without_data_is_a_clear_error(tiny_cnn, images):
    with pytest.raises(DataError, match="calib"):
        postquant.quantize(tiny_cnn, {"w_bits": 4, "a_bits": 4, "act_ranges": "calib"}, example_inputs=images)


def test_model_without_quantizable_layers():
    with pytest.raises(UnsupportedModelError, match="no Conv1d, Conv2d or Linear"):
        postquant.quantize(nn.Sequential(nn.ReLU()), {"w_bits": 4})


def test_ignore_everything_is_an_error(tiny_cnn):
    with pytest.raises(UnsupportedModelError, match="excluded"):
        postquant.quantize(tiny_cnn, {"w_bits": 4, "ignore": ["*"]})


def test_nan_weights_are_named(tiny_cnn):
    with torch.no_grad():
        tiny_cnn.conv2.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightError, match=r"conv2\.weight"):
        postquant.quantize(tiny_cnn, {"w_bits": 4})


@pytest.mark.parametrize(
    "calib,match",
    [
        ([], "empty"),
        (torch.empty(0, 3, 8, 8), "empty"),
        ([[1, 2]], "batch 0"),
        ([torch.full((2, 3, 12, 12), float("nan"))], "NaN"),
    ],
)
def test_bad_calibration_data(tiny_cnn, calib, match):
    with pytest.raises(DataError, match=match):
        postquant.quantize(tiny_cnn, {"w_bits": 4, "a_bits": 8}, calib=calib)


def test_calibration_accepts_loader_pairs_and_forward_loop(tiny_cnn, images):
    labels = torch.zeros(len(images), dtype=torch.long)
    pairs = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    q1 = postquant.quantize(tiny_cnn, {"w_bits": 8, "a_bits": 8}, calib=pairs)
    q2 = postquant.quantize(
        tiny_cnn,
        {"w_bits": 8, "a_bits": 8},
        calib=lambda m: [m(images[:8]), m(images[8:])],
        example_inputs=images[:8],
    )
    assert torch.equal(q1.conv2.act_quant.scale, q2.conv2.act_quant.scale)


def test_calib_size_limits_samples(images):
    from postquant.calib import collect_batches

    batches = collect_batches(list(torch.split(images, 4)), limit=6)
    assert [b.shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat(batches), images[:6])


def test_data_free_default_is_bn_noise_with_batchnorm_else_reference_rule(tiny_cnn, images):
    def scale(model, rule):
        fields = {"method": "squant", "w_bits": 4, "a_bits": 4, "act_ranges": rule}
        return postquant.quantize(model, fields, example_inputs=images).conv2.act_quant.scale

    assert torch.equal(scale(tiny_cnn, "auto"), scale(tiny_cnn, "bn-noise"))
    assert not torch.equal(scale(tiny_cnn, "auto"), scale(tiny_cnn, "squant-noise"))
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    no_bn(images)  # materialise the lazy layer
    q_auto = postquant.quantize(no_bn, {"method": "squant", "w_bits": 4, "a_bits": 4}, example_inputs=images)
    q_ref = postquant.quantize(
        no_bn,
        {"method": "squant", "w_bits": 4, "a_bits": 4, "act_ranges": "squant-noise"},
        example_inputs=images,
    )
    assert torch.equal(q_auto[2].act_quant.scale, q_ref[2].act_quant.scale)


LEARNED_TINY = {"method": "learned", "w_bits": 4, "a_bits": 8, "learned": {"iters": 2, "progress": False}}


@pytest.mark.parametrize(
    "recipe",
    [{"w_bits": 4, "a_bits": 8}, {"method": "squant", "w_bits": 4, "a_bits": 8}, LEARNED_TINY],
    ids=["rtn", "squant", "learned"],
)
def test_a_train_mode_model_is_not_modified_and_quantized_in_eval_mode(tiny_cnn, images, recipe):
    eval_result = postquant.quantize(copy.deepcopy(tiny_cnn), recipe, calib=[images], example_inputs=images)
    model = tiny_cnn.train()
    state = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    q = postquant.quantize(model, recipe, calib=[images], example_inputs=images)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in q.modules())  # the result is in eval mode
    with torch.no_grad():
        assert torch.equal(q(images), eval_result(images))


class SharedLinear(nn.Module):
    """One Linear registered under two names (`a`, `b`) and called three times, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # the same module at a second place
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.a(x))
        return self.head(x)


@pytest.mark.parametrize("method", ["rtn", "squant", "learned"])
def test_a_module_used_at_two_places_is_quantized_at_every_use(method):
    torch.manual_seed(0)
    model, x = SharedLinear().eval(), torch.randn(32, 8)
    recipe = {"method": method, "w_bits": 3}
    if method == "learned":
        recipe["learned"] = {"iters": 2, "progress": False}
    q = postquant.quantize(model, recipe, calib=[x], example_inputs=x)
    assert isinstance(q.a, QuantizedLayer) and q.b is q.a
    w, head = q.a.weight, q.head.weight  # dequantized weights
    h = torch.relu(x @ w.T + q.a.inner.bias)
    h = torch.relu(h @ w.T + q.a.inner.bias)
    h = torch.relu(h @ w.T + q.a.inner.bias)
    with torch.no_grad():
        assert torch.allclose(q(x), h @ head.T + q.head.inner.bias, rtol=0, atol=1e-6)
    assert isinstance(model.b, nn.Linear) and model.b is model.a  # the original keeps its sharing


@pytest.mark.parametrize("thing", [None, "resnet20", torch.zeros(3), [nn.Linear(2, 2)]], ids=repr)
def test_a_model_that_is_not_a_module_is_a_type_error(thing):
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        postquant.quantize(thing, {"w_bits": 4})


def test_quantizing_a_quantized_model_again_is_a_clear_error(tiny_cnn, images):
    q = postquant.quantize(tiny_cnn, {"w_bits": 4}, example_inputs=images)
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        postquant.quantize(q, {"w_bits": 4}, example_inputs=images)


def test_patterns_that_match_nothing_are_named_in_a_warning(tiny_cnn, images, caplog):
    recipe = {"w_bits": 4, "ignore": ["conv9", "fc"], "overrides": {"re:^head": {"w_bits": 8}}}
    with caplog.at_level("WARNING", logger="postquant"):
        postquant.quantize(tiny_cnn, recipe, example_inputs=images)
    text = caplog.text
    assert "'conv9'" in text and "'re:^head'" in text and "'fc'" not in text


def test_save_and_load_are_top_level():
    """`postquant.save` / `postquant.load` are the checkpoint functions of `postquant.io`, in a fresh interpreter."""
    import subprocess
    import sys

    import postquant.io

    assert postquant.save is postquant.io.save and postquant.load is postquant.io.load
    done = subprocess.run(
        [sys.executable, "-c", "import postquant; postquant.save; postquant.load"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("method", ["rtn", "squant"])
@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(4, 5, 12, 12),  # wrong channel count
        torch.randint(0, 255, (4, 3, 12, 12), dtype=torch.uint8),  # raw uint8 images
        {"pixel_values": torch.randn(4, 3, 12, 12)},  # keyword the model does not take
    ],
    ids=["shape", "dtype", "keys"],
)
def test_calibration_batches_the_model_cannot_run_are_a_data_error(tiny_cnn, method, bad):
    """The RTN/SQuant path checks the first calibration batch as the learned path does (a raw torch error,
    or for some inputs a silently wrong range, came from the middle of activation calibration)."""
    with pytest.raises(DataError, match="cannot run on calibration batch 0"):
        postquant.quantize(tiny_cnn, {"method": method, "w_bits": 4, "a_bits": 8}, calib=[bad])


def test_a_grid_that_does_not_fit_a_layer_names_the_layer():
    from postquant.errors import RecipeError

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    with pytest.raises(RecipeError, match=r"layer '4' \(weight \(4, 48\)\): group_size 32 does not divide"):
        postquant.quantize(model, {"method": "rtn", "w_bits": 4, "granularity": "group", "group_size": 32})
