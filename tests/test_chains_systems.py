"""Systems of chains (survey sec. 3.2.2): critically-damped Langevin diffusion (``cld``, with
its ``cld-sscs`` sampler) and products of Gaussian chains over parts of the state
(``product``, with ``product-ancestral``).

CLD references are Dockhorn, Vahdat and Kreis 2022 ("Score-based generative modeling with
critically-damped Langevin diffusion"): the perturbation kernel (appendix B), hybrid score
matching and the SSCS sampler (sec. 3). Numerical references run in float64.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from helpers import RECIPES, sliced_wasserstein
from hypothesis import given
from hypothesis import strategies as st

import fundiff
from fundiff import rng
from fundiff.errors import FundiffError, RecipeError
from fundiff.pipeline import noise_levels
from fundiff.testing import gaussian_posterior_mean
from fundiff_plugins.chains import cld as cld_math
from fundiff_plugins.chains.cld import CriticallyDampedLangevin
from fundiff_plugins.chains.product import Part, Product
from fundiff_plugins.chains.vp import VariancePreserving
from fundiff_plugins.samplers.cld_sscs import SymmetricSplittingCLD
from fundiff_plugins.samplers.ddpm import DDPM
from fundiff_plugins.samplers.product_ancestral import ProductAncestral
from fundiff_plugins.schedules.cosine import Cosine
from fundiff_plugins.schedules.shifted import Shifted

U = torch.finfo(torch.float64).eps
Z = 6.0  # standard errors allowed by the statistical bounds (two-sided p ~ 2e-9)


class Normal:
    """A sampler noise source from a per-sample stream (what the pipeline hands samplers)."""

    def __init__(self, seed: int, ids: torch.Tensor, shape: tuple[int, ...], stream: int = rng.STREAM_SAMPLER):
        self.stream = rng.NoiseStream(seed, ids, shape, stream=stream, dtype=torch.float64)

    def sample(self, draw: int) -> torch.Tensor:
        return self.stream.normal(draw)

    def uniform(self, draw: int) -> torch.Tensor:
        return self.stream.uniform(draw)


# ======================================================================================
# cld: the perturbation kernel
# ======================================================================================


def _drift_and_noise(mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """F and G G^T of the forward CLD SDE in B = beta t (paper sec. 3), Gamma = 2 sqrt(M)."""
    damping = 2.0 * math.sqrt(mass)
    drift = torch.tensor([[0.0, 1.0 / mass], [-1.0, -damping / mass]], dtype=torch.float64)
    return drift, torch.diag(torch.tensor([0.0, 2.0 * damping], dtype=torch.float64))


@given(b=st.floats(1e-8, 8.0), mass=st.floats(0.05, 2.0), gamma=st.floats(0.01, 1.0))
def test_cld_kernel_matches_the_matrix_exponential(b, mass, gamma):
    """Appendix B's mean and covariance (our cancellation-free forms) against Van Loan's
    method in 30-digit arithmetic (mpmath): exp([[F, Q], [0, -F^T]] B) = [[Phi, X], [0, .]]
    gives Phi = exp(F B) and the SDE's covariance X Phi^T, to which Phi diag(0, gamma M) Phi^T
    adds v0's spread. (torch's float64 matrix_exp is no reference here: it loses ~1e-13 of
    Sigma_xx ~ gamma B^2 / M at small B.)

    Tolerances, R = 64 roundings of U: each diagonal entry relative to itself (measured below
    4 U) and the mean coefficients relative to themselves times 1 + cB (exp(-cB) carries the
    rounding of its argument cB); Sigma_xv relative to sqrt(Sigma_xx Sigma_vv), since it
    crosses zero; the determinant, formed with a mild cancellation (det S + w^T adj(S) w),
    to 4 R U (measured 55 U). The Cholesky factor reproduces Sigma to R U."""
    mpmath = pytest.importorskip("mpmath")

    mpmath.mp.dps = 30
    damping = 2 * mpmath.sqrt(mass)
    block = mpmath.zeros(4, 4)
    block[0, 1], block[1, 0], block[1, 1], block[1, 3] = 1 / mpmath.mpf(mass), -1, -damping / mass, 2 * damping
    block[2, 3], block[3, 2], block[3, 3] = 1, -1 / mpmath.mpf(mass), damping / mass
    exp = mpmath.expm(block * b)
    phi, cross = exp[0:2, 0:2], exp[0:2, 2:4]
    ref = cross * phi.T + phi * mpmath.matrix([[0, 0], [0, gamma * mass]]) * phi.T
    ref_det = float(ref[0, 0] * ref[1, 1] - ref[0, 1] ** 2)
    ref_xx, ref_xv, ref_vv = float(ref[0, 0]), float(ref[0, 1]), float(ref[1, 1])
    k = cld_math.kernel(torch.tensor([b], dtype=torch.float64), mass, gamma)
    r = 64 * U
    assert abs(k.xx.item() - ref_xx) <= r * ref_xx and abs(k.vv.item() - ref_vv) <= r * ref_vv
    assert abs(k.xv.item() - ref_xv) <= r * math.sqrt(ref_xx * ref_vv)
    assert abs(k.det.item() - ref_det) <= 4 * r * ref_det
    decay_roundings = r * (1 + b / math.sqrt(mass))  # exp(-cB) inherits cB's rounding, amplified by cB
    assert abs(k.mean_x.item() - float(phi[0, 0])) <= decay_roundings * abs(float(phi[0, 0]))
    assert abs(k.mean_v.item() - float(phi[1, 0])) <= decay_roundings * abs(float(phi[1, 0]))
    l_xx, l_xv, l_vv = cld_math.cholesky(k)
    assert abs((l_xx * l_vv) ** 2 - k.det).item() <= r * k.det.item()
    assert abs(l_xv**2 + l_vv**2 - k.vv).item() <= r * k.vv.item()


def test_cld_kernel_matches_an_euler_maruyama_simulation():
    """The kernel's moments against the forward SDE itself: 8000 paths from x0 = 1.5 with
    v0 ~ N(0, gamma M), 800 Euler-Maruyama steps to B = 1 (paper defaults). Bounds: Z standard
    errors of the sample mean (sqrt(var / n)) and covariance (sqrt(var_a var_b / n), a
    Gaussian's), plus the scheme's first-order bias, measured below 2e-3 at this step."""
    chain = CriticallyDampedLangevin()
    drift, _ = _drift_and_noise(chain.mass)
    n, steps, b_end, x0 = 8000, 800, 1.0, 1.5
    ids = torch.arange(n)
    draws = rng.NoiseStream(5, ids, (2,), stream=rng.STREAM_TRAIN_NOISE, dtype=torch.float64)
    start = draws.normal(0)
    u = torch.stack([torch.full((n,), x0, dtype=torch.float64), math.sqrt(chain.gamma * chain.mass) * start[:, 1]], 1)
    h = b_end / steps
    for i in range(steps):
        u = u + h * u @ drift.T
        u[:, 1] += math.sqrt(2.0 * chain.damping * h) * draws.normal(1 + i)[:, 0]
    k = cld_math.kernel(torch.tensor([b_end], dtype=torch.float64), chain.mass, chain.gamma)
    mean = torch.tensor([k.mean_x[0] * x0, k.mean_v[0] * x0], dtype=torch.float64)
    cov = torch.tensor([[k.xx[0], k.xv[0]], [k.xv[0], k.vv[0]]], dtype=torch.float64)
    got_mean, got_cov = u.mean(0), torch.cov(u.T)
    var = torch.diag(cov)
    assert ((got_mean - mean).abs() <= Z * (var / n).sqrt() + 2e-3).all(), (got_mean, mean)
    assert ((got_cov - cov).abs() <= Z * (var[:, None] * var[None, :] / n).sqrt() + 2e-3).all(), (got_cov, cov)


@given(lam=st.floats(-40.0, 60.0))
def test_cld_logsnr_is_the_position_snr_and_inverts_in_float64(lam):
    """lambda(B) = log(f^2 / Sigma_xx) round-trips through B(lambda) to R U (1 + |lambda|)
    (R = 64 roundings), and the level's (alpha, sigma) have alpha^2 / sigma^2 = e^lambda."""
    chain = CriticallyDampedLangevin()
    b = cld_math.time_from_logsnr(torch.tensor([lam], dtype=torch.float64), chain.mass, chain.gamma)
    back = cld_math.logsnr_at(b, chain.mass, chain.gamma).item()
    assert abs(back - lam) <= 64 * U * (1 + abs(lam))
    level = chain.level(lam)
    assert abs(2 * math.log(level.alpha / level.sigma) - lam) <= 64 * U * (1 + abs(lam))
    assert level.chain is chain


def test_cld_logsnr_falls_strictly_and_the_prior_is_reached_at_the_horizon():
    """lambda(B) is strictly decreasing on B in [1e-12, 1e3] (the mean coefficient falls and
    Sigma_xx rises for gamma < 2); at the horizon B_T = beta T = 4 the kernel is within
    KL 2e-4 of the prior N(0, diag(1, M)) for standardised data |x0| <= 3 (the mean
    coefficients there are 9 e^{-8} and -4 e^{-8}), and the KL keeps falling beyond it."""
    chain = CriticallyDampedLangevin()
    b = torch.logspace(-12, 3, 20001, dtype=torch.float64)
    assert (torch.diff(cld_math.logsnr_at(b, chain.mass, chain.gamma)) < 0).all()

    def kl_to_prior(b_value: float, x0: float) -> float:
        k = cld_math.kernel(torch.tensor([b_value], dtype=torch.float64), chain.mass, chain.gamma)
        mu = torch.tensor([k.mean_x[0] * x0, k.mean_v[0] * x0], dtype=torch.float64)
        cov = torch.tensor([[k.xx[0], k.xv[0]], [k.xv[0], k.vv[0]]], dtype=torch.float64)
        prior = torch.diag(torch.tensor([1.0, chain.mass], dtype=torch.float64))
        inv = torch.linalg.inv(prior)
        return 0.5 * float(torch.trace(inv @ cov) + mu @ inv @ mu - 2 + torch.logdet(prior) - torch.logdet(cov))

    assert chain.horizon_time == 4.0
    with pytest.raises(FundiffError, match="coupled"):  # not a scalar Gaussian SDE: no silent wrong answer
        chain.pf_ode(torch.zeros(2, 4), torch.zeros(2, 4), chain.level(0.0))
    kls = [kl_to_prior(b_value, 3.0) for b_value in (2.0, 4.0, 8.0)]
    assert kls[1] < 2e-4 and kls[0] > kls[1] > kls[2] >= 0, kls
    start = chain.sampling_levels(noise_levels(Cosine(), chain, 10), Cosine())[0]
    assert abs(chain.time(start.logsnr) - 4.0) < 1e-9


# ======================================================================================
# cld: hybrid score matching and what samplers recover
# ======================================================================================


@given(lam=st.floats(-10.0, 12.0), seed=st.integers(0, 2**16), mixed=st.booleans())
def test_cld_hsm_target_is_the_kernels_velocity_score_and_samplers_recover_it(lam, seed, mixed):
    """HSM (paper sec. 3): grad_v log q(u | x0) = -eps_v / L_vv for u = mean + L eps, checked
    against autograd of the Gaussian log density. And the network output that ``training_losses``
    targets (eps, minus the mixed-score term) passes through the eps parameterization's
    (u - sigma out) / alpha and ``velocity_noise`` back to eps_v, to float64 rounding scaled by
    the conversion's 1 / sigma."""
    chain = CriticallyDampedLangevin(mixed_score=mixed)
    level = chain.level(lam)
    k, l_xx, l_xv, l_vv = chain.host_kernel(level)
    gen = torch.Generator().manual_seed(seed)
    x0, eps_x, eps_v = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    u = torch.cat([k.mean_x * x0 + l_xx * eps_x, k.mean_v * x0 + l_xv * eps_x + l_vv * eps_v], 1).requires_grad_(True)
    x, v = u[:, :3], u[:, 3:]
    rx, rv = x - k.mean_x * x0, v - k.mean_v * x0
    log_q = -0.5 * (k.vv * rx**2 - 2 * k.xv * rx * rv + k.xx * rv**2) / k.det
    (grad,) = torch.autograd.grad(log_q.sum(), u)
    expected = -eps_v / l_vv
    assert torch.allclose(grad[:, 3:], expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    u = u.detach()
    out_v = eps_v - (l_vv / k.vv) * u[:, 3:] if mixed else eps_v
    out = torch.cat([eps_x, out_v], 1)
    denoised = (u - level.sigma * out) / level.alpha
    recovered = chain.velocity_noise(u, denoised, level)
    tol = 1e3 * U * (1 + u.abs().max().item()) / level.sigma * (1 + 1 / level.alpha)
    assert (recovered - eps_v).abs().max().item() <= tol


def _gaussian_velocity_score(chain, u, level, m, sd):
    """Exact grad_v log p(u) for x0 ~ N(m, sd^2 I): u is Gaussian with mean (f m, g m) and
    per-dimension covariance Sigma + sd^2 (f, g)(f, g)^T."""
    k, *_ = chain.host_kernel(level)
    f, g = k.mean_x, k.mean_v
    cxx, cxv, cvv = k.xx + sd**2 * f * f, k.xv + sd**2 * f * g, k.vv + sd**2 * g * g
    x, v = u.chunk(2, dim=1)
    rx, rv = x - f * m, v - g * m
    return -(-cxv * rx + cxx * rv) / (cxx * cvv - cxv * cxv)


def _gaussian_oracle(chain, m, sd):
    """denoise(u, level) of an exact network for x0 ~ N(m, sd^2 I): E[x0 | u] by Gaussian
    conditioning, as the eps parameterization would return it (``cld.denoised_for``)."""

    def denoise(u, level):
        k, *_ = chain.host_kernel(level)
        f, g = k.mean_x, k.mean_v
        cxx, cxv, cvv = k.xx + sd**2 * f * f, k.xv + sd**2 * f * g, k.vv + sd**2 * g * g
        x, v = u.chunk(2, dim=1)
        rx, rv = x - f * m, v - g * m
        det = cxx * cvv - cxv * cxv
        x0 = m + sd**2 * (f * (cvv * rx - cxv * rv) + g * (cxx * rv - cxv * rx)) / det
        return chain.denoised_for(u, x0, level)

    return denoise


@given(lam=st.floats(-11.0, 12.0), seed=st.integers(0, 2**16), mixed=st.booleans())
def test_cld_exact_posterior_mean_gives_the_exact_velocity_score(lam, seed, mixed):
    """For Gaussian data the joint marginal is Gaussian and its velocity score is closed form;
    the score the chain computes from the exact E[x0 | u] (``denoised_for`` then
    ``velocity_score``) equals it, because the kernel's mean is linear in x0
    (grad log p(u) = -Sigma^{-1}(u - mean(E[x0 | u]))). Tolerance: float64 rounding through
    the 1 / sigma and 1 / alpha of the eps conversion."""
    chain = CriticallyDampedLangevin(mixed_score=mixed)
    level = chain.level(lam)
    m, sd = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64), 0.3
    u = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    expected = _gaussian_velocity_score(chain, u, level, m, sd)
    got = chain.velocity_score(u, _gaussian_oracle(chain, m, sd)(u, level), level)
    l_vv = chain.host_kernel(level)[3]
    tol = 1e3 * U * (1 + u.abs().max().item()) / (level.sigma * level.alpha * l_vv)
    assert (got - expected).abs().max().item() <= tol * (1 + expected.abs().max().item())


def test_cld_sscs_with_the_exact_score_reproduces_gaussian_data():
    """SSCS from the prior at B_T with the exact score of x0 ~ N(m, 0.3^2) (2-D), 4000
    samples on the cosine grid. The splitting is first order in the step: the moment errors
    measured with 20000 samples were (mean, std) about (0.013, -0.011) at 50 steps and
    (0.005, -0.005) at 100. Bounds at 160 steps: Z standard errors (sd / sqrt(n) for the
    mean, sd / sqrt(2n) for the std) plus 1 / steps for the bias; and the std error at 40
    steps is larger than at 160 (same noise streams, so the comparison is coupled)."""
    chain = CriticallyDampedLangevin()
    n, m, sd = 4000, torch.tensor([1.0, -0.5], dtype=torch.float64), 0.3
    ids = torch.arange(n)
    errors = {}
    for steps in (40, 160):
        levels = chain.sampling_levels(noise_levels(Cosine(), chain, steps), Cosine())
        start = chain.initial_state(levels[0], Normal(0, ids, (4,), rng.STREAM_PRIOR))
        out = SymmetricSplittingCLD(steps=steps).sample(_gaussian_oracle(chain, m, sd), start, levels, Normal(0, ids, (4,)))
        x = chain.decode(out)
        errors[steps] = ((x.mean(0) - m).abs().max().item(), (x.std(0) - sd).abs().max().item())
    mean_err, std_err = errors[160]
    assert mean_err <= Z * sd / math.sqrt(n) + 1 / 160, errors
    assert std_err <= Z * sd / math.sqrt(2 * n) + 1 / 160, errors
    assert errors[40][1] > std_err, errors


@pytest.mark.parametrize("mixed", [True, False])
def test_cld_training_loss_is_zero_for_the_network_that_knows_the_noise(registry, mixed):
    """``training_losses`` perturbs with the kernel and targets eps_v (minus the mixed-score
    term v L_vv / Sigma_vv with ``mixed_score``): a network that reconstructs exactly that
    from u and the batch's x0 scores 0 (to float32 rounding). Without the mixed term a network
    that outputs zeros scores the mean square of standard normal velocity noise: 1 within Z
    standard errors sqrt(2 / (64 x 2)) of a chi-square mean."""
    recipe = fundiff.load_recipe(
        os.path.join(RECIPES, "cld.yaml"),
        registry,
        overrides={"denoiser.width": 8, "denoiser.depth": 1, "chain.mixed_score": mixed},
    )
    pipeline = fundiff.Pipeline(recipe)
    chain = pipeline.chain
    index = (rng.uniform(0, rng.STREAM_TRAIN_DATA, 3, torch.arange(64)) * pipeline.data.x.shape[0]).long()
    x0 = pipeline.data.x[index]

    def knowing(u, logsnr, cond):
        b = cld_math.time_from_logsnr(logsnr.double(), chain.mass, chain.gamma)
        k = cld_math.kernel(b, chain.mass, chain.gamma)
        l_xx, l_xv, l_vv = (t[:, None].float() for t in cld_math.cholesky(k))
        x, v = u.chunk(2, dim=1)
        eps_x = (x - k.mean_x[:, None].float() * x0) / l_xx
        eps_v = (v - k.mean_v[:, None].float() * x0 - l_xv * eps_x) / l_vv
        return torch.cat([eps_x, eps_v - v * (l_vv / k.vv[:, None].float()) if mixed else eps_v], 1)

    original = pipeline.model.forward
    pipeline.model.forward = knowing
    perfect = pipeline.per_example_losses(3, 64)
    pipeline.model.forward = lambda u, logsnr, cond: torch.zeros_like(u)
    blind = pipeline.per_example_losses(3, 64)
    pipeline.model.forward = original
    assert perfect.abs().max().item() < 1e-6, perfect
    if not mixed:
        assert abs(blind.mean().item() - 1.0) <= Z * math.sqrt(2 / 128), blind.mean()


# ======================================================================================
# product
# ======================================================================================


def _two_speed_product() -> Product:
    """Two 2-D parts: one on the cosine schedule, one shifted 4x noisier (2 log 4 lower logSNR)."""
    return Product(
        parts=(
            Part(name="slow", channels=(0, 2), schedule=Cosine()),
            Part(name="fast", channels=(2, 4), schedule=Shifted(base=Cosine(), base_resolution=1.0, resolution=4.0)),
        )
    )


@pytest.mark.parametrize("logsnr", [-4.0, 0.0, 3.0])
def test_product_parts_have_their_own_sub_chain_marginals(logsnr):
    """Perturbing at the first part's lambda: part i's levels are lambda_i = schedule_i(t),
    t = schedule_0.t_from_logsnr(lambda) (checked against the schedules directly), and each
    part's sample moments match its own sub-chain: mean alpha_i x0, variance sigma_i^2, within
    Z standard errors (sigma_i / sqrt(n); sqrt((m4 - var^2) / n) for the variance)."""
    chain = _two_speed_product()
    t = Cosine().t_from_logsnr(torch.tensor([logsnr], dtype=torch.float64))
    lams = chain.part_logsnrs(torch.tensor([logsnr], dtype=torch.float64))
    assert lams[0].item() == logsnr
    assert abs(lams[1].item() - (Cosine().logsnr(t).item() - 2 * math.log(4.0))) < 1e-9
    n = 20000
    x0 = torch.tensor([[1.5, -0.5, 1.0, -1.0]], dtype=torch.float64).expand(n, 4)
    noise = rng.NoiseStream(1, torch.arange(n), (4,), stream=rng.STREAM_TRAIN_NOISE, dtype=torch.float64).normal(0)
    level = chain.level(logsnr)
    x_t = chain.perturb(x0, noise, torch.tensor(level.alpha), torch.tensor(level.sigma))
    for j, (part_level, x_j, x0_j) in enumerate(zip(chain.part_levels(level), chain.split_parts(x_t), chain.split_parts(x0))):
        alpha, sigma = VariancePreserving().alpha_sigma(lams[j])
        assert abs(part_level.alpha - alpha.item()) < 1e-12
        mean, var = x_j.mean(0), x_j.var(0)
        m4 = ((x_j - mean) ** 4).mean(0)
        assert ((mean - alpha * x0_j[0]).abs() <= Z * sigma / math.sqrt(n)).all(), (j, mean)
        assert ((var - sigma**2).abs() <= Z * ((m4 - var**2) / n).sqrt()).all(), (j, var)
    # the fast part really is noisier at every level
    slow, fast = chain.part_levels(level)
    assert fast.logsnr < slow.logsnr


def test_product_of_one_part_is_its_chain(registry, tmp_path):
    """A product with one part (vp, cosine) trains and samples exactly like the vp chain with
    the cosine schedule: the same per-example losses (x0 prediction, min-snr weighting, same
    seed, so the same initial network and noise) to float32 rounding, and product-ancestral
    draws the same samples as ddpm on the same grid and noise streams (float64 rounding)."""
    plain = {
        "data": {"name": "two-moons", "n": 2000},
        "chain": "vp",
        "schedule": "cosine",
        "noise": "gaussian",
        "denoiser": {"name": "mlp", "width": 16, "depth": 1},
        "parameterization": "x0",
        "weighting": "min-snr",
        "guidance": "none",
        "sampler": "ddpm",
    }
    single = dict(plain, chain={"name": "product", "parts": [{"name": "all", "channels": [0, 2]}]}, sampler="product-ancestral")
    a = fundiff.Pipeline(fundiff.load_recipe(plain, registry)).per_example_losses(7, 32)
    b = fundiff.Pipeline(fundiff.load_recipe(single, registry)).per_example_losses(7, 32)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a, b)

    chain, vp = Product(parts=(Part(name="all", channels=(0, None)),)), VariancePreserving()
    ids, m = torch.arange(64), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    levels_p, levels_v = noise_levels(Cosine(), chain, 20), noise_levels(Cosine(), vp, 20)
    start = Normal(0, ids, (3,), rng.STREAM_PRIOR).sample(0)
    denoise = lambda x, level: gaussian_posterior_mean(x, level, m, 0.3)
    out_p = ProductAncestral(steps=20).sample(denoise, start, levels_p, Normal(0, ids, (3,)))
    out_v = DDPM(steps=20).sample(denoise, start, levels_v, Normal(0, ids, (3,)))
    assert (out_p - out_v).abs().max().item() <= 1e3 * U * (1 + out_v.abs().max().item())


