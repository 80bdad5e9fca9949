"""Probability-flow ODE samplers (euler, heun, dpm2, lms, plms, restart, ode) and the ODE
log-likelihood, against exact answers: the gmm-oracle (the exact denoiser of a Gaussian
mixture), closed-form Gaussian flows and a float64 reference ODE solution.

The problems are 2-D and small; torch runs them on one intra-op thread here (see the
``one_thread`` fixture), since on tensors this small extra threads only add waiting.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fundiff
from fundiff import Level, noiselevel, rng
from fundiff.pipeline import make_denoise
from fundiff.testing import ROUNDINGS, U, Z_SCORE, check_sampler, gaussian_posterior_mean
from fundiff_plugins.samplers._pfode import level_maker
from fundiff_plugins.samplers.ode import log_likelihood
from helpers import oracle_recipe, sliced_wasserstein

NAMES = ("euler", "heun", "dpm2", "lms", "plms", "restart", "ode")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def oracle(registry, parameterization="x0", **data):
    """(data set, chain, schedule, denoise) for the gmm-oracle on a VP chain."""
    data_set = registry.build("data", "gmm", **data)
    components = {
        "data": data_set,
        "chain": registry.build("chain", "vp"),
        "schedule": registry.build("schedule", "linear"),
        "parameterization": registry.build("parameterization", parameterization),
        "guidance": registry.build("guidance", "none"),
    }
    model = registry.build("denoiser", "gmm-oracle").build(fundiff.BuildContext(spec=data_set.spec(), components=components))
    denoise = make_denoise(model.eval(), components["parameterization"], components["guidance"])
    return data_set, components["chain"], components["schedule"], denoise


def vp_level(sigma_tilde: float) -> Level:
    lam = -2.0 * math.log(sigma_tilde)
    alpha, sigma = noiselevel.vp_alpha_sigma(lam)
    return Level(lam, alpha, sigma)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS over samples of the per-sample Euclidean error."""
    return float(((a - b) ** 2).flatten(1).sum(1).mean().sqrt())


# --------------------------------------------------------------------------------------
# Conformance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [(n, {}) for n in NAMES]
    + [("heun", {"s_churn": 20.0}), ("lms", {"order": 3, "warm_start": "rk4"}), ("plms", {"warm_start": "heun"}), ("ode", {"variable": "sigma"})],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={w}" for k, w in v.items()) or "defaults",
)
def test_conformance(registry, name, params):
    """fundiff.testing.check_sampler: shapes, dtype, reproducibility, per-sample noise and the
    Gaussian sanity band. ``ode`` controls its error over the whole batch (it declares
    ``couples_batch``), so a sample's result depends on its batch within the tolerance only:
    its per-sample check is off."""
    sampler = registry.build("sampler", name, **params)
    check_sampler(sampler, per_sample=not getattr(type(sampler), "couples_batch", False))


@pytest.mark.parametrize("name", NAMES)
def test_float32_in_float32_out(registry, name):
    """Every sampler keeps a float32 state float32 (host-float coefficients never upcast) and
    stays within float32 rounding of its float64 run: the oracle in x0 form, 16 steps of the
    linear schedule; the bound is 1e-3, about 1e4 float32 roundings of an O(2) state."""
    _, chain, schedule, denoise = oracle(registry)
    levels = fundiff.noise_levels(schedule, chain, 16)
    x = rng.NoiseStream(0, torch.arange(64), (2,), stream=rng.STREAM_PRIOR, dtype=torch.float64).normal(0)
    noise64 = rng.NoiseStream(0, torch.arange(64), (2,), dtype=torch.float64)
    noise32 = rng.NoiseStream(0, torch.arange(64), (2,), dtype=torch.float32)
    sampler = registry.build("sampler", name, steps=16)
    out64 = sampler.sample(denoise, x, levels, noise64)
    out32 = sampler.sample(denoise, x.float(), levels, noise32)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert (out32.double() - out64).abs().max() < 1e-3


