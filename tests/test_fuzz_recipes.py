"""Fuzzed recipes: every combination the registry allows trains and samples, and broken
recipes are refused with a RecipeError, never a crash.

Valid recipes are drawn from the installed registry (one component per kind, default
parameters shrunk to test size); each one either fails ``load_recipe`` with a RecipeError
naming what is incompatible, or trains two steps and samples finite values of the data's
shape. Invalid recipes are valid ones with one fault injected. The number of distinct
combinations exercised is printed in pytest's terminal summary.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fundiff
from conftest import REPORT
from fundiff.components import OPTIONAL_KINDS
from fundiff.config import public_fields

REGISTRY = fundiff.Registry.discover()
EXERCISED: set[tuple[str, ...]] = set()
REFUSED: set[tuple[str, ...]] = set()

#: keep every drawn model, data set and run tiny; applied only where the component has the field
TINY = {
    "width": 16,
    "depth": 1,
    "hidden": 8,
    "n": 512,
    "embed_dim": 8,
    "num_steps": 100,
    "size": 8,
    "steps": 3,
    "channels": 8,
    "num_groups": 4,
    "heads": 2,
    "fit_samples": 512,
}


def _section(kind: str, name: str) -> dict:
    section: dict = {"name": name}
    fields = {f.name: f for f in public_fields(REGISTRY.resolve(kind, name).cls)}
    for key, value in TINY.items():
        field = fields.get(key)
        if field is not None and field.type in (int, "int"):
            section[key] = value
    # nested components left at their defaults (a wrapped schedule, a chain's autoencoder)
    # are shrunk the same way
    for field in fields.values():
        nested_kind = getattr(field.type, "kind", None) if isinstance(field.type, type) else None
        if nested_kind and field.default is not attrs.NOTHING:
            default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
            nested_name = REGISTRY.name_of(nested_kind, type(default)) if default is not None else None
            if nested_name is not None:
                section[field.name] = _section(nested_kind, nested_name)
    return section


@st.composite
def raw_recipes(draw) -> dict:
    """One component per kind, each drawn independently (most such recipes are refused)."""
    recipe = {}
    for kind in fundiff.KINDS:
        names = REGISTRY.names(kind)
        if kind in OPTIONAL_KINDS:
            names = [None, *names]
        name = draw(st.sampled_from(names))
        if name is not None:
            recipe[kind] = _section(kind, name)
    recipe["train"] = {"steps": 2, "batch_size": 8}
    recipe["sample"] = {"num_samples": 4, "batch_size": 4}
    return recipe


@st.composite
def recipes(draw) -> dict:
    """Drawn recipes repaired towards validity: while the registry refuses one, redraw the
    component of a section the refusal names (never the one drawn before), so the fuzzer
    spends its examples on combinations that load, and still records the refusals."""
    recipe = draw(raw_recipes())
    for _ in range(12):
        try:
            fundiff.load_recipe(recipe, REGISTRY)
            return recipe
        except fundiff.RecipeError as err:
            REFUSED.add(_combination(recipe))
            kinds = sorted({path.split(".")[0] for path, _ in err.problems if path.split(".")[0] in fundiff.KINDS})
            if not kinds:
                return recipe
            kind = draw(st.sampled_from(kinds))
            others = [n for n in REGISTRY.names(kind) if n != recipe.get(kind, {}).get("name")]
            if not others:
                return recipe
            recipe[kind] = _section(kind, draw(st.sampled_from(others)))
    return recipe


def _combination(recipe: dict) -> tuple[str, ...]:
    return tuple(recipe[k]["name"] if k in recipe else "-" for k in fundiff.KINDS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes())
def test_drawn_recipes_train_and_sample_or_are_refused(recipe):
    try:
        loaded = fundiff.load_recipe(recipe, REGISTRY)
    except fundiff.RecipeError as err:
        assert err.problems and all(message for _, message in err.problems)
        REFUSED.add(_combination(recipe))
        return
    pipeline = fundiff.Pipeline(loaded)
    pipeline.chain.fit(pipeline)  # a chain's fitted state (statistics, generator, autoencoder), as fundiff.train does
    if pipeline.trainable:
        for step in range(2):
            loss = pipeline.loss(step, 8)
            assert torch.isfinite(loss), (recipe, loss)
            loss.backward()
    samples, _ = pipeline.sample(4, steps=3)
    assert samples.shape == (4, *pipeline.spec.shape)
    assert torch.isfinite(samples).all(), recipe
    EXERCISED.add(_combination(recipe))
    REPORT["fuzzed recipes"] = f"{len(EXERCISED)} distinct valid combinations trained and sampled, {len(REFUSED)} refused with a RecipeError"
    assert len(EXERCISED) >= 1


FAULTS = st.sampled_from(["unknown-name", "unknown-key", "wrong-type", "negative-steps", "not-a-mapping", "missing-section", "bad-train"])


@settings(max_examples=60, deadline=None)
@given(recipe=raw_recipes(), fault=FAULTS, kind=st.sampled_from([k for k in fundiff.KINDS if k not in OPTIONAL_KINDS]))
def test_broken_recipes_are_refused_with_a_recipe_error(recipe, fault, kind):
    if fault == "unknown-name":
        recipe[kind]["name"] = recipe[kind]["name"] + "-nope"
    elif fault == "unknown-key":
        recipe[kind]["no_such_parameter"] = 1
    elif fault == "wrong-type":
        recipe["sampler"]["steps"] = "three"
    elif fault == "negative-steps":
        recipe["sampler"]["steps"] = -2
    elif fault == "not-a-mapping":
        recipe[kind] = [1, 2]
    elif fault == "missing-section":
        del recipe[kind]
    elif fault == "bad-train":
        recipe["train"]["lr"] = -1.0
    with pytest.raises(fundiff.RecipeError) as info:
        fundiff.load_recipe(recipe, REGISTRY)
    assert all(path or message for path, message in info.value.problems)