def test_product_ancestral_with_exact_parts_matches_its_exact_moments():
    """Two parts at different speeds (cosine, and cosine shifted 4x noisier), Gaussian data
    x0 ~ N(m, 0.3^2) in each, the exact x0 of each part at its own level (parts are
    independent, so the joint posterior mean is per part). Ancestral sampling is then linear
    and Gaussian, and its output moments follow from a scalar recursion per part along the
    part's own levels: x0_hat = m + k (x_t - alpha_t m) with k = alpha_t s^2 / (alpha_t^2 s^2 +
    sigma_t^2), x_s = c0 x0_hat + ct x_t + sqrt(var) z (VDM eq. 7), from the prior N(0, 1).
    The 4000 samples' means and stds must match it within Z standard errors (sqrt(v / n);
    sqrt(v / 2n) for the std). Walking a part on the wrong levels (e.g. the first part's)
    misses it: the fast part's std then differs by about 0.05, over 10 standard errors."""
    chain = _two_speed_product()
    n, sd = 4000, 0.3
    m = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)

    def denoise(x, level):
        parts = []
        for part_level, x_j, m_j in zip(chain.part_levels(level), chain.split_parts(x), chain.split_parts(m[None])):
            parts.append(gaussian_posterior_mean(x_j, part_level, m_j[0], sd))
        return torch.cat(parts, 1)

    ids, steps = torch.arange(n), 50
    levels = noise_levels(Cosine(), chain, steps)
    start = chain.initial_state(levels[0], Normal(2, ids, (4,), rng.STREAM_PRIOR))
    out = ProductAncestral(steps=steps).sample(denoise, start, levels, Normal(2, ids, (4,)))
    part_grids = list(zip(*(chain.part_levels(level) for level in levels)))
    for j, (grid, m_j, out_j) in enumerate(zip(part_grids, chain.split_parts(m[None]), chain.split_parts(out))):
        mean, var = torch.zeros_like(m_j[0]), 1.0
        for t, s in itertools.pairwise(grid):
            c0, ct, step_var = fundiff.noiselevel.posterior(s, t)
            k = t.alpha * sd**2 / (t.alpha**2 * sd**2 + t.sigma**2)
            mean = c0 * (m_j[0] + k * (mean - t.alpha * m_j[0])) + ct * mean
            var = (c0 * k + ct) ** 2 * var + step_var
        assert ((out_j.mean(0) - mean).abs() <= Z * math.sqrt(var / n)).all(), (j, out_j.mean(0), mean)
        assert ((out_j.std(0) - math.sqrt(var)).abs() <= Z * math.sqrt(var / (2 * n))).all(), (j, out_j.std(0), math.sqrt(var))