# --------------------------------------------------------------------------------------
# Equivalences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_is_euler_in_sigma_tilde_space(registry, schedule):
    """DDIM with eta = 0 is Euler's method on dx~/ds~ = eps_hat (Song et al. 2021, eq. 13;
    Karras et al. 2022, sec. 3): with the gmm-oracle, the same prior and grid, the two
    samplers agree to float64 rounding. Each step rounds a few operations on values of size
    at most S = 1 + max|x|; a rounding made at step i reaches the output multiplied by at most
    A = max_i ||d out / d x_i||, measured by finite differences from every step. Tolerance:
    steps * R * U * S * A (R = fundiff.testing.ROUNDINGS)."""
    steps, n = 50, 500
    outs, states = {}, []
    for name in ("ddim", "euler"):
        p = fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(schedule=schedule, sampler={"name": name, "steps": steps}), registry))
        outs[name], _ = p.sample(n, seed=1, batch_size=n, dtype=torch.float64)
    levels = p.levels(steps)
    denoise = make_denoise(p.model, p.parameterization, p.guidance)
    euler = p.sampler
    x = p.chain.prior(levels[0], fundiff.NoiseStream(1, torch.arange(n), (2,), stream=rng.STREAM_PRIOR, dtype=torch.float64).normal(0))
    euler.sample(denoise, x, levels, callback=lambda i, x, x0: states.append(x))
    states = [x] + states[:-1]
    u = torch.nn.functional.normalize(rng.normal(0, 1000, 0, torch.arange(n), (2,)), dim=1)
    amplification = 1.0
    for i, xi in enumerate(states):
        delta = 1e-7 * (1.0 + float(xi.abs().max()))
        moved = euler.sample(denoise, xi + delta * u, levels[i:]) - euler.sample(denoise, xi, levels[i:])
        amplification = max(amplification, float(moved.norm(dim=1).max()) / delta)
    scale = 1.0 + max(float(s.abs().max()) for s in states)
    tol = steps * ROUNDINGS * U * scale * amplification
    assert float((outs["ddim"] - outs["euler"]).abs().max()) <= tol, tol


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 30),
    lam_start=st.floats(-12.0, 0.0),
    lam_end=st.floats(1.0, 12.0),
    family=st.sampled_from(["vp", "ve"]),
)
def test_ddim_is_euler_for_gaussian_data_on_any_grid(seed, steps, lam_start, lam_end, family):
    """The same equivalence (DDIM eta = 0 == Euler in s~, Song et al. 2021 eq. 13) for
    Gaussian data x0 ~ N(m, s^2 I) with the exact denoiser, on arbitrary grids (logSNR evenly
    spaced from lam_start to lam_end, then clean) of VP and VE chains. Here both maps are
    linear, and the amplification of a rounding made at step i is the product of the later
    steps' slopes c_x + c_d alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2), computed on the host.
    Tolerance: steps * R * U * (1 + max|x|) * max_i amplification_i."""
    pair = noiselevel.vp_alpha_sigma if family == "vp" else noiselevel.ve_alpha_sigma
    lams = [lam_start + (lam_end - lam_start) * i / max(steps - 1, 1) for i in range(steps)]
    levels = [Level(lam, *pair(lam)) for lam in lams] + [Level(math.inf, 1.0, 0.0)]
    m, s_data = torch.tensor([0.7, -1.2], dtype=torch.float64), 0.4

    def denoise(x, level):
        return gaussian_posterior_mean(x, level, m, s_data)

    registry_free = {"ddim": fundiff_ddim(), "euler": fundiff_euler()}
    first = levels[0]
    z = rng.normal(seed, rng.STREAM_PRIOR, 0, torch.arange(64), (2,))
    x = first.alpha * m + math.sqrt(first.alpha**2 * s_data**2 + first.sigma**2) * z
    a = registry_free["ddim"].sample(denoise, x, levels)
    b = registry_free["euler"].sample(denoise, x, levels)
    slopes = []
    for t, s in zip(levels[:-1], levels[1:]):
        ratio = (s.sigma / s.alpha) / (t.sigma / t.alpha)
        c_x, c_d = s.sigma / t.sigma, s.alpha * (1.0 - ratio)
        slopes.append(abs(c_x + c_d * t.alpha * s_data**2 / (t.alpha**2 * s_data**2 + t.sigma**2)))
    amplification, product = 1.0, 1.0
    for slope in reversed(slopes):
        product *= slope
        amplification = max(amplification, product)
    scale = 1.0 + max(float(x.abs().max()), float(a.abs().max()))
    assert float((a - b).abs().max()) <= len(slopes) * ROUNDINGS * U * scale * amplification


