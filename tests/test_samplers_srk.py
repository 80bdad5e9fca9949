"""The stochastic-improved-euler sampler: Roberts' (2012, arXiv:1210.0933) stochastic Runge-Kutta
scheme on the reverse SDE of a Gaussian chain (Song et al. 2021, eq. 6), in the time r = lambda.

Numerical tests run in float64 with the exact denoiser of the 8-mode ring (``gmm-oracle``,
radius 2, std 0.15), built as in tests/test_samplers_stochastic.py. Convergence is measured on
grids uniform in lambda over a window that stops short of the clean level, so that the error
is the SDE solver's alone (the final denoising step onto the clean level is the same
noise-free step for every sampler). Strong errors are medians over samples of the distance to
a fine-grid solution on the same per-sample Brownian path: samples near a boundary between
modes can land in another mode for any step size (an O(1) distance for an O(h) fraction of
samples), which a mean over samples turns into an apparent order 1/2; the median measures the
typical sample.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import oracle_recipe
from test_samplers_stochastic import oracle, pipeline

import fundiff
from fundiff.errors import RecipeError
from fundiff.pipeline import make_denoise
from fundiff.testing import Z_SCORE, check_sampler

NAME = "stochastic-improved-euler"
BATCH = 300
WINDOW = (-4.0, 2.0)  # logSNR from mostly noise to where the modes have separated (sigma ~ 0.34)
FINE_STEPS = 512


@pytest.fixture(scope="module")
def ring(registry):
    """(denoise, chain, start, noise(), grid(n)): the exact ring oracle, a start drawn from the
    exact marginal at WINDOW[0] (alpha x0 + sigma eps with exact data), per-sample streams."""
    p = pipeline(registry, parameterization="x0")
    denoise = make_denoise(p.model, p.parameterization, p.guidance)
    ids = torch.arange(BATCH)

    def grid(n):
        lo, hi = WINDOW
        return [p.chain.level(lo + (hi - lo) * k / n) for k in range(n + 1)]

    first = grid(1)[0]
    x0, _ = p.data_set.draw(BATCH, seed=5)
    eps = fundiff.NoiseStream(9, ids, (2,), stream=fundiff.rng.STREAM_PRIOR, dtype=torch.float64).normal(0)
    start = first.alpha * x0.double() + first.sigma * eps

    def noise():
        return fundiff.NoiseStream(7, ids, (2,), stream=fundiff.rng.STREAM_SAMPLER, dtype=torch.float64)

    return denoise, p.chain, start, noise, grid


def median_distance(a, b) -> float:
    return float((a - b).norm(dim=1).median())


# --------------------------------------------------------------------------------------
# contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params", [{}, {"noise": "brownian"}, {"signs": "random", "noise": "brownian"}], ids=["fresh", "brownian", "random-signs"]
)
def test_conformance(registry, params):
    """fundiff.testing.check_sampler: shapes, dtype, reproducibility, sample i independent of
    its batch (the dW draws and the signs S come from per-sample streams or trees), and the
    sanity band with an exact Gaussian denoiser on the VP chain."""
    check_sampler(registry.build("sampler", NAME, **params))


class FixedDraws:
    """A noise source whose draws are given tensors: ``sample`` the step's z, ``uniform`` the
    sign's u (one-step identities)."""

    def __init__(self, z, u):
        self.z, self.u = z, u

    def sample(self, draw):
        return self.z

    def uniform(self, draw):
        return self.u


