"""Tests of the fundiff-example plugin. Run them after installing it: pip install -e '.[test]' && pytest"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

import fundiff
from fundiff.config import public_fields
from fundiff_example import euler_x0, quadratic_logsnr
from fundiff_example.quadratic_logsnr import QuadraticLogSNR
from fundiff_example.euler_x0 import EulerX0


def recipe(**sections):
    """A recipe that needs no training: the exact denoiser of a ring of 8 Gaussians."""
    base = {
        "data": {"name": "gmm", "modes": 8, "radius": 2.0, "std": 0.15},
        "chain": "vp",
        "schedule": "quadratic-logsnr",
        "noise": "gaussian",
        "denoiser": "gmm-oracle",
        "parameterization": "eps",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "euler-x0", "steps": 30},
        "sample": {"num_samples": 1000, "seed": 0},
    }
    base.update(sections)
    return base


@pytest.fixture(scope="module")
def registry():
    return fundiff.Registry.discover()


# ------------------------------------------------------------------ installation


def test_entry_points_are_installed(registry):
    for kind, name in (("schedule", "quadratic-logsnr"), ("sampler", "euler-x0")):
        entry = registry.resolve(kind, name)
        assert entry.distribution == "fundiff-example"
        assert entry.version
        # qualified names work too, and keep working if another plugin takes the same name
        assert registry.resolve(kind, f"fundiff-example:{name}") is entry
    assert not [p.error for p in registry.plugins if p.distribution == "fundiff-example" and p.error]


def test_every_parameter_is_documented():
    for cls in (QuadraticLogSNR, EulerX0):
        for field in public_fields(cls):
            if field.name != "steps":  # inherited from fundiff.Sampler, documented there
                assert field.metadata.get("doc"), f"{cls.__name__}.{field.name} has no doc"


# ------------------------------------------------------------------ the schedule


@pytest.mark.parametrize("curvature", [-1.0, -0.4, 0.0, 0.5, 1.0])
def test_schedule_is_strictly_decreasing_and_inverts(curvature):
    schedule = QuadraticLogSNR(start=8.0, end=-6.0, curvature=curvature)
    t = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    lam = schedule.logsnr(t)
    assert lam.dtype == torch.float64
    assert lam[0].item() == pytest.approx(8.0) and lam[-1].item() == pytest.approx(-6.0)
    assert (lam[1:] < lam[:-1]).all()
    assert torch.allclose(schedule.t_from_logsnr(lam), t, atol=1e-9, rtol=0)


def test_schedule_curvature_moves_the_midpoint():
    mid = torch.tensor(0.5, dtype=torch.float64)
    linear = QuadraticLogSNR(curvature=0.0).logsnr(mid).item()
    assert linear == pytest.approx(0.0)
    # c > 0 keeps logSNR high (little noise) longer
    assert QuadraticLogSNR(curvature=0.5).logsnr(mid).item() > 1.0
    assert QuadraticLogSNR(curvature=-0.5).logsnr(mid).item() < -1.0


def test_schedule_inverse_clamps_outside_its_range():
    schedule = QuadraticLogSNR()
    t = schedule.t_from_logsnr(torch.tensor([50.0, math.inf, -50.0, -math.inf], dtype=torch.float64))
    assert t.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_schedule_parameters_are_validated(registry):
    with pytest.raises(fundiff.FundiffError, match="below start"):
        registry.build("schedule", "quadratic-logsnr", start=-1.0, end=1.0)
    with pytest.raises(fundiff.FundiffError, match="curvature"):
        registry.build("schedule", "quadratic-logsnr", curvature=2.0)


# ------------------------------------------------------------------ the sampler


def test_sampler_step_by_hand():
    t = fundiff.Level(logsnr=0.0, alpha=0.8, sigma=0.6)
    s = fundiff.Level(logsnr=1.0, alpha=0.96, sigma=0.28)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x0 = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    steps = []
    out = EulerX0(steps=1).sample(lambda x_, level: x0, x, [t, s], callback=lambda i, x_, d: steps.append(i))
    y = x / 0.8
    expected = 0.96 * (y + (0.28 / 0.96 - 0.6 / 0.8) / (0.6 / 0.8) * (y - x0))
    assert torch.allclose(out, expected, rtol=1e-12, atol=0) and steps == [0]


def test_last_step_returns_the_x0_estimate():
    t = fundiff.Level(logsnr=-2.0, alpha=0.35, sigma=0.94)
    clean = fundiff.Level(logsnr=math.inf, alpha=1.0, sigma=0.0)
    x0 = torch.full((4, 2), 0.25, dtype=torch.float64)
    x = torch.linspace(-3.0, 3.0, 8, dtype=torch.float64).reshape(4, 2)
    out = EulerX0().sample(lambda x_, level: x0, x, [t, clean])
    assert torch.allclose(out, x0, rtol=0, atol=1e-14)  # y - (y - x0), up to rounding


def test_sampler_coincides_with_deterministic_ddim(registry):
    """Euler in sigma/alpha is exact for a frozen x0 estimate, as DDIM is: the samples agree."""
    run = fundiff.Pipeline(fundiff.load_recipe(recipe(), registry))
    ours, _ = run.sample(500)
    ddim, _ = run.sample(500, sampler=registry.build("sampler", "ddim", steps=30, eta=0.0))
    assert torch.allclose(ours, ddim, atol=1e-4, rtol=0)
    # ...and that is not because every sampler gives the same thing at 30 steps
    ddpm, _ = run.sample(500, sampler=registry.build("sampler", "ddpm", steps=30))
    assert (ours - ddpm).abs().max() > 0.1


# ------------------------------------------------------------------ conformance kit


def test_conformance():
    """fundiff.testing checks the contract of each kind (monotone schedule, exact inverse, ...)."""
    testing = pytest.importorskip("fundiff.testing")
    for curvature in (-1.0, 0.0, 0.5, 1.0):
        testing.check_component("schedule", QuadraticLogSNR(curvature=curvature))
    for steps in (5, 50):
        testing.check_component("sampler", EulerX0(steps=steps))


def test_recipe_samples_the_ring(registry, tmp_path):
    loaded = fundiff.load_recipe(recipe(schedule={"name": "quadratic-logsnr", "curvature": 0.3}), registry)
    assert type(loaded["schedule"]) is QuadraticLogSNR and type(loaded["sampler"]) is EulerX0
    fundiff.train(loaded, tmp_path / "run", quiet=True)  # the oracle has nothing to train
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=1000)
    assert samples.shape == (1000, 2) and torch.isfinite(samples).all()
    radius = samples.norm(dim=1)
    assert abs(radius.mean().item() - 2.0) < 0.1
    assert radius.std().item() < 0.3


def test_shipped_recipe(registry, tmp_path):
    loaded = fundiff.load_recipe(pathlib.Path(__file__).parents[1] / "ring.yaml", registry)
    assert loaded.names["schedule"] == "quadratic-logsnr" and loaded.names["sampler"] == "euler-x0"
    samples, _ = fundiff.Pipeline(loaded).sample(500)
    assert abs(samples.norm(dim=1).mean().item() - 2.0) < 0.1


def test_works_without_installing(tmp_path):
    """Handy while developing: pass the modules in-process instead of through entry points."""
    registry = fundiff.Registry.discover(
        autoload=False,
        enabled=["vp", "gmm", "gmm-oracle", "gaussian", "eps", "eps-mse", "none"],
        plugins=[("quadratic-logsnr", quadratic_logsnr), ("euler-x0", euler_x0)],
    )
    loaded = fundiff.load_recipe(recipe(), registry)
    assert loaded.entries["sampler"].plugin == "euler-x0"
    assert loaded.entries["sampler"].distribution is None