def fundiff_ddim():
    from fundiff_plugins.samplers.ddim import DDIM

    return DDIM(steps=1)


def fundiff_euler():
    from fundiff_plugins.samplers.euler import Euler

    return Euler(steps=1)


def test_lms4_with_rk4_start_is_plms_on_a_uniform_grid(registry):
    """On a grid evenly spaced in s~, the variable-step Adams-Bashforth weights of order 4
    are PNDM's fixed (55, -59, 37, -9) / 24 and both warm starts are RK4 in s~ (Liu et al.
    2022, eqs. 12-13), so lms(order 4, rk4) and plms(prk) are the same method: equal to
    rounding (Gauss-Legendre weights and the fixed fractions differ by a few U; 16 steps,
    outputs of size ~3; tolerance R * U * 16 * 3 * 10 for the amplification of the flow)."""
    _, _, _, denoise = oracle(registry, std=0.5)
    levels = [vp_level(2.0 + (0.2 - 2.0) * i / 16) for i in range(17)]
    x = 2.0 * rng.normal(0, rng.STREAM_PRIOR, 0, torch.arange(128), (2,))
    a = registry.build("sampler", "lms", order=4, warm_start="rk4").sample(denoise, x, levels)
    b = registry.build("sampler", "plms").sample(denoise, x, levels)
    assert float((a - b).abs().max()) <= ROUNDINGS * U * 16 * 3 * 10


# --------------------------------------------------------------------------------------
# Convergence orders against a float64 reference solution of the PF-ODE
# --------------------------------------------------------------------------------------

ORDER_STEPS = (16, 32, 64, 128)
ORDER_SLACK = 0.25


@pytest.fixture(scope="module")
def order_problem(registry):
    """A smooth mixture (8 modes on a ring of radius 2, std 0.5), VP chain, the PF-ODE from
    s~ = 2 to s~ = 0.2 on grids evenly spaced in s~ (where PNDM's fixed weights are exact),
    128 samples in float64. Reference: the ``ode`` sampler at rtol = atol = 1e-11."""
    _, _, _, denoise = oracle(registry, std=0.5)

    def levels(n):
        return [vp_level(2.0 + (0.2 - 2.0) * i / n) for i in range(n + 1)]

    x = 2.0 * rng.normal(0, rng.STREAM_PRIOR, 0, torch.arange(128), (2,))
    ref = registry.build("sampler", "ode", rtol=1e-11, atol=1e-11).sample(denoise, x, levels(1))
    return denoise, levels, x, ref


def test_reference_solution_is_converged(registry, order_problem):
    """The reference is checked against an independent solver: plms (fourth order, Liu et al.
    2022) with 1024 steps, whose own error is (16/1024)^4 times its error at 16 steps
    (~1e-3 measured), i.e. ~2e-11. Both must agree to 1e-8, more than ten times below the
    smallest error the order test measures (~2e-7), so the reference does not bend a slope."""
    denoise, levels, x, ref = order_problem
    fine = registry.build("sampler", "plms").sample(denoise, x, levels(1024))
    assert rms(fine, ref) < 1e-8


