"""Reverse variances (survey sec. 4.3.1): fixed-small, fixed-large, learned-range (improved
DDPM), analytic (Analytic-DPM)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, strategies as st

import fundiff
from fundiff import LevelTensors, noiselevel
from fundiff_plugins.variances.analytic import PreparedAnalytic, optimal_variance
from fundiff_plugins.variances.learned_range import LearnedRange

from helpers import oracle_recipe

EPS64 = torch.finfo(torch.float64).eps


@st.composite
def level_pairs(draw):
    """Two VP levels s less noisy than t (logSNRs in [-12, 12], gap >= 1e-3)."""
    lam_t = draw(st.floats(-12.0, 11.0))
    lam_s = draw(st.floats(lam_t + 1e-3, 12.0))
    return noiselevel.Level(lam_s, *noiselevel.vp_alpha_sigma(lam_s)), noiselevel.Level(lam_t, *noiselevel.vp_alpha_sigma(lam_t))


@given(pair=level_pairs())
def test_learned_range_extremes_are_fixed_large_and_fixed_small(registry, pair):
    """Improved DDPM eq. 15: v = +1 gives beta (fixed-large), v = -1 gives beta tilde
    (fixed-small), and fixed-small is the posterior variance (VDM eq. 7). float64: exp(log x)
    rounds to a relative error of about (|log x| + 1) eps."""
    s, t = pair
    learned = registry.build("variance", "learned-range")
    large = registry.build("variance", "fixed-large").variance(s, t, None)
    small = registry.build("variance", "fixed-small").variance(s, t, None)
    assert small == noiselevel.posterior(s, t)[2]
    assert large == noiselevel.transition(s, t)[1]
    ones = torch.ones(3, dtype=torch.float64)
    for v, want in ((ones, large), (-ones, small)):
        got = learned.variance(s, t, v)
        tol = 4 * (abs(math.log(want)) + 1) * EPS64 * want
        assert torch.all((got - want).abs() <= tol), (got, want)
    # in between, the variance lies between the two bounds
    mid = learned.variance(s, t, torch.zeros(1, dtype=torch.float64))
    assert small * (1 - 1e-12) <= float(mid) <= large * (1 + 1e-12)


def test_ddpm_with_fixed_small_is_ddpm_bit_for_bit(registry):
    """A ``variance: fixed-small`` section reproduces the ddpm sampler's own variance (the
    posterior's, DDPM Algorithm 2): the samples are identical bit for bit; fixed-large differs."""
    base = oracle_recipe(sampler={"name": "ddpm", "steps": 12}, sample={"num_samples": 16, "batch_size": 16})
    plain = fundiff.Pipeline(fundiff.load_recipe(base, registry)).sample(16)[0]
    small = fundiff.Pipeline(fundiff.load_recipe({**base, "variance": "fixed-small"}, registry)).sample(16)[0]
    large = fundiff.Pipeline(fundiff.load_recipe({**base, "variance": "fixed-large"}, registry)).sample(16)[0]
    assert torch.equal(plain, small)
    assert not torch.equal(plain, large) and torch.isfinite(large).all()


def _vp_tensors(logsnr):
    alpha, sigma = noiselevel.vp_alpha_sigma(logsnr)
    return LevelTensors(logsnr=logsnr, alpha=alpha, sigma=sigma)


def test_vlb_term_is_the_gaussian_kl_and_trains_only_the_variance(registry):
    """Improved DDPM sec. 3.1: L_vlb = KL(q(x_s | x_t, x0) || p(x_s | x_t)) per element equals
    torch.distributions' Gaussian KL (q's mean and variance from the posterior, p's from the
    detached x0 estimate and the learned-range variance); the stop-gradient leaves a
    parameter that only moves the mean with the same gradient whether or not L_vlb is added."""
    torch.manual_seed(0)
    schedule = registry.build("schedule", "linear")
    chain = registry.build("chain", "vp")
    variance = LearnedRange(vlb_weight=0.001)
    b = 5
    t = _vp_tensors(torch.linspace(-4.0, 4.0, b, dtype=torch.float64))
    s = variance.training_levels(t, schedule, chain)
    x0 = torch.randn(b, 2, dtype=torch.float64)
    x_t = noiselevel.append_dims(t.alpha, 2) * x0 + noiselevel.append_dims(t.sigma, 2) * torch.randn(b, 2, dtype=torch.float64)
    a = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)  # moves the mean only
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # moves the variance only
    x0_hat = a * x0 + 0.1
    v = w * torch.randn(b, 2, dtype=torch.float64)
    term = variance.training_loss(x0, x_t, x0_hat, v, t, s, schedule)
    # reference KL from torch.distributions, per element, averaged, times lambda * T
    from torch.distributions import Normal, kl_divergence

    expect = []
    for i in range(b):
        lt = noiselevel.Level(float(t.logsnr[i]), float(t.alpha[i]), float(t.sigma[i]))
        ls = noiselevel.Level(float(s.logsnr[i]), float(s.alpha[i]), float(s.sigma[i]))
        c0, ct, var_q = noiselevel.posterior(ls, lt)
        var_p = variance.variance(ls, lt, v[i].detach())
        q = Normal(c0 * x0[i] + ct * x_t[i], math.sqrt(var_q))
        p = Normal(c0 * x0_hat[i].detach() + ct * x_t[i], var_p.sqrt())
        expect.append(kl_divergence(q, p).mean() * 0.001 * schedule.num_steps)
    torch.testing.assert_close(term, torch.stack(expect), rtol=1e-9, atol=0.0)
    mse = ((x0_hat - x0) ** 2).mean()
    (grad_a_mse,) = torch.autograd.grad(mse, a, retain_graph=True)
    grad_a_both, grad_w = torch.autograd.grad(mse + term.mean(), (a, w))
    assert torch.equal(grad_a_mse, grad_a_both)
    assert grad_w != 0