def test_product_parts_must_tile_the_state():
    """Part layouts are validated: gaps, overlaps, duplicate names and an open end before the
    last part are refused when built, a channel bound that is neither an integer nor null when
    the recipe loads (``int | None`` fields are type-checked), and a layout that does not
    cover the data's axis 1 when the state is formed, each with a message naming the fix.
    The Gaussian-chain SDE methods refuse too: each part has its own SDE in its own lambda."""
    with pytest.raises(ValueError, match="without gaps or overlaps"):
        Product(parts=(Part(name="a", channels=(0, 2)), Part(name="b", channels=(3, 4))))
    with pytest.raises(ValueError, match="unique"):
        Product(parts=(Part(name="a", channels=(0, 2)), Part(name="a", channels=(2, 4))))
    with pytest.raises(ValueError, match="only the last part"):
        Product(parts=(Part(name="a", channels=(0, None)), Part(name="b", channels=(2, 4))))
    with pytest.raises(RecipeError, match=r"channels\[1\]: must be int or null, got 'x'"):
        fundiff.load_recipe(
            os.path.join(RECIPES, "product-joint-label.yaml"),
            overrides={"chain.parts": [{"name": "a", "channels": [0, 2]}, {"name": "b", "channels": [2, "x"]}]},
        )
    with pytest.raises(FundiffError, match="one SDE per part"):
        _two_speed_product().reverse_sde(torch.zeros(2, 4), torch.zeros(2, 4), _two_speed_product().level(0.0))
    with pytest.raises(FundiffError, match="end the last part at 5"):
        Product(parts=(Part(name="a", channels=(0, 2)), Part(name="b", channels=(2, 4)))).state_spec(fundiff.DataSpec(shape=(5,)))