@pytest.mark.parametrize(
    "name, params, order",
    [
        ("euler", {}, 1),
        ("ddim", {}, 1),
        ("heun", {}, 2),
        ("dpm2", {}, 2),
        ("lms", {"order": 1}, 1),
        ("lms", {"order": 2}, 2),
        ("lms", {"order": 3, "warm_start": "rk4"}, 3),
        ("lms", {"order": 4, "warm_start": "rk4"}, 4),
        ("plms", {}, 4),
        ("plms", {"warm_start": "heun"}, 4),
    ],
    ids=lambda v: v if isinstance(v, str) else (",".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else str(v)),
)
def test_convergence_order(registry, order_problem, name, params, order):
    """Global error ~ C h^p: the least-squares slope of log RMS error against log(steps) over
    16, 32, 64, 128 steps must be the method's order p within 0.25. Orders: Euler (and DDIM)
    1; Heun 2 (Karras et al. 2022, Alg. 1-2); DPM-2 2 (midpoint rule); LMS of order k = k
    (variable-step Adams-Bashforth; its lower-order start caps it at 2, so k >= 3 uses the
    RK4 start); PLMS 4 on this evenly spaced grid (Liu et al. 2022, sec. 3.3). The slack
    covers the pre-asymptotic term C' h^(p+1) (measured slopes between successive step
    counts move by < 0.2 over this range) while still telling p from p +- 1."""
    denoise, levels, x, ref = order_problem
    sampler = registry.build("sampler", name, **params)
    errors = [rms(sampler.sample(denoise, x, levels(n)), ref) for n in ORDER_STEPS]
    logs_n = torch.log(torch.tensor(ORDER_STEPS, dtype=torch.float64))
    logs_e = torch.log(torch.tensor(errors, dtype=torch.float64))
    slope = -float(((logs_n - logs_n.mean()) * (logs_e - logs_e.mean())).sum() / ((logs_n - logs_n.mean()) ** 2).sum())
    assert abs(slope - order) <= ORDER_SLACK, (slope, errors)


# --------------------------------------------------------------------------------------
# The adaptive solver
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["lambda", "sigma"])
@pytest.mark.parametrize("chain", ["vp", "ve"])
def test_ode_meets_its_tolerance_on_the_closed_form_gaussian_flow(registry, variable, chain):
    """For Gaussian data N(m, s^2 I) the PF-ODE is solved in closed form: x~ - m scales by
    sqrt((s^2 + s~^2) / (s^2 + s~_0^2)) (the flow of x~ = x0 + s~ eps between Gaussian
    marginals). From logSNR -8 to 8 the adaptive solver at rtol = atol = 1e-8 must land
    within 100 rtol of it, relative to the state (the local error control does not bound
    the global error; 100 covers its accumulation over ~100 steps); float32 input with
    float64 = true stays float32 and matches to float32 rounding."""
    chain = registry.build("chain", chain)
    m, s_data = torch.tensor([0.7, -1.2], dtype=torch.float64), 0.4
    first, last = chain.level(-8.0), chain.level(8.0)
    z = rng.normal(3, rng.STREAM_PRIOR, 0, torch.arange(200), (2,))
    x = first.alpha * m + math.sqrt(first.alpha**2 * s_data**2 + first.sigma**2) * z
    s0, s1 = first.sigma / first.alpha, last.sigma / last.alpha
    exact = last.alpha * (m + (x / first.alpha - m) * math.sqrt((s_data**2 + s1**2) / (s_data**2 + s0**2)))

    def denoise(x, level):
        return gaussian_posterior_mean(x, level, m, s_data)

    ode = registry.build("sampler", "ode", rtol=1e-8, atol=1e-8, variable=variable)
    out = ode.sample(denoise, x, [first, last])
    assert float(((out - exact).abs() / (1.0 + exact.abs())).max()) <= 100 * 1e-8
    out32 = attrs.evolve(ode, float64=True).sample(denoise, x.float(), [first, last])
    assert out32.dtype == torch.float32
    assert float(((out32.double() - exact).abs() / (1.0 + exact.abs())).max()) <= 100 * 1e-8 + 8 * 2**-24


def test_level_maker_extends_vp_and_ve_grids_exactly():
    """Off-grid levels come from the grid's chain: VP (alpha^2 + sigma^2 = 1) and VE (alpha =
    1) grids are recognised and extended with the core math; another chain is interpolated
    with lambda kept exact and the grid's own levels reproduced."""
    vp = [Level(lam, *noiselevel.vp_alpha_sigma(lam)) for lam in (-5.0, 0.0, 5.0)]
    ve = [Level(lam, *noiselevel.ve_alpha_sigma(lam)) for lam in (-5.0, 0.0, 5.0)]
    assert level_maker(vp)(1.3) == Level(1.3, *noiselevel.vp_alpha_sigma(1.3))
    assert level_maker(ve)(1.3) == Level(1.3, *noiselevel.ve_alpha_sigma(1.3))
    odd = [Level(lam, 2.0 * a, 2.0 * s) for lam, (a, s) in ((lam, noiselevel.vp_alpha_sigma(lam)) for lam in (-5.0, 0.0, 5.0))]
    make = level_maker(odd)
    for level in odd:
        again = make(level.logsnr)
        assert abs(again.alpha - level.alpha) <= 4 * U * level.alpha and abs(again.sigma - level.sigma) <= 4 * U * level.sigma
    mid = make(2.5)
    assert abs(noiselevel.logsnr_from_alpha_sigma(mid.alpha, mid.sigma) - 2.5) <= 8 * U * 2.5


