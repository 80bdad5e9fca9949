"""The learned schedule (VDM) trained through the likelihood weighting."""

from __future__ import annotations

import os

import pytest
import torch

import fundiff
from helpers import RECIPES


def learned_recipe(**train) -> dict:
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml")).to_dict()
    recipe["schedule"] = {"name": "learned", "hidden": 16, "logsnr_max": 8.0, "logsnr_min": -8.0}
    recipe["weighting"] = {"name": "likelihood"}
    recipe["denoiser"].update(width=32, depth=1)
    recipe["train"].update({"steps": 30, "batch_size": 64, "checkpoint_every": 10, **train})
    return recipe


def test_learned_schedule_needs_the_variational_bound(registry):
    recipe = learned_recipe()
    recipe["weighting"] = "eps-mse"
    with pytest.raises(fundiff.RecipeError, match="requires 'variational-bound'.*weighting/likelihood"):
        fundiff.load_recipe(recipe, registry)


def test_endpoints_are_exact_and_the_map_decreasing(registry):
    schedule = registry.build("schedule", "learned", logsnr_max=7.0, logsnr_min=-9.0, hidden=8)
    t = torch.linspace(0, 1, 501, dtype=torch.float64)
    logsnr = schedule.logsnr(t)
    assert float(logsnr[0]) == pytest.approx(7.0, abs=1e-12) and float(logsnr[-1]) == pytest.approx(-9.0, abs=1e-12)
    assert (logsnr.diff() < 0).all()
    assert torch.allclose(schedule.t_from_logsnr(logsnr), t, atol=1e-12)


def test_schedule_gradient_is_the_gradient_of_the_loss_variance(registry):
    """VDM sec. 5.2: the schedule's parameters descend E[L^2] (the loss estimate's second
    moment; its mean does not depend on them), while the denoiser descends E[L]. The pipeline
    gets this with per-example gradient scaling; here it is checked against autograd of
    mean(L^2) computed directly, in float64."""
    torch.manual_seed(0)
    pipeline = fundiff.Pipeline(fundiff.load_recipe(learned_recipe(), registry))
    pipeline.model.double()
    pipeline.schedule_module.double()
    pipeline._data = fundiff.Data(x=pipeline.data.x.double(), spec=pipeline.data.spec, labels=pipeline.data.labels)
    params = list(pipeline.schedule_module.parameters())

    trick = torch.autograd.grad(pipeline.loss(step=3, batch_size=32), params)
    losses = pipeline.per_example_losses(step=3, batch_size=32, variance_gradient=False)
    direct = torch.autograd.grad((losses**2).mean(), params)
    for a, b in zip(trick, direct):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (a, b)
    assert any(float(g.abs().max()) > 0 for g in trick)


def test_training_moves_the_schedule_and_sampling_uses_it(tmp_path, registry):
    run = tmp_path / "run"
    trained = fundiff.train(learned_recipe(), run, quiet=True, registry=registry)
    initial = registry.build("schedule", "learned", hidden=16, logsnr_max=8.0, logsnr_min=-8.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    with torch.no_grad():
        learned = trained.schedule.logsnr(t)
    assert not torch.allclose(learned, initial.logsnr(t), atol=1e-6)  # the interior moved
    assert float(learned[0]) == pytest.approx(8.0, abs=1e-9) and float(learned[-1]) == pytest.approx(-8.0, abs=1e-9)
    reloaded = fundiff.load_run(run, registry=registry)
    with torch.no_grad():
        assert torch.equal(reloaded.schedule.logsnr(t), learned)  # the checkpoint holds it
    samples, _ = reloaded.sample(16)
    assert torch.isfinite(samples).all()
