"""Samplers against the exact denoiser of a Gaussian mixture (no training involved)."""

from __future__ import annotations

import math

import pytest
import torch

import fundiff
from fundiff import Level
from helpers import oracle_recipe, sliced_wasserstein

N = 4000


def pipeline(registry, **sections) -> fundiff.Pipeline:
    return fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(**sections), registry))


def draw(p: fundiff.Pipeline, n: int = N, **kwargs) -> torch.Tensor:
    samples, _ = p.sample(n, seed=kwargs.pop("seed", 1), batch_size=kwargs.pop("batch_size", n), dtype=torch.float64, **kwargs)
    return samples


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_is_the_same_whichever_space_the_oracle_predicts_in(registry, schedule):
    """DDIM (eta = 0) only sees x0_hat, so an exact denoiser expressed as eps, x0 or v
    prediction must give the same samples. The conversions divide by alpha (eps) or by
    alpha^2 + sigma^2 (v); at the terminal level alpha ~ 6e-3 (linear) and ~ 5e-5 (cosine),
    so float64 rounding of ~1e-16 is amplified to at most ~1e-11 in x."""
    results = {
        name: draw(pipeline(registry, schedule=schedule, parameterization=name), 500) for name in ("eps", "x0", "v")
    }
    scale = results["x0"].abs().max()
    for name in ("eps", "v"):
        assert torch.allclose(results[name], results["x0"], rtol=0, atol=1e-9 * float(scale)), name


def test_ddim_eta_one_is_ddpm_ancestral_step(registry):
    """DDIM's eq. 16 with eta = 1 is DDPM's posterior step (Song et al. 2021, sec. 4.1): with
    the same per-step noise the two samplers agree to rounding."""
    ddpm = draw(pipeline(registry, sampler={"name": "ddpm", "steps": 40}), 300)
    ddim = draw(pipeline(registry, sampler={"name": "ddim", "steps": 40, "eta": 1.0}), 300)
    assert torch.allclose(ddpm, ddim, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "sampler",
    [{"name": "ddim", "steps": 50}, {"name": "ddim", "steps": 50, "eta": 0.5}, {"name": "ddpm", "steps": 1000}],
    ids=["ddim-50", "ddim-eta0.5-50", "ddpm-1000"],
)
def test_samplers_reproduce_the_mixture(registry, sampler):
    """Samples from the exact denoiser match exact mixture samples.

    Statistic: sliced Wasserstein-2 distance to N exact samples. Bound: 1.5 times the
    distance between two independent exact draws of the same size (the finite-sample
    floor); a moment-matched Gaussian must be far outside it, so the test can fail."""
    p = pipeline(registry, sampler=sampler)
    samples = draw(p)
    exact_a, _ = p.data_set.draw(N, seed=101)
    exact_b, _ = p.data_set.draw(N, seed=202)
    floor = sliced_wasserstein(exact_a, exact_b)
    bound = 1.5 * floor
    gaussian = exact_b.mean(0) + exact_b.std(0) * torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert sliced_wasserstein(gaussian, exact_a) > 3 * bound
    assert sliced_wasserstein(samples, exact_a) < bound
    # every mode is populated in proportion: nearest-mode frequencies within 4 standard errors
    _, means, _ = p.data_set.mixture()
    nearest = torch.cdist(samples, means).argmin(1)
    freq = torch.bincount(nearest, minlength=8).double() / N
    stderr = math.sqrt((1 / 8) * (7 / 8) / N)
    assert (freq - 1 / 8).abs().max() < 4 * stderr, freq


def test_sample_i_does_not_depend_on_batch_size_or_offset(registry):
    """The per-sample noise contract: sample i is a function of (seed, i) alone."""
    p = pipeline(registry, sampler={"name": "ddpm", "steps": 20})
    whole = draw(p, 12, batch_size=12)
    chunked = draw(p, 12, batch_size=5)
    tail = draw(p, 4, batch_size=3, start=8)
    assert torch.equal(whole, chunked)
    assert torch.equal(whole[8:], tail)
    assert not torch.equal(draw(p, 12, seed=2), whole)


def test_noise_level_grid_stays_on_the_host(registry):
    """Samplers get plain Python floats: no device tensors, so no synchronisation per step."""
    p = pipeline(registry)
    levels = p.levels(10)
    assert len(levels) == 11 and levels[-1].sigma == 0.0 and levels[-1].alpha == 1.0
    for level in levels:
        assert isinstance(level, Level)
        assert all(type(v) is float for v in (level.logsnr, level.alpha, level.sigma))
    logsnrs = [lvl.logsnr for lvl in levels]
    assert all(a < b for a, b in zip(logsnrs, logsnrs[1:]))


def test_sampler_runs_on_any_prediction_function_without_a_recipe(registry):
    """A sampler is usable alone: any callable denoiser, any grid of levels. For Gaussian data
    x0 ~ N(0, 1) the exact denoiser is E[x0 | x_t] = alpha x_t / (alpha^2 + sigma^2), and the
    deterministic DDIM map sends N(0, 1) to N(0, 1) in the many-step limit."""
    chain = registry.build("chain", "vp")
    schedule = registry.build("schedule", "cosine")
    levels = fundiff.noise_levels(schedule, chain, 200)
    ddim = registry.build("sampler", "ddim", steps=200)

    def denoise(x, level):
        return level.alpha * x / (level.alpha**2 + level.sigma**2)

    ids = torch.arange(20000)
    x = fundiff.NoiseStream(5, ids, (1,), stream=fundiff.rng.STREAM_PRIOR, dtype=torch.float64).normal(0)
    out = ddim.sample(denoise, x, levels)
    # std of a sample variance of 20000 normals is sqrt(2 / 20000) = 0.01
    assert abs(float(out.var()) - 1.0) < 0.05