@pytest.mark.parametrize("chain", ["vp", "ve"])
def test_one_step_is_roberts_scheme(registry, chain):
    """One step from t to s against Roberts' scheme written out by hand in x, with the reverse
    SDE's drift a = alpha D - (1 + f) x and diffusion b = sigma in r = lambda (forward SDE
    f = d log alpha / dtau, g^2 = sigma^2 in tau = -lambda; VP: f = -sigma^2 / 2, VE: f = 0),
    independent of Chain.reverse_sde: K1 = h a(t, x) + (dW - S sqrt h) b(t), K2 = h a(s, x +
    K1) + (dW + S sqrt h) b(s), x_s = x + (K1 + K2) / 2, with dW = sqrt(h) z and S = +1 where
    u < 1/2 (signs: random, so that S is exercised). A sign error in the reverse time, or S and dW swapped, moves the result by ~h;
    agreement to 1e-12 (a few roundings of O(10) operands)."""
    denoise, levels, start, _ = oracle(registry, chain=chain, steps=10)
    t, s = levels[4], levels[5]
    x = start(torch.arange(100))
    z = torch.linspace(-2, 2, 200, dtype=torch.float64).reshape(100, 2)
    u = torch.rand(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = registry.build("sampler", NAME, signs="random").sample(denoise, x, [t, s], FixedDraws(z, u))

    def a(level, y):
        f = -0.5 * level.sigma**2 if chain == "vp" else 0.0
        return level.alpha * denoise(y, level) - (1.0 + f) * y

    h = s.logsnr - t.logsnr
    sign = torch.where(u[:, :1] < 0.5, 1.0, -1.0).double()
    dw = math.sqrt(h) * z
    k1 = h * a(t, x) + (dw - sign * math.sqrt(h)) * t.sigma
    k2 = h * a(s, x + k1) + (dw + sign * math.sqrt(h)) * s.sigma
    expected = x + 0.5 * (k1 + k2)
    assert (out - expected).abs().max().item() < 1e-12 * (1.0 + expected.abs().max().item())


@pytest.mark.parametrize("chain", ["vp", "sub-vp", "ve"])
def test_the_chains_drift_is_the_same_under_no_grad(registry, chain):
    """Chain.dlog_alpha_dlogsnr (the forward SDE's f = -d log alpha / d lambda that reverse_sde
    uses) differentiates alpha_sigma by autograd; under torch.no_grad and inference_mode, where
    Pipeline.sample runs samplers, it must give the same value, and on VP the closed form
    sigma^2 / 2 (alpha^2 = sigmoid(lambda)), to 1e-14 (float64 rounding of a sigmoid)."""
    built = registry.build("chain", chain)
    for logsnr in (-6.0, 0.3, 5.0):
        plain = built.dlog_alpha_dlogsnr(logsnr)
        with torch.no_grad():
            assert built.dlog_alpha_dlogsnr(logsnr) == plain
        with torch.inference_mode():
            assert built.dlog_alpha_dlogsnr(logsnr) == plain
        if chain == "vp":
            assert abs(plain - 0.5 / (1.0 + math.exp(logsnr))) < 1e-14


def test_recipes_it_cannot_sample_are_refused(registry):
    """A zero-terminal-SNR schedule makes the first step infinitely long in lambda, and a
    Brownian tree draws Gaussian increments: both refused at load time with the cause named."""
    with pytest.raises(RecipeError, match="zero terminal SNR"):
        fundiff.load_recipe(
            oracle_recipe(schedule={"name": "zero-terminal-snr", "base": "linear"}, parameterization="v", sampler={"name": NAME}),
            registry,
        )
    with pytest.raises(RecipeError, match="gaussian-noise"):
        fundiff.load_recipe(oracle_recipe(noise="gamma", sampler={"name": NAME, "noise": "brownian"}), registry)
    fundiff.load_recipe(oracle_recipe(noise="gamma", sampler={"name": NAME}), registry)


# --------------------------------------------------------------------------------------
# convergence on one Brownian path
# --------------------------------------------------------------------------------------


def test_strong_error_falls_with_the_step_and_beats_euler_maruyama(registry, ring):
    """Strong convergence (Roberts 2012: strong order 1) on the window lambda in [-4, 2],
    Brownian-tree noise so every grid follows one path per sample.

    * the limits agree: this sampler (zero signs) and euler-maruyama at FINE_STEPS solve the
      same SDE on the same path (euler-maruyama in the clock (sigma / alpha)^2, another time
      change of the tree's path with the same limit): median distance under 0.01, against
      0.0027 measured (0.0030 for random signs) and ~0.02-0.05 at 32 steps;
    * halving the step roughly halves the error (order 1): e(2n) < 0.65 e(n) for n = 8, 16
      (measured ratios 0.41-0.48 for both sign modes);
    * at equal steps, zero signs beat euler-maruyama (measured 8 / 16 / 32 steps: 0.098 /
      0.047 / 0.019 against 0.21 / 0.10 / 0.050; asserted under 0.7 times) and, at equal
      evaluations (n steps against euler-maruyama's 2n: 0.10 / 0.050 / 0.025), are not worse
      (asserted under 1.1 times; measured 0.78-0.95 times);
    * random signs (Roberts' Ito form; zero is the default) carry an extra O(h^(3/2)) term per step
      independent of the path (module doc): measured 2.8 times the zero-sign error (0.28 /
      0.13 / 0.055), i.e. 1.1-1.3 times euler-maruyama's at equal steps -- not better than it
      on this SDE; asserted between 1.5 and 4 times the zero-sign error."""
    denoise, _, start, noise, grid = ring
    build = registry.build
    srk = {mode: build("sampler", NAME, noise="brownian", signs=mode) for mode in ("random", "zero")}
    em = build("sampler", "euler-maruyama", noise="brownian")
    reference = srk["zero"].sample(denoise, start, grid(FINE_STEPS), noise())
    em_limit = em.sample(denoise, start, grid(FINE_STEPS), noise())
    assert median_distance(em_limit, reference) < 0.01

    def error(sampler, n):
        return median_distance(sampler.sample(denoise, start, grid(n), noise()), reference)

    steps = (8, 16, 32)
    errors = {mode: [error(s, n) for n in steps] for mode, s in srk.items()}
    em_errors = {n: error(em, n) for n in steps + (64,)}
    for mode, errs in errors.items():
        for coarse, fine in itertools.pairwise(errs):
            assert fine < 0.65 * coarse, (mode, errs)
    for n, zero in zip(steps, errors["zero"]):
        assert zero < 0.7 * em_errors[n], (n, zero, em_errors)
        assert zero < 1.1 * em_errors[2 * n], (n, zero, em_errors)
    for rand, zero in zip(errors["random"], errors["zero"]):
        assert 1.5 * zero < rand < 4.0 * zero, errors


def test_without_noise_it_is_heuns_method_of_order_two(registry, ring):
    """With s_noise = 0 the scheme is Heun's method on dx/dr = a(r, x) (no draws: noise=None
    works), second order: the RMS distance to a FINE_STEPS solution at n = 16, 32, 64 falls by
    log2 slopes of 1.93, 1.95, 1.98 (measured); asserted in [1.8, 2.2], which a first-order
    drift (slope 1) or a wrong second stage (slope 1) fails. The reference's own error is
    (64 / 512)^2 ~ 1.6% of the 64-step error, below the slope's margin."""
    denoise, _, start, _, grid = ring
    heun = registry.build("sampler", NAME, s_noise=0.0)
    reference = heun.sample(denoise, start, grid(FINE_STEPS), None)
    errors = [
        float((heun.sample(denoise, start, grid(n), None) - reference).norm(dim=1).pow(2).mean().sqrt()) for n in (8, 16, 32, 64)
    ]
    slopes = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert all(1.8 < slope < 2.2 for slope in slopes[1:]), (errors, slopes)


# --------------------------------------------------------------------------------------
# weak error: the mixture's moments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signs", ["random", "zero"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samples_have_the_mixtures_mean_and_covariance(registry, signs, schedule):
    """Weak error: N = 2000 samples (fundiff.Pipeline.sample, 40 steps, 79 evaluations) have the
    ring's mean 0 and covariance (radius^2 / 2 + std^2) I = 2.0225 I. Bounds from the sample
    size: each mean coordinate within Z_SCORE sqrt(v / N), each covariance entry within
    Z_SCORE times its standard error sqrt(Var(x_i x_j) / N), with v and Var(x_i x_j) the
    exact mixture's, estimated from 20000 exact samples. Every one of the 8 modes holds its
    1/8 share within 4 standard errors (as test_samplers_stochastic.py checks the others).
    Measured variances at 40 steps: 1.97-2.03 (linear), 2.04-2.08 (cosine: its first step,
    h ~ 14, lies outside Heun's stability interval and the rest of the grid mostly forgets it;
    2.10-2.17 at 20 steps), against a bound of 2.0225 +- 0.20. Pipeline.sample runs under
    torch.no_grad, where Chain.dlog_alpha_dlogsnr read 0 before it recorded its own graph:
    f = 0 instead of -sigma^2 / 2 on VP gave variances 1.84-1.89 at 80 steps, which this fails."""
    n = 2000
    p = pipeline(registry, schedule=schedule, sampler={"name": NAME, "steps": 40, "signs": signs})
    samples, _ = p.sample(n, seed=1, batch_size=n, dtype=torch.float64)
    exact, _ = p.data_set.draw(20000, seed=101)
    exact = exact.double()
    _, means, stds = p.data_set.mixture()
    cov_true = (means.T @ means) / means.shape[0] + float(stds[0]) ** 2 * torch.eye(2, dtype=torch.float64)
    assert torch.allclose(cov_true, 2.0225 * torch.eye(2, dtype=torch.float64), atol=1e-12)
    mean_se = (cov_true.diagonal() / n).sqrt()
    assert (samples.mean(0).abs() < Z_SCORE * mean_se).all(), samples.mean(0)
    products = exact[:, :, None] * exact[:, None, :]
    cov_se = (products.var(0) / n).sqrt()
    centred = samples - samples.mean(0)
    cov = centred.T @ centred / (n - 1)
    assert ((cov - cov_true).abs() < Z_SCORE * cov_se).all(), (cov, cov_se)
    freq = torch.bincount(torch.cdist(samples, means).argmin(1), minlength=8).double() / n
    assert (freq - 1 / 8).abs().max() < 4 * math.sqrt((1 / 8) * (7 / 8) / n), freq
