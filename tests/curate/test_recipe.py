"""Recipes: the shipped presets load, and every mistake in a recipe fails before any work."""

from __future__ import annotations

import pytest

from slimlm.curate import CURATE_STEPS, load_recipe, preset_names
from slimlm.errors import SlimlmError


@pytest.mark.parametrize("preset", ["web", "code", "chat", "docs"])
def test_each_shipped_preset_loads(preset):
    assert preset in preset_names()
    recipe = load_recipe(preset)
    assert recipe.steps and all(s.name in CURATE_STEPS for s in recipe.steps)
    assert recipe.description


def test_a_step_is_a_name_or_a_one_key_mapping():
    recipe = load_recipe({"tokenizer": "words", "steps": ["normalize", {"gopher_quality": {"min_doc_words": 10}},
                                                          {"near_dedup": None}]})
    assert [s.name for s in recipe.steps] == ["normalize", "gopher_quality", "near_dedup"]
    assert recipe.steps[1].params.min_doc_words == 10
    assert recipe.steps[1].params.max_doc_words == 100000  # Gopher's published default, from datatrove


def test_unknown_step_names_the_allowed_ones():
    with pytest.raises(SlimlmError, match=r"steps\[1\]: unknown step 'dedupe': choose one of normalize, .*near_dedup"):
        load_recipe({"steps": ["normalize", "dedupe"]})


def test_unknown_setting_names_the_step_and_the_allowed_keys():
    with pytest.raises(SlimlmError, match=r"steps\[0\] \(gopher_quality\): unknown key 'min_words'.*min_doc_words"):
        load_recipe({"steps": [{"gopher_quality": {"min_words": 10}}]})


def test_wrong_type_and_impossible_values_are_named():
    with pytest.raises(SlimlmError, match=r"steps\[0\] \(language\): threshold must be a number, not the string"):
        load_recipe({"steps": [{"language": {"threshold": "high"}}]})
    with pytest.raises(SlimlmError, match="give either threshold or bands and rows"):
        load_recipe({"steps": [{"near_dedup": {"threshold": 0.8, "bands": 10}}]})


def test_unknown_top_level_key_and_empty_recipe(tmp_path):
    with pytest.raises(SlimlmError, match="unknown key 'step'"):
        load_recipe({"step": ["normalize"]})
    with pytest.raises(SlimlmError, match="no steps"):
        load_recipe({"steps": []})
    with pytest.raises(SlimlmError, match="not a shipped preset"):
        load_recipe(tmp_path / "missing.yaml")