# --------------------------------------------------------------------------------------
# Stochastic samplers reproduce the mixture
# --------------------------------------------------------------------------------------

N_MIX = 2000


@pytest.mark.parametrize(
    "sampler",
    [{"name": "restart", "steps": 18}, {"name": "heun", "steps": 25, "s_churn": 10.0}, {"name": "ode", "steps": 1}],
    ids=["restart", "heun-churn", "ode"],
)
def test_samplers_reproduce_the_mixture(registry, sampler):
    """Samples from the exact denoiser match exact mixture samples (as in
    test_sampling_oracle.py): sliced Wasserstein-2 distance to N exact samples below 1.5 times
    the distance between two independent exact draws (the finite-sample floor), and every mode
    populated in proportion (nearest-mode frequencies within Z_SCORE standard errors).
    Restart (Xu et al. 2023) and Heun with churn (Karras et al. 2022, Alg. 2) add fresh noise;
    the adaptive ODE solver is the deterministic control."""
    p = fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(sampler=sampler), registry))
    samples, _ = p.sample(N_MIX, seed=1, batch_size=N_MIX, dtype=torch.float64)
    exact_a, _ = p.data_set.draw(N_MIX, seed=101)
    exact_b, _ = p.data_set.draw(N_MIX, seed=202)
    bound = 1.5 * sliced_wasserstein(exact_a, exact_b)
    assert sliced_wasserstein(samples, exact_a) < bound
    _, means, _ = p.data_set.mixture()
    freq = torch.bincount(torch.cdist(samples, means).argmin(1), minlength=8).double() / N_MIX
    assert (freq - 1 / 8).abs().max() < Z_SCORE * math.sqrt((1 / 8) * (7 / 8) / N_MIX), freq


def test_churn_and_restart_use_their_noise(registry):
    """Heun with churn and Restart are stochastic: other fresh noise, other samples; Heun
    without churn ignores the noise stream (EDM Alg. 2 with S_churn = 0 is Alg. 1)."""
    _, chain, schedule, denoise = oracle(registry)
    levels = fundiff.noise_levels(schedule, chain, 10)
    x = rng.normal(0, rng.STREAM_PRIOR, 0, torch.arange(32), (2,))
    ids = torch.arange(32)
    for name, params, stochastic in (("heun", {"s_churn": 10.0}, True), ("restart", {}, True), ("heun", {}, False)):
        sampler = registry.build("sampler", name, **params)
        a = sampler.sample(denoise, x, levels, rng.NoiseStream(1, ids, (2,), dtype=torch.float64))
        b = sampler.sample(denoise, x, levels, rng.NoiseStream(2, ids, (2,), dtype=torch.float64))
        assert torch.equal(a, b) != stochastic, name


# --------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------

LL_LOGSNR = 30.0  # the ODE runs from logSNR +30 (data) to -30 (prior)


def exact_mixture_log_density(data_set, x):
    weights, means, stds = data_set.mixture()
    dim = x.shape[1]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    log_n = -0.5 * sq / stds**2 - dim * torch.log(stds) - 0.5 * dim * math.log(2 * math.pi)
    return torch.logsumexp(weights.log() + log_n, dim=1)


