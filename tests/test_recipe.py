from __future__ import annotations

import pytest

from postquant.choices import ActRanges
from postquant.errors import RecipeError, UnknownNameError
from postquant.recipe import Method, Recipe


def test_defaults_and_dict_and_yaml_round_trip(tmp_path):
    r = Recipe.coerce({"method": "squant", "w_bits": 3, "a_bits": 4, "ignore": ["fc"]})
    assert r.method is Method.SQUANT and r.w_bits == 3 and r.a_bits == 4
    path = tmp_path / "r.yaml"
    r.to_yaml(path)
    again = Recipe.coerce(path)
    assert again == r


def test_changes_override_a_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("w_bits: 6\nmethod: rtn\n")
    assert Recipe.coerce(path, w_bits=3).w_bits == 3


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("w_bits", 1, "w_bits"),
        ("w_bits", 9, "w_bits"),
        ("a_bits", 16, "a_bits"),
        ("granularity", "row", "granularity"),
        ("nonsense", 1, "nonsense"),
        ("group_size", 0, "group_size"),
    ],
)
def test_bad_fields_name_the_field(field, value, msg):
    with pytest.raises(RecipeError, match=msg):
        Recipe.coerce({field: value})


def test_unknown_method_suggests_close_names():
    with pytest.raises(RecipeError, match="squant"):
        Recipe.coerce({"method": "squnt"})
    with pytest.raises((RecipeError, UnknownNameError)):
        Recipe.coerce({"method": "gptq-xyz"})


def test_bad_yaml_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.coerce(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.coerce(bad)


def test_yaml_round_trip_keeps_inherit_vs_float_in_overrides(tmp_path, tiny_cnn):
    from postquant.plan import make_plan

    r = Recipe.coerce(
        {"w_bits": 3, "a_bits": 4, "overrides": {"@first": {"a_bits": None}, "fc": {"w_bits": 8}}}
    )
    r.to_yaml(tmp_path / "r.yaml")
    again = Recipe.coerce(tmp_path / "r.yaml")
    assert make_plan(tiny_cnn, again) == make_plan(tiny_cnn, r)
    assert make_plan(tiny_cnn, again)["conv1"].w_bits == 3  # unset w_bits inherits, it is not "float"
    assert "w_bits" not in again.overrides["@first"].model_fields_set


BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["w_bits: *i"]
)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    assert path.stat().st_size < 600
    with pytest.raises(RecipeError, match="alias") as info:
        Recipe.coerce(path)
    assert len(str(info.value)) < 500


def test_oversized_recipe_files_are_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("w_bits: 4\n" + "# padding\n" * 200_000)
    with pytest.raises(RecipeError, match="too large"):
        Recipe.coerce(path)


@pytest.mark.parametrize("value", ["x" * 100_000, list(range(50_000))], ids=["long-string", "long-list"])
def test_error_messages_echo_at_most_a_short_piece_of_the_input(value):
    with pytest.raises(RecipeError, match="w_bits") as info:
        Recipe.coerce({"w_bits": value})
    assert len(str(info.value)) < 400


def test_non_utf8_recipe_file_is_a_recipe_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("method: rtn\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="UTF-8"):
        Recipe.coerce(path)


def test_validator_messages_quoting_a_long_input_are_cut():
    with pytest.raises(RecipeError, match="method") as info:
        Recipe.coerce({"method": "q" * 100_000})
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "fields",
    [{"ignore": ["re:(unclosed"]}, {"overrides": {"re:[z-a]": {"w_bits": 8}}}],
    ids=["ignore", "overrides"],
)
def test_an_invalid_regex_pattern_is_a_recipe_error(fields):
    with pytest.raises(RecipeError, match="regular expression"):
        Recipe.coerce(fields)


@pytest.mark.parametrize("seed", [2**64, -1])
def test_seeds_outside_the_generator_range_are_refused(seed):
    with pytest.raises(RecipeError, match="seed"):
        Recipe.coerce({"seed": seed})


@pytest.mark.parametrize(
    ("changes", "msg"),
    [
        ({}, "set a_bits"),
        ({"a_bits": 8, "a_residual": True}, "drop a_residual"),
        ({"a_bits": 8, "a_observer": "mse"}, "a_observer"),
        ({"a_bits": 8, "a_percentile": 99.0}, "a_percentile"),
        ({"a_bits": 8, "a_observer_samples": 4096}, "a_observer_samples"),
    ],
    ids=["no-a_bits", "a_residual", "observer", "percentile", "observer-samples"],
)
def test_dynamic_inputs_refuse_static_range_fields(changes, msg):
    with pytest.raises(RecipeError, match=msg):
        Recipe.coerce({"act_ranges": "dynamic", **changes})


def test_dynamic_inputs_round_trip_through_yaml_and_a_full_dump(tmp_path):
    recipe = Recipe.coerce({"act_ranges": "dynamic", "a_bits": 8})
    assert recipe.act_ranges is ActRanges.DYNAMIC
    assert Recipe.model_validate(recipe.model_dump(mode="json")) == recipe  # what a checkpoint saves
    recipe.to_yaml(tmp_path / "r.yaml")
    assert Recipe.coerce(tmp_path / "r.yaml") == recipe