def test_learned_range_refuses_a_denoiser_without_variance_head(registry):
    """check_recipe: learned-range needs ``learned_variance: true`` and says so."""
    with pytest.raises(fundiff.RecipeError, match="learned_variance: true"):
        fundiff.load_recipe(oracle_recipe(variance="learned-range"), registry)


def test_analytic_unit_gaussian_stand_in_is_fixed_large(registry):
    """Ho et al. 2020 sec. 3.2: beta is the optimal variance for x0 ~ N(0, I) on a VP chain;
    Analytic-DPM's eq. 7 with that data's Gamma = sigma_t^2 (the unprepared stand-in) gives
    exactly beta."""
    analytic = registry.build("variance", "analytic")
    for lam_t, lam_s in ((-6.0, -5.0), (0.0, 0.5), (3.0, 8.0)):
        s, t = (noiselevel.Level(lam, *noiselevel.vp_alpha_sigma(lam)) for lam in (lam_s, lam_t))
        beta = noiselevel.transition(s, t)[1]
        assert optimal_variance(s, t, analytic.gamma(t)) == pytest.approx(beta, rel=1e-12)


def _counting(pipeline):
    calls = []
    pipeline.sampling_model(pipeline.recipe.sample.use_ema).register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_analytic_with_the_oracle_lies_between_the_bounds_and_is_cached(registry, tmp_path):
    """Analytic-DPM (Bao et al. 2022, Theorem 1) with the exact gmm-oracle moments: Gamma_t =
    E||eps_hat||^2 / d <= 1 (Jensen, up to Monte-Carlo error: 4 standard errors), so the
    optimal variance is >= beta tilde at every grid level, and the clipped variance lies in
    [beta tilde, beta]. The Gamma table is measured once (grid model calls), stored in the run
    directory and read back by a second pipeline without model calls."""
    grid, batch = 20, 512
    recipe = oracle_recipe(variance={"name": "analytic", "grid": grid, "batch": batch}, sampler={"name": "ddpm", "steps": 10})
    run = str(tmp_path / "oracle")
    fundiff.train(fundiff.load_recipe(recipe, registry), run, quiet=True)
    p = fundiff.load_run(run, registry=registry)
    calls = _counting(p)
    prepared = p.reverse_variance()
    assert isinstance(prepared, PreparedAnalytic) and len(calls) == grid
    assert len([f for f in os.listdir(run) if f.startswith("variance-analytic-")]) == 1
    levels = fundiff.noise_levels(p.schedule, p.chain, grid)
    for t, s in zip(levels[:-2], levels[1:-1]):
        gamma = prepared.gamma(t)
        assert 0.0 <= gamma <= 1.0 + 4 * math.sqrt(2.0 / (batch * 2))
        beta_tilde, beta = noiselevel.posterior(s, t)[2], noiselevel.transition(s, t)[1]
        assert optimal_variance(s, t, min(gamma, 1.0)) >= beta_tilde
        assert beta_tilde <= prepared.variance(s, t) <= beta
    again = fundiff.load_run(run, registry=registry)
    again_calls = _counting(again)
    assert again.reverse_variance().gammas == prepared.gammas and again_calls == []
    x, _ = again.sample(32)
    assert torch.isfinite(x).all() and len(again_calls) == 10


@pytest.mark.slow
def test_learned_range_trains_and_samples(registry, tmp_path):
    """A tiny hybrid-loss run (mlp with a variance head, learned-range, 20 steps) has finite
    losses, and ddpm sampling with the learned variance is finite."""
    recipe = fundiff.load_recipe(
        os.path.join(os.path.dirname(__file__), "..", "recipes", "two-moons-learned-variance.yaml"),
        registry,
        overrides={"train.steps": 20, "train.batch_size": 64, "denoiser.width": 32, "denoiser.depth": 1, "data.n": 512,
                   "sampler.steps": 10, "schedule.name": "cosine", "parameterization.name": "v"},
    )
    p = fundiff.train(recipe, str(tmp_path / "run"), quiet=True)
    assert torch.isfinite(p.loss(0, 64))
    x, _ = p.sample(64)
    assert x.shape == (64, 2) and torch.isfinite(x).all()