def test_ode_likelihood_matches_the_mixture_density(registry):
    """The PF-ODE model density equals the data density when the prior equals the terminal
    marginal (Song et al. 2021, sec. 4.3 and app. D.2). With the exact denoiser of the ring
    mixture (8 modes, radius r = 2, std 0.15) and the exact trace, from logSNR +30 to -30:

    * prior mismatch: the VP marginal at lambda = -30 is the mixture of N(a mu_k, 1 - a^2 (1 -
      s^2)) with a^2 = sigmoid(-30) = 9.4e-14; its log-density differs from N(0, I)'s by at
      most a^2 ((|x| r)^2 / 2 + |x|^2 + r^2 + dim) (the term linear in a cancels: the ring's
      mean is 0) < 3e-11 for |x| <= 8 (a 2-D normal exceeds 8 with probability e^-32);
    * data end: starting x~ = x0 at s~ = e^-15 ignores O(dim s~^2 / s^2) = 4e-12 nats;
    * the solver: its error at rtol = 1e-10 is bounded by the difference from the rtol = 1e-8
      solution (the error scales with rtol, so that difference exceeds it ~100-fold).

    So every point's log-density must agree within 3e-11 + 4e-12 + that difference, and the
    mean over 200 points within 1e-6 nats."""
    data_set, chain, schedule, denoise = oracle(registry)
    x, _ = data_set.draw(200, seed=5)
    exact = exact_mixture_log_density(data_set, x)
    kwargs = dict(exact_trace=True, data_logsnr=LL_LOGSNR, terminal_logsnr=-LL_LOGSNR)
    fine = log_likelihood(denoise, x, schedule, chain, rtol=1e-10, atol=1e-10, **kwargs)
    coarse = log_likelihood(denoise, x, schedule, chain, rtol=1e-8, atol=1e-8, **kwargs)
    bound = 3e-11 + 4e-12 + (fine - coarse).abs()
    assert ((fine - exact).abs() <= bound).all(), float((fine - exact).abs().max())
    assert abs(float(fine.mean() - exact.mean())) <= 1e-6


def test_hutchinson_likelihood_is_unbiased(registry):
    """Hutchinson's estimator v^T J v with Rademacher v is unbiased for tr J (Grathwohl et al.
    2019, FFJORD, sec. 3), so over 200 points the mean of (Hutchinson - exact-trace)
    log-likelihoods is 0 within Z_SCORE standard errors (estimated from the same 200
    differences) plus the two solves' tolerance (rtol 1e-6: < 1e-3 nats, measured ~1e-4).
    Probes are per-sample Philox draws: the same points in another batch get the same
    estimate up to the solver tolerance."""
    data_set, chain, schedule, denoise = oracle(registry)
    x, _ = data_set.draw(200, seed=7)
    kwargs = dict(data_logsnr=LL_LOGSNR, terminal_logsnr=-LL_LOGSNR, rtol=1e-6, atol=1e-6)
    exact = log_likelihood(denoise, x, schedule, chain, exact_trace=True, **kwargs)
    hutch = log_likelihood(denoise, x, schedule, chain, probes=2, seed=3, **kwargs)
    diff = hutch - exact
    assert float(diff.std()) > 0
    assert abs(float(diff.mean())) <= Z_SCORE * float(diff.std()) / math.sqrt(200) + 1e-3
    part = log_likelihood(denoise, x[50:60], schedule, chain, probes=2, seed=3, sample_ids=torch.arange(50, 60), **kwargs)
    assert (part - hutch[50:60]).abs().max() <= 1e-3


def test_cli_likelihood(registry, tmp_path, capsys):
    """``fundiff likelihood RUN_DIR`` prints the mean log-likelihood and bits per dimension of
    held-out points (the data set regenerated with the next seed); with the exact trace the
    oracle run's mean is the mixture's mean log-density up to the schedule's own truncation
    (linear schedule: lambda from 9.2 to -10.1, a few hundredths of a nat)."""
    from fundiff.cli import main

    run = tmp_path / "run"
    fundiff.train(oracle_recipe(), run, quiet=True, registry=registry)
    assert main(["likelihood", str(run), "-n", "100", "--exact-trace", "--rtol", "1e-6"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("log-likelihood:") and "held-out" in lines[0]
    nats = float(lines[0].split()[1])
    bpd = float(lines[1].split()[-1])
    assert abs(bpd + nats / (2 * math.log(2))) < 1e-3
    data_set = registry.build("data", "gmm", seed=1, n=100)
    expected = float(exact_mixture_log_density(data_set, data_set.load().x.double()).mean())
    assert abs(nats - expected) < 0.1