# ======================================================================================
# recipes: refusals and end-to-end runs
# ======================================================================================


def _refusal(registry, recipe_file: str, **overrides) -> str:
    with pytest.raises(RecipeError) as info:
        fundiff.load_recipe(os.path.join(RECIPES, recipe_file), registry, overrides=overrides)
    return str(info.value)


def test_incompatible_components_are_refused(registry):
    """Ordinary samplers need Gaussian marginals, which neither system provides (cld +
    dpm-solver, product + ddim); each system's sampler needs its chain (cld-sscs with vp); cld
    needs eps prediction and Gaussian noise without a corruption operator; product needs x0
    prediction and a part layout that tiles the data."""
    message = _refusal(registry, "cld.yaml", **{"sampler.name": "dpm-solver"})
    assert "requires 'gaussian-marginals'" in message and "chain/vp" in message
    message = _refusal(registry, "product-joint-label.yaml", **{"sampler.name": "ddim"})
    assert "requires 'gaussian-marginals'" in message
    message = _refusal(registry, "two-moons.yaml", **{"sampler.name": "cld-sscs"})
    assert "requires 'cld-state'" in message and "chain/cld" in message
    message = _refusal(registry, "cld.yaml", **{"parameterization.name": "v"})
    assert "use parameterization: eps" in message
    message = _refusal(registry, "cld.yaml", **{"noise.name": "gamma"})
    assert "requires 'gaussian-noise'" in message
    message = _refusal(registry, "product-joint-label.yaml", **{"parameterization.name": "eps"})
    assert "use parameterization: x0" in message
    message = _refusal(registry, "product-joint-label.yaml", **{"data.base": {"name": "gmm"}})
    assert "has 10 channels" in message and "end the last part at 10" in message


