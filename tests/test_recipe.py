"""Recipes: YAML through safe_load, structured into attrs classes, every error with its path."""

from __future__ import annotations

import os

import pytest

import fundiff
from fundiff import RecipeError
from helpers import RECIPES, oracle_recipe


def problems(recipe, registry) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        fundiff.load_recipe(recipe, registry)
    return dict(info.value.problems)


def test_shipped_recipes_load_and_round_trip(registry):
    for name in sorted(os.listdir(RECIPES)):
        recipe = fundiff.load_recipe(os.path.join(RECIPES, name), registry)
        again = fundiff.load_recipe(recipe.to_dict(), registry)
        assert again.to_dict() == recipe.to_dict()
        assert again.components == recipe.components  # frozen attrs: equal parameters


def test_defaults_are_filled_in(registry):
    resolved = fundiff.load_recipe(oracle_recipe(), registry).to_dict()
    assert resolved["schedule"] == {"name": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000}
    assert resolved["train"]["steps"] == fundiff.TrainConfig().steps
    assert resolved["sample"]["num_samples"] == fundiff.SampleConfig().num_samples


def test_out_of_range_value_names_path_and_bound(registry):
    assert problems(oracle_recipe(sampler={"name": "ddim", "steps": 0}), registry) == {"sampler.steps": "must be >= 1, got 0"}


def test_unknown_component_suggests_near_match(registry):
    message = problems(oracle_recipe(schedule="cosin"), registry)["schedule.name"]
    assert "unknown schedule 'cosin'" in message and "did you mean 'cosine'?" in message
    known = message.split("known: ")[1].split(", ")
    assert known == registry.names("schedule")


def test_unknown_parameter_and_section_suggest_near_matches(registry):
    recipe = oracle_recipe(sampler={"name": "ddim", "stpes": 3})
    recipe["trian"] = {}
    found = problems(recipe, registry)
    assert "did you mean 'steps'?" in found["sampler.stpes"]
    assert "did you mean 'train'" in found["trian"]


def test_wrong_types(registry):
    recipe = oracle_recipe(sampler={"name": "ddim", "steps": "many", "eta": True})
    recipe["train"] = {"ema": "fast", "betas": [0.9]}
    found = problems(recipe, registry)
    assert found["sampler.steps"] == "must be an integer, got 'many'"
    assert found["sampler.eta"] == "must be a number, got True"
    assert found["train.ema"] == "must be a number, got 'fast'"
    assert found["train.betas"] == "must be a list of 2 items, got 1"


def test_yaml_1_1_exponent_strings_are_accepted_as_numbers(registry):
    recipe = oracle_recipe()
    recipe["train"] = {"lr": "1e-3"}  # PyYAML reads `1e-3` (no dot) as a string
    assert fundiff.load_recipe(recipe, registry).train.lr == 1e-3


def test_missing_section_lists_the_choices(registry):
    recipe = oracle_recipe()
    del recipe["sampler"]
    choices = ", ".join(registry.names("sampler"))
    assert problems(recipe, registry)["sampler"] == f"missing section; add 'sampler: {{name: ...}}' with one of: {choices}"
    assert "ddim" in choices and "ddpm" in choices


def test_incompatible_combination_names_requirement_and_providers(registry):
    message = problems(oracle_recipe(data="two-moons"), registry)["denoiser"]
    assert "denoiser 'gmm-oracle' requires 'gaussian-mixture-data'" in message
    assert "data/gmm" in message


def test_cross_field_validation_is_reported_on_the_section(registry):
    found = problems(oracle_recipe(schedule={"name": "linear", "beta_start": 0.02, "beta_end": 0.01}), registry)
    assert "beta_end (0.01) must be >= beta_start (0.02)" in found["schedule"]


def test_all_problems_are_reported_together(registry):
    recipe = oracle_recipe(schedule="cosin", sampler={"name": "ddim", "steps": -1})
    recipe["sample"] = {"num_samples": 0}
    assert set(problems(recipe, registry)) == {"schedule.name", "sampler.steps", "sample.num_samples"}


def test_yaml_tags_never_construct_objects(tmp_path, registry):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    path.write_text(f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(fundiff.FundiffError, match="YAML tag not allowed"):
        fundiff.load_recipe(str(path), registry)
    assert not marker.exists()


def test_malformed_yaml_names_the_line(tmp_path, registry):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {name: gmm\nchain: vp\n")
    with pytest.raises(fundiff.FundiffError, match=r"bad.yaml \(line \d+, column \d+\): malformed YAML"):
        fundiff.load_recipe(str(path), registry)


def test_overrides_switch_component_and_drop_its_old_parameters(registry):
    recipe = oracle_recipe(sampler={"name": "ddim", "steps": 10, "eta": 0.5})
    loaded = fundiff.load_recipe(recipe, registry, overrides={"sampler.name": "ddpm", "sampler.steps": 4})
    assert loaded.names["sampler"] == "ddpm" and loaded["sampler"].steps == 4
