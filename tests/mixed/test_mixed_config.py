"""MixedConfig and the recipe's `mixed` field: budgets, sizes, bit choices, YAML round trip."""

from __future__ import annotations

import pytest

from postquant.errors import RecipeError
from postquant.mixed import Importance, MixedConfig, parse_size
from postquant.recipe import Recipe


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2MB", 2_000_000),
        ("500KB", 500_000),
        ("1.5 MiB", 1_572_864),
        ("123", 123),
        (4096, 4096),
        ("3kb", 3000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2 parsecs", "MB", "-1MB", "0", True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_exactly_one_budget():
    assert MixedConfig(w_bits_budget=3).size_budget is None
    assert MixedConfig(size_budget="2MB").size_budget == 2_000_000
    with pytest.raises(ValueError, match="exactly one budget"):
        MixedConfig()
    with pytest.raises(ValueError, match="exactly one budget"):
        MixedConfig(w_bits_budget=3, size_budget=10)


def test_bit_choices_sorted_and_checked():
    assert MixedConfig(w_bits_budget=3, bit_choices=[8, 2, 4, 2]).bit_choices == [2, 4, 8]
    with pytest.raises(ValueError, match="from 2 to 8"):
        MixedConfig(w_bits_budget=3, bit_choices=[1, 4])


def test_recipe_field_round_trips_through_yaml(tmp_path):
    recipe = Recipe.coerce({"mixed": {"size_budget": "500KB", "importance": "fisher"}})
    assert recipe.mixed.size_budget == 500_000 and recipe.mixed.importance is Importance.FISHER
    path = tmp_path / "r.yaml"
    recipe.to_yaml(path)
    again = Recipe.coerce(path)
    assert again.mixed == recipe.mixed


def test_recipe_errors_are_recipe_errors():
    with pytest.raises(RecipeError, match=r"mixed.*exactly one budget"):
        Recipe.coerce({"mixed": {"importance": "loss"}})
    with pytest.raises(RecipeError, match=r"mixed\.importance"):
        Recipe.coerce({"mixed": {"w_bits_budget": 3, "importance": "vibes"}})
    with pytest.raises(RecipeError, match="cannot read the size"):
        Recipe.coerce({"mixed": {"size_budget": "lots"}})