@pytest.mark.slow
def test_cld_recipe_learns_two_moons(registry, tmp_path):
    """recipes/cld.yaml shrunk to 600 steps of a 64-wide, 2-block MLP, sampled with 50 SSCS
    steps. Statistics against 2000 held-out points: the sliced Wasserstein-2 distance and the
    mean distance to the nearest data point, each under half a moment-matched Gaussian's
    (measured 0.25x and 0.36x; a chain or sampler error gives samples near the prior)."""
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "cld.yaml"), registry).to_dict()
    recipe["denoiser"].update(width=64, depth=2)
    recipe["train"].update(steps=600, batch_size=256, lr=3e-3, ema=0.99)
    pipeline = fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)
    n = 2000
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=n, seed=3, overrides={"sampler.steps": 50})
    assert samples.shape == (n, 2)
    data = pipeline.data.x.double()
    held = data[:n]
    gaussian = data[n : 2 * n].mean(0) + data[n : 2 * n].std(0) * torch.randn(
        n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert sliced_wasserstein(samples.double(), held) < 0.5 * sliced_wasserstein(gaussian, held)
    nearest = lambda points: torch.cdist(points, data[:8000]).min(1).values.mean().item()
    assert nearest(samples.double()) < 0.5 * nearest(gaussian)


@pytest.mark.slow
def test_product_joint_label_recipe_samples_points_with_their_labels(registry, tmp_path):
    """recipes/product-joint-label.yaml shrunk to 300 steps of a 64-wide MLP, 30 sampler steps.
    Statistic: the sampled label (argmax of the label part) agrees with the moon of the sampled
    point (the label of its nearest data point) for at least 95% of 2000 samples (measured
    99.8%; independent labels would agree half the time), both labels are drawn (each between
    40% and 60%), and the points beat a moment-matched Gaussian's sliced Wasserstein distance
    by 2x."""
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "product-joint-label.yaml"), registry).to_dict()
    recipe["denoiser"].update(width=64, depth=2)
    recipe["train"].update(steps=300, batch_size=256, lr=3e-3, ema=0.99)
    pipeline = fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)
    n = 2000
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=n, seed=3, overrides={"sampler.steps": 30})
    base = pipeline.data_set.base.load()
    points, labels = samples[:, :2].double(), samples[:, 2:].argmax(1)
    moon = base.labels[torch.cdist(points, base.x[:8000].double()).argmin(1)]
    assert (labels == moon).double().mean().item() >= 0.95
    assert 0.4 <= labels.double().mean().item() <= 0.6
    held = base.x[:n].double()
    gaussian = held.mean(0) + held.std(0) * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_wasserstein(points, held) < 0.5 * sliced_wasserstein(gaussian, held)
