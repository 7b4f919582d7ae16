"""The recipe's ``embeddings``: off by default (recipes dump as before), nearest codes per row or group,
tied tables refused, bad settings refused with typed errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import postquant
from postquant.blockwise import check_block_recipe
from postquant.errors import RecipeError, UnsupportedModelError
from postquant.grids import fit_uniform_grid
from postquant.model import quantized_embeddings, quantized_layers
from postquant.nn import QuantizedEmbedding
from postquant.recipe import Recipe


class TinyLM(nn.Module):
    """Word and position embeddings, one Linear encoder, a head (tied to the words when `tied`)."""

    def __init__(self, vocab: int = 40, dim: int = 32, tied: bool = False) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim, padding_idx=0)
        self.positions = nn.Embedding(16, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.words.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.words(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.head(torch.relu(self.mix(x)))


def _model(**kw) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(**kw).eval()


IDS = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))


def test_recipes_without_embeddings_dump_as_before():
    assert "embeddings" not in Recipe().model_dump()
    assert "embeddings" not in Recipe().to_yaml()
    recipe = Recipe.coerce({"embeddings": {"bits": 4, "group_size": 16}})
    assert recipe.model_dump(mode="json")["embeddings"] == {
        "bits": 4,
        "group_size": 16,
        "symmetric": False,
        "w_range": "minmax",
    }
    assert Recipe.coerce(yaml.safe_load(recipe.to_yaml())) == recipe


def test_a_model_without_the_field_quantizes_no_table():
    qmodel = postquant.quantize(_model(), {"method": "rtn"}, example_inputs=IDS)
    assert quantized_embeddings(qmodel) == {}
    assert isinstance(qmodel.words, nn.Embedding)
    assert "embeddings" not in postquant.result(qmodel).seconds


@pytest.mark.parametrize("group", [None, 8], ids=["per-row", "group8"])
@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_tables_get_nearest_codes_whatever_the_method(method, group):
    model = _model()
    recipe = {"method": method, "w_bits": 4, "embeddings": {"bits": 4, "group_size": group}}
    qmodel = postquant.quantize(model, recipe, example_inputs=IDS)
    tables = quantized_embeddings(qmodel)
    assert set(tables) == {"words", "positions"}
    assert set(quantized_layers(qmodel)) == {"mix", "head"}
    w = model.words.weight.detach()
    grid = fit_uniform_grid(w, 4, "group" if group else "channel", group_size=group or 0)
    torch.testing.assert_close(tables["words"].codes, grid.nearest(w).to(torch.int8), rtol=0, atol=0)
    # the quantized model looks up the dequantized tables
    twin = _model()
    twin.words.weight.data = tables["words"].weight
    twin.positions.weight.data = tables["positions"].weight
    x = twin.words(IDS) + twin.positions(torch.arange(9))
    torch.testing.assert_close(qmodel.words(IDS) + qmodel.positions(torch.arange(9)), x, rtol=0, atol=0)
    assert tables["words"].padding_idx == 0


def test_ignore_keeps_a_table_float():
    qmodel = postquant.quantize(
        _model(), {"method": "rtn", "ignore": ["positions"], "embeddings": {"bits": 8}}, example_inputs=IDS
    )
    assert isinstance(qmodel.positions, nn.Embedding) and isinstance(qmodel.words, QuantizedEmbedding)


def test_tied_tables_are_refused_not_untied():
    model = _model(tied=True)
    with pytest.raises(UnsupportedModelError, match=r"'words' shares its weight with head\.weight"):
        postquant.quantize(model, {"method": "rtn", "embeddings": {"bits": 8}}, example_inputs=IDS)
    assert model.head.weight is model.words.weight
    # ignoring the table is the way out it names
    qmodel = postquant.quantize(
        model, {"method": "rtn", "ignore": ["words"], "embeddings": {"bits": 8}}, example_inputs=IDS
    )
    assert set(quantized_embeddings(qmodel)) == {"positions"}


@pytest.mark.parametrize(
    "embeddings, match",
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"bits": 4, "group_size": 0}, "group_size"),
        ({"bits": 4, "granularity": "tensor"}, "granularity"),
        ({"bits": "four"}, "bits"),
    ],
    ids=["bits9", "bits1", "group0", "unknown-field", "bits-text"],
)
def test_bad_settings_are_recipe_errors(embeddings, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.coerce({"embeddings": embeddings})


def test_a_group_that_does_not_divide_the_table_names_it():
    with pytest.raises(RecipeError, match=r"embedding 'words' \(table \(40, 32\)\).*group_size 5"):
        postquant.quantize(
            _model(), {"method": "rtn", "embeddings": {"bits": 4, "group_size": 5}}, example_inputs=IDS
        )


def test_the_block_path_refuses_embeddings():
    with pytest.raises(RecipeError, match="embeddings"):
        check_block_recipe(Recipe.coerce({"embeddings": {"bits": 8}}))


def test_a_half_precision_table_quantizes_like_its_float32_copy():
    model = _model()
    recipe = {"method": "rtn", "embeddings": {"bits": 4}}
    half = postquant.quantize(_model().to(torch.bfloat16), recipe, example_inputs=IDS)
    ref = fit_uniform_grid(model.words.weight.detach().to(torch.bfloat16).float(), 4)
    torch.testing.assert_close(
        half.words.codes, ref.nearest(model.words.weight.detach().to(torch.bfloat16).float()).to(torch.int8)
    )
    assert half.words(IDS).dtype == torch.bfloat16
    torch.testing.assert_close(
        half.words(IDS), F.embedding(IDS, half.words.weight).to(torch.bfloat16), rtol=0, atol=0
    )
