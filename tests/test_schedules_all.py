"""Every registered noise schedule: the schedule contract and each design against its paper.

Contract (every schedule discovered from the registry, built with its defaults): logSNR
strictly decreasing on [t_min, 1], float64; VP marginals in range and alpha^2 + sigma^2 = 1;
a discrete schedule's continuous map on its alphas_cumprod grid; t_from_logsnr inverting
logsnr. Zero terminal SNR (lambda(1) = -inf) is allowed at t = 1 only, which
``fundiff.testing.check_schedule`` does not accept yet, so it is checked here directly.

Tolerances are derived as in ``fundiff.testing``: U is float64's epsilon, R = 64 roundings;
an error in lambda of R U (1 + |lambda|) moves t by that over the local slope |lambda'(t)|,
which is taken from autograd (exact for these formulas) rather than finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fundiff
from fundiff import DiscreteSchedule
from fundiff.testing import check_schedule

U = float(torch.finfo(torch.float64).eps)
R = 64

_REGISTRY = fundiff.Registry.discover()
SCHEDULES = _REGISTRY.names("schedule")
# schedules of this module with finite logSNR everywhere (usable as bases of wrappers)
FINITE_BASES = ["linear", "cosine", "scaled-linear", "simple-linear", "sigmoid", "exponential", "vp-continuous", "edm", "laplace"]


def _grid(schedule, n: int = 1001) -> torch.Tensor:
    return torch.linspace(float(schedule.t_min), 1.0, n, dtype=torch.float64)


def _logsnr_and_slope(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda(t) and |d lambda / dt|: by autograd (float64, exact for closed-form maps) where
    it is finite; elsewhere (a schedule that does not propagate gradients, or an end point
    where a branch's derivative is infinite) the smaller of the two one-sided difference
    quotients with step 1e-7 (relative error ~ U |lambda| / 1e-7 < 1e-7)."""
    leaf = t.clone().requires_grad_(True)
    with torch.enable_grad():
        lam = schedule.logsnr(leaf)
    lam_plain = lam.detach()
    finite = torch.isfinite(lam_plain)
    h = 1e-7
    lo, hi = schedule.t_min, 1.0
    t_right, t_left = (t + h).clamp(max=hi), (t - h).clamp(min=lo)
    right = (lam_plain - schedule.logsnr(t_right)) / (t_right - t)
    left = (schedule.logsnr(t_left) - lam_plain) / (t - t_left)
    right = torch.where(t + h > hi, left, right)
    left = torch.where(t - h < lo, right, left)
    slope = torch.minimum(left.abs(), right.abs())
    if lam.requires_grad:
        (grad,) = torch.autograd.grad(lam[finite].sum(), leaf)
        slope = torch.where(torch.isfinite(grad), grad.abs(), slope)
    return lam_plain, slope


# --------------------------------------------------------------------------------------
# The contract, for every registered schedule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_logsnr_strictly_decreasing(registry, name):
    """lambda(t) is float64 and strictly decreasing on [t_min, 1]; finite except possibly
    lambda(1) = -inf (zero terminal SNR); never NaN, also below t_min."""
    schedule = registry.build("schedule", name)
    t = _grid(schedule, 2001)
    lam = schedule.logsnr(t)
    assert lam.dtype == torch.float64 and lam.shape == t.shape
    assert torch.isfinite(lam[:-1]).all(), f"{name}: non-finite logSNR before t = 1"
    assert lam[-1] < math.inf and not math.isnan(lam[-1].item())
    steps = lam[1:] - lam[:-1]
    assert (lam[1:] < lam[:-1]).all(), f"{name}: not strictly decreasing, first at t = {t[int(torch.nonzero(steps >= 0)[0])].item()}"
    below = schedule.logsnr(torch.linspace(0.0, float(schedule.t_min), 11, dtype=torch.float64))
    assert not torch.isnan(below).any()


@pytest.mark.parametrize("name", SCHEDULES)
def test_vp_marginals_in_range(registry, name):
    """Under the VP chain alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda): both in
    [0, 1] and alpha^2 + sigma^2 = 1 within R U, at every level including lambda = -inf."""
    schedule = registry.build("schedule", name)
    chain = registry.build("chain", "vp")
    alpha, sigma = chain.alpha_sigma(schedule.logsnr(_grid(schedule)))
    assert ((alpha >= 0) & (alpha <= 1) & (sigma >= 0) & (sigma <= 1)).all()
    assert ((alpha**2 + sigma**2 - 1).abs() <= R * U).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_t_from_logsnr_round_trips(registry, name):
    """t(lambda(t)) = t within R U (1 + |lambda|) / |lambda'(t)| + R U, and lambda(t(lambda)) =
    lambda within R U (2 + 2 |lambda| + |lambda'|): the rounding of lambda carried through the
    inverse's slope. At lambda = -inf (zero terminal SNR) the inverse is exactly 1."""
    schedule = registry.build("schedule", name)
    t = _grid(schedule)
    lam, slope = _logsnr_and_slope(schedule, t)
    finite = torch.isfinite(lam)
    t_back = schedule.t_from_logsnr(lam)
    tol_t = R * U * (1 + lam[finite].abs()) / slope[finite] + R * U
    err = (t_back[finite] - t[finite]).abs()
    assert (err <= tol_t).all(), f"{name}: worst t error {(err - tol_t).max().item():.3g} above tolerance"
    lam_back = schedule.logsnr(t_back[finite])
    tol_lam = R * U * (2 + 2 * lam[finite].abs() + slope[finite])
    assert ((lam_back - lam[finite]).abs() <= tol_lam).all()
    if not finite.all():
        assert t_back[~finite].eq(1.0).all()


@pytest.mark.parametrize("name", [n for n in SCHEDULES if isinstance(_REGISTRY.build("schedule", n), DiscreteSchedule)])
def test_discrete_grid_matches_continuous_map(registry, name):
    """A DiscreteSchedule's chain and its continuous map agree at the grid points:
    sigmoid(lambda(k / T)) = alphas_cumprod[k - 1] within R U (T + 1 + |lambda|) relative
    (T roundings of the running product, the rounding of lambda), alphas_cumprod is the
    running product of 1 - beta, betas lie in (0, 1] and only a zero-terminal-SNR schedule
    has beta_T = 1 (alpha_bar_T = 0)."""
    schedule = registry.build("schedule", name)
    steps = schedule.num_steps
    betas = schedule.betas()
    assert betas.dtype == torch.float64 and betas.shape == (steps,)
    assert ((betas > 0) & (betas < 1)).all() or (((betas[:-1] > 0) & (betas[:-1] < 1)).all() and betas[-1] == 1.0)
    ref = torch.cumprod(1.0 - betas, 0)
    ac = schedule.alphas_cumprod()
    tiny = torch.finfo(torch.float64).tiny
    assert ((ac - ref).abs() <= R * U * steps * ref + tiny).all()
    lam = schedule.logsnr(torch.arange(1, steps + 1, dtype=torch.float64) / steps)
    finite = torch.isfinite(lam)
    tol = R * U * (steps + 1 + lam[finite].abs()) * ref[finite] + tiny
    assert ((torch.sigmoid(lam[finite]) - ref[finite]).abs() <= tol).all()
    assert (ref[~finite] == 0).all() and (betas[-1] == 1.0) == (not finite.all())


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "zero-terminal-snr"])
def test_finite_schedules_pass_the_conformance_kit(registry, name):
    """Every schedule with finite logSNR on [t_min, 1] passes fundiff.testing.check_schedule."""
    check_schedule(registry.build("schedule", name), num_points=513)


# --------------------------------------------------------------------------------------
# Each design against its paper (independent float64 formulas, mostly numpy)
# --------------------------------------------------------------------------------------


def test_scaled_linear_matches_latent_diffusion(registry):
    """Latent diffusion's scaled-linear betas: linspace(sqrt(0.00085), sqrt(0.012), 1000)^2;
    alphas_cumprod is their running product of 1 - beta (T R U relative), and
    sqrt(alpha_bar_T) = 0.068265, the value Lin et al. 2024 (sec. 3.1) quote for Stable Diffusion."""
    schedule = registry.build("schedule", "scaled-linear")
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    ref = np.cumprod(1.0 - betas)
    assert np.allclose(schedule.betas().numpy(), betas, rtol=4 * U, atol=0)
    assert (np.abs(schedule.alphas_cumprod().numpy() - ref) <= 1000 * R * U * ref).all()
    assert abs(math.sqrt(schedule.alphas_cumprod()[-1].item()) - 0.068265) < 5e-7


def test_simple_linear_is_linear_in_alpha_bar(registry):
    """Chen 2023's simple linear schedule, gamma(t) = 1 - t squeezed into [c, 1 - c]:
    sigmoid(lambda(t)) = c + (1 - 2c)(1 - t) within R U, and the ends are
    lambda(0) = -lambda(1) = log((1 - c) / c)."""
    c = 1e-9
    schedule = registry.build("schedule", "simple-linear")
    t = np.linspace(0.0, 1.0, 1001)
    ab = torch.sigmoid(schedule.logsnr(torch.from_numpy(t))).numpy()
    assert (np.abs(ab - (c + (1 - 2 * c) * (1 - t))) <= R * U).all()
    end = math.log((1 - c) / c)
    assert abs(schedule.logsnr_at(0.0) - end) <= R * U * end and abs(schedule.logsnr_at(1.0) + end) <= R * U * end


@given(start=st.floats(-6.0, 2.0), length=st.floats(0.5, 8.0), tau=st.floats(0.2, 2.0), clip=st.sampled_from([1e-9, 1e-6, 1e-3]))
@example(start=-3.0, length=6.0, tau=1.0, clip=1e-9)
@example(start=0.0, length=3.0, tau=0.3, clip=1e-9)
@settings(max_examples=40)
def test_sigmoid_matches_chen(registry, start, length, tau, clip):
    """Chen 2023, Algorithm 1 (sigmoid_schedule): gamma(t) = (v_end - sigmoid(z(t))) /
    (v_end - v_start) with z(t) = (start + t (end - start)) / tau; the schedule's alpha_bar is
    c + (1 - 2c) gamma within R U (the numpy reference is accurate to a few U in absolute
    terms), and the schedule conforms for any parameters in this range."""
    end = start + length
    schedule = registry.build("schedule", "sigmoid", start=start, end=end, tau=tau, clip=clip)
    check_schedule(schedule, num_points=257)
    t = np.linspace(0.0, 1.0, 257)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    gamma = (sig(end / tau) - sig((t * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    ab = torch.sigmoid(schedule.logsnr(torch.from_numpy(t))).numpy()
    assert (np.abs(ab - (clip + (1 - 2 * clip) * gamma)) <= R * U / (sig(end / tau) - sig(start / tau))).all()


def _end_tol(sigma: float) -> float:
    """sigma recovered as exp(-lambda / 2) from lambda = -2 log sigma: log rounds to U |log sigma|
    absolute, which exp turns into that relative error, plus a few roundings."""
    return 4 * U * (1 + abs(math.log(sigma))) * sigma


@given(sigma_min=st.floats(1e-4, 1.0), ratio=st.floats(1.01, 1e5))
@example(sigma_min=0.01, ratio=5000.0)
@settings(max_examples=40)
def test_exponential_is_geometric(registry, sigma_min, ratio):
    """NCSN / VE-SDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t with lambda = -2 log sigma;
    the ends are exact (sigma(0) = sigma_min, sigma(1) = sigma_max within 4 U (1 + |log sigma|):
    exp(-lambda / 2) turns the rounding of log sigma into |log sigma| ulps) and interior
    values match the float64 power within R U relative."""
    sigma_max = sigma_min * ratio
    schedule = registry.build("schedule", "exponential", sigma_min=sigma_min, sigma_max=sigma_max)
    check_schedule(schedule, num_points=257)
    sigma = lambda t: math.exp(-0.5 * schedule.logsnr_at(t))  # noqa: E731
    assert abs(sigma(0.0) - sigma_min) <= _end_tol(sigma_min) and abs(sigma(1.0) - sigma_max) <= _end_tol(sigma_max)
    for t in (0.1, 0.37, 0.5, 0.9):
        ref = sigma_min * (sigma_max / sigma_min) ** t
        assert abs(sigma(t) - ref) <= R * U * (1 + abs(math.log(ref))) * ref


def test_exponential_defaults_are_the_ve_sde(registry):
    """The defaults are the VE-SDE's sigma_min = 0.01 and sigma_max = 50 exactly at the ends."""
    schedule = registry.build("schedule", "exponential")
    assert abs(math.exp(-0.5 * schedule.logsnr_at(0.0)) - 0.01) <= _end_tol(0.01)
    assert abs(math.exp(-0.5 * schedule.logsnr_at(1.0)) - 50.0) <= _end_tol(50.0)


@given(beta_min=st.floats(0.0, 1.0), extra=st.floats(0.01, 30.0))
@example(beta_min=0.1, extra=19.9)
@settings(max_examples=40)
def test_vp_continuous_matches_score_sde(registry, beta_min, extra):
    """Song et al. 2021, VPSDE.marginal_prob: log mean coefficient -t^2 (b1 - b0) / 4 - t b0 / 2
    and std sqrt(1 - exp(2 lmc)); lambda = log(mean^2 / std^2). The reference's 1 - exp(...)
    loses U / std^2 relative, which the tolerance carries; t_min is score_sde's 1e-3."""
    beta_max = beta_min + extra
    schedule = registry.build("schedule", "vp-continuous", beta_min=beta_min, beta_max=beta_max)
    assert schedule.t_min == 1e-3
    check_schedule(schedule, num_points=257)
    t = np.linspace(1e-3, 1.0, 257)
    lmc = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    var = 1.0 - np.exp(2.0 * lmc)
    ref = 2.0 * lmc - np.log(var)
    lam = schedule.logsnr(torch.from_numpy(t)).numpy()
    assert (np.abs(lam - ref) <= R * U * (1 + np.abs(ref) + 1.0 / var)).all()


@given(sigma_min=st.floats(1e-4, 0.1), ratio=st.floats(2.0, 1e5), rho=st.sampled_from([1.0, 3.0, 7.0]))
@example(sigma_min=0.002, ratio=40000.0, rho=1.0)
@example(sigma_min=0.002, ratio=40000.0, rho=7.0)
@settings(max_examples=40)
def test_edm_noise_levels(registry, sigma_min, ratio, rho):
    """Karras et al. 2022: sigma(t) = ((1 - t) sigma_min^(1/rho) + t sigma_max^(1/rho))^rho,
    linear in t for rho = 1 (sigma(t) = t rescaled) and eq. 5's discretisation for rho = 7;
    the ends are sigma_min and sigma_max within 4 U rho (1 + |log sigma|) (the root, the power
    and exp(-lambda / 2) each round log sigma once, scaled by rho)."""
    sigma_max = sigma_min * ratio
    schedule = registry.build("schedule", "edm", sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    check_schedule(schedule, num_points=257)
    sigma = lambda t: math.exp(-0.5 * schedule.logsnr_at(t))  # noqa: E731
    assert abs(sigma(0.0) - sigma_min) <= rho * _end_tol(sigma_min)
    assert abs(sigma(1.0) - sigma_max) <= rho * _end_tol(sigma_max)
    for i, t in enumerate((0.25, 0.5, 0.75)):
        ref = (sigma_max ** (1 / rho) + (1 - t) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        assert abs(sigma(t) - ref) <= R * U * rho * ref


def test_edm_defaults(registry):
    """EDM's defaults: sigma(0) = 0.002, sigma(1) = 80, sigma linear in t (sigma(1/2) = 40.001)."""
    schedule = registry.build("schedule", "edm")
    for t, ref in ((0.0, 0.002), (0.5, 40.001), (1.0, 80.0)):
        assert abs(math.exp(-0.5 * schedule.logsnr_at(t)) - ref) <= 2 * _end_tol(ref)


@given(mu=st.floats(-3.0, 3.0), b=st.floats(0.1, 2.0), low=st.floats(5.0, 25.0), high=st.floats(5.0, 25.0))
@example(mu=0.0, b=0.5, low=20.0, high=20.0)
@settings(max_examples=40)
def test_laplace_is_the_hang_quantile(registry, mu, b, low, high):
    """Hang et al. 2024: lambda(t) = mu - b sign(0.5 - t) log(1 - 2 |t - 0.5|), truncated to
    [logsnr_min, logsnr_max] with exact ends. For t uniform, lambda is then Laplace(mu, b)
    restricted to that range: t(lambda) = (S(lambda) - S(max)) / (S(min) - S(max)) with S the
    Laplace survival function, checked against the paper's untruncated formula mapped the same way."""
    lo, hi = mu - low, mu + high
    schedule = registry.build("schedule", "laplace", mu=mu, b=b, logsnr_min=lo, logsnr_max=hi)
    check_schedule(schedule, num_points=257)
    assert abs(schedule.logsnr_at(0.0) - hi) <= R * U * (1 + abs(hi)) and abs(schedule.logsnr_at(1.0) - lo) <= R * U * (1 + abs(lo))

    def survival(x: float) -> float:
        return 0.5 * math.exp(-(x - mu) / b) if x >= mu else 1.0 - 0.5 * math.exp((x - mu) / b)

    s_hi, s_lo = survival(hi), survival(lo)
    for t in (0.05, 0.3, 0.5, 0.7, 0.95):
        u = s_hi + t * (s_lo - s_hi)  # the paper's t for our t
        ref = mu - b * math.copysign(1.0, 0.5 - u) * math.log(1.0 - 2.0 * abs(u - 0.5))
        # the reference forms 1 - 2|u - 1/2| by cancellation: U / min(u, 1 - u) relative, times b
        assert abs(schedule.logsnr_at(t) - ref) <= R * U * (1 + abs(ref) + b / min(u, 1 - u))


def test_laplace_defaults_match_untruncated_paper_formula(registry):
    """With the defaults (mu = 0, b = 0.5, range +-20) the truncation moves t by ~2e-18, so
    lambda(t) equals the paper's formula at t itself, e.g. lambda(0.25) = 0.5 log 2."""
    schedule = registry.build("schedule", "laplace")
    for t in (0.01, 0.25, 0.5, 0.75, 0.99):
        ref = -0.5 * math.copysign(1.0, 0.5 - t) * math.log(1.0 - 2.0 * abs(t - 0.5))
        assert abs(schedule.logsnr_at(t) - ref) <= R * U * (1 + abs(ref)) / min(t, 1 - t)
    assert abs(schedule.logsnr_at(0.25) - 0.5 * math.log(2.0)) <= R * U


# --------------------------------------------------------------------------------------
# Wrappers: shifted and zero terminal SNR
# --------------------------------------------------------------------------------------


@given(base=st.sampled_from(FINITE_BASES), base_resolution=st.sampled_from([32.0, 64.0, 128.0]), resolution=st.sampled_from([16.0, 64.0, 256.0, 512.0]))
@example(base="cosine", base_resolution=64.0, resolution=256.0)
@settings(max_examples=40)
def test_shifted_adds_twice_the_log_resolution_ratio(registry, base, base_resolution, resolution):
    """Simple diffusion (Hoogeboom et al. 2023, sec. 3.1): lambda_shifted(t) = lambda_base(t) +
    2 log(base_resolution / resolution) at every t (R U (1 + |lambda|)); a discrete base gives
    a discrete shifted schedule whose alphas_cumprod is sigmoid(lambda_base(k/T) + shift)."""
    schedule = registry.build("schedule", "shifted", base={"name": base}, base_resolution=base_resolution, resolution=resolution)
    inner = registry.build("schedule", base)
    shift = 2.0 * math.log(base_resolution / resolution)
    assert schedule.t_min == inner.t_min
    assert isinstance(schedule, DiscreteSchedule) == isinstance(inner, DiscreteSchedule)
    t = _grid(inner, 257)
    lam, lam_base = schedule.logsnr(t), inner.logsnr(t)
    assert ((lam - lam_base - shift).abs() <= R * U * (1 + lam.abs())).all()
    check_schedule(schedule, num_points=257)
    if isinstance(inner, DiscreteSchedule):
        grid_t = torch.arange(1, inner.num_steps + 1, dtype=torch.float64) / inner.num_steps
        ref = torch.sigmoid(inner.logsnr(grid_t) + shift)
        assert ((schedule.alphas_cumprod() - ref).abs() <= R * U * (inner.num_steps + 1 + lam.abs().max()) * ref).all()


def test_shifted_defaults(registry):
    """Default: the cosine schedule carried from 64 to 256 pixels, a shift of 2 log(1/4) =
    -2.77 (Hoogeboom et al.'s shifted cosine), still a 1000-step discrete schedule."""
    schedule = registry.build("schedule", "shifted")
    cosine = registry.build("schedule", "cosine")
    assert isinstance(schedule, DiscreteSchedule) and schedule.num_steps == 1000
    assert schedule.logsnr_at(0.5) - cosine.logsnr_at(0.5) == pytest.approx(-4 * math.log(2.0), abs=R * U * 10)


def lin_algorithm_1(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1 (enforce zero terminal SNR), in numpy float64: rescale
    sqrt(alpha_bar) so the last is 0 and the first unchanged; returns the new alpha_bar."""
    s = np.sqrt(alphas_cumprod)
    s0, s_last = s[0].copy(), s[-1].copy()
    s = (s - s_last) * s0 / (s0 - s_last)
    return s**2


@pytest.mark.parametrize("base", ["scaled-linear", "linear", "cosine"])
def test_zero_terminal_snr_is_lin_algorithm_1(registry, base):
    """On a discrete base the rescaled alphas_cumprod equal Lin et al.'s Algorithm 1 applied to
    the base's alphas_cumprod (relative R U T, absolute R U: the reference subtracts square
    roots); beta_T = 1; lambda(1) = -inf; lambda(1/T) equals the base's bit for bit; and
    t_from_logsnr(-inf) = 1."""
    schedule = registry.build("schedule", "zero-terminal-snr", base={"name": base})
    inner = registry.build("schedule", base)
    assert isinstance(schedule, DiscreteSchedule) and schedule.num_steps == inner.num_steps
    steps = inner.num_steps
    ref = lin_algorithm_1(inner.alphas_cumprod().numpy())
    ac = schedule.alphas_cumprod().numpy()
    assert (np.abs(ac - ref) <= R * U * steps * ref + R * U).all()
    assert ac[-1] == 0.0 and schedule.betas()[-1].item() == 1.0
    assert schedule.logsnr_at(1.0) == -math.inf
    assert schedule.logsnr_at(1.0 / steps) == inner.logsnr_at(1.0 / steps)
    assert schedule.logsnr_at(0.5 / steps) == inner.logsnr_at(0.5 / steps)  # below t_min: the base
    assert schedule.t_from_logsnr(torch.tensor(-math.inf, dtype=torch.float64)).item() == 1.0


@pytest.mark.parametrize("base", ["vp-continuous", "laplace", "sigmoid", "edm"])
def test_zero_terminal_snr_on_continuous_bases(registry, base):
    """On a continuous base: sqrt(alpha_bar') = s_m (s - s_1) / (s_m - s_1) with s = sqrt(sigmoid(
    lambda_base)) (within R U), lambda'(1) = -inf, lambda'(t_min) = lambda_base(t_min) exactly,
    strictly decreasing on [0, 1], and it stays a continuous schedule."""
    schedule = registry.build("schedule", "zero-terminal-snr", base={"name": base})
    inner = registry.build("schedule", base)
    assert not isinstance(schedule, DiscreteSchedule)
    t = _grid(inner, 1001)
    s = torch.sigmoid(inner.logsnr(t)).sqrt()
    ref = s[0] * (s - s[-1]) / (s[0] - s[-1])
    got = torch.sigmoid(schedule.logsnr(t)).sqrt()
    assert ((got - ref).abs() <= R * U).all()
    assert schedule.logsnr_at(1.0) == -math.inf and schedule.logsnr_at(inner.t_min) == inner.logsnr_at(inner.t_min)
    whole = schedule.logsnr(torch.linspace(0.0, 1.0, 1001, dtype=torch.float64))
    assert (whole[1:] < whole[:-1]).all()


# --------------------------------------------------------------------------------------
# Recipes, parameter checks, the MLP and samplers at alpha = 0
# --------------------------------------------------------------------------------------


def _oracle_recipe(schedule, parameterization: str) -> dict:
    return {
        "data": {"name": "gmm", "modes": 8, "radius": 2.0, "std": 0.15},
        "chain": "vp",
        "schedule": schedule,
        "noise": "gaussian",
        "denoiser": "gmm-oracle",
        "parameterization": parameterization,
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": 20},
    }


def test_zero_terminal_snr_refuses_eps_and_accepts_v(registry):
    """eps-prediction's x0 = (x_t - sigma eps) / alpha divides by alpha = 0 at t = 1, so a
    zero-terminal-snr recipe with eps is refused at load time with that reason and the fix
    (parameterization v); with v or x0 it loads, and eps with an ordinary schedule still loads."""
    with pytest.raises(fundiff.RecipeError) as info:
        fundiff.load_recipe(_oracle_recipe("zero-terminal-snr", "eps"), registry)
    message = str(info.value)
    assert "parameterization" in message and "alpha = 0" in message and "divides" in message and "v" in message
    for ok in ("v", "x0"):
        recipe = fundiff.load_recipe(_oracle_recipe({"name": "zero-terminal-snr", "base": {"name": "cosine"}}, ok), registry)
        assert recipe["schedule"].logsnr_at(1.0) == -math.inf
    fundiff.load_recipe(_oracle_recipe("scaled-linear", "eps"), registry)


def test_invalid_parameters_are_refused(registry):
    """Parameters outside their domain are refused with the parameter's path or the reason."""
    cases = [
        ("sigmoid", {"start": 1.0, "end": 1.0}, "end"),
        ("sigmoid", {"tau": 0.0}, "schedule.tau"),
        ("simple-linear", {"clip": 0.5}, "schedule.clip"),
        ("exponential", {"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max"),
        ("edm", {"sigma_min": 0.0}, "schedule.sigma_min"),
        ("vp-continuous", {"beta_min": 5.0, "beta_max": 1.0}, "beta_max"),
        ("laplace", {"mu": 30.0}, "logsnr_min < mu < logsnr_max"),
        ("scaled-linear", {"beta_start": 0.02, "beta_end": 0.01}, "beta_end"),
        ("shifted", {"resolution": 0.0}, "schedule.resolution"),
        ("shifted", {"base": {"name": "no-such-schedule"}}, "schedule.base.name"),
    ]
    for name, params, needle in cases:
        with pytest.raises(fundiff.RecipeError, match=needle.replace("(", r"\(")):
            registry.build("schedule", name, **params)


def test_mlp_embeds_infinite_levels_as_finite(registry):
    """The MLP's sinusoidal embedding clamps logSNR to +-50, so lambda = -inf (alpha = 0) and
    +inf embed as lambda = -50 and 50 instead of NaN (cos(inf) is NaN)."""
    from fundiff_plugins.denoisers.mlp import LOGSNR_CLAMP, sinusoidal_embedding

    lam = torch.tensor([-math.inf, math.inf, -LOGSNR_CLAMP, LOGSNR_CLAMP, 0.0])
    emb = sinusoidal_embedding(lam, 16, 1000.0)
    assert torch.isfinite(emb).all()
    assert torch.equal(emb[0], emb[2]) and torch.equal(emb[1], emb[3])


def test_zero_terminal_snr_trains_and_samples_with_the_mlp(registry):
    """zero-terminal-snr + v + mlp: eight optimizer steps give finite losses and gradients
    (training draws t up to 1, where lambda = -inf reaches the network), the first
    sampling level has alpha = 0 exactly (the prior is pure noise), and DDIM and DDPM both
    return finite samples from it."""
    recipe = {
        "data": {"name": "two-moons", "n": 2000},
        "chain": "vp",
        "schedule": {"name": "zero-terminal-snr", "base": {"name": "linear"}},
        "noise": "gaussian",
        "denoiser": {"name": "mlp", "width": 32, "depth": 1},
        "parameterization": "v",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": 10},
    }
    pipeline = fundiff.Pipeline(fundiff.load_recipe(recipe, registry))
    params = list(pipeline.model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for step in range(8):
        loss = pipeline.loss(step, 64)
        assert torch.isfinite(loss), step
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        optimizer.step()
    levels = pipeline.levels(10)
    assert levels[0].logsnr == -math.inf and levels[0].alpha == 0.0 and levels[0].sigma == 1.0
    for sampler in ("ddim", "ddpm"):
        samples, _ = pipeline.sample(64, seed=1, sampler=registry.build("sampler", sampler, steps=10))
        assert samples.shape == (64, 2) and torch.isfinite(samples).all(), sampler


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_start_at_alpha_zero_with_the_oracle(registry, sampler):
    """With the exact gmm-oracle denoiser (v-prediction), DDIM and DDPM started at alpha = 0
    (zero-terminal-snr on cosine, 20 steps) sample the 8-mode ring: every sample lies within
    6 std of a mode's centre radius (|r - 2| < 0.9) for all but 1 % of 2000 samples, and the
    modes are used evenly (each between 6 % and 19 %)."""
    recipe = fundiff.load_recipe(
        {**_oracle_recipe({"name": "zero-terminal-snr", "base": {"name": "cosine"}}, "v"), "sampler": {"name": sampler, "steps": 20}},
        registry,
    )
    pipeline = fundiff.Pipeline(recipe)
    samples, _ = pipeline.sample(2000, seed=0, batch_size=2000)
    assert torch.isfinite(samples).all()
    radius = samples.double().norm(dim=1)
    assert ((radius - 2.0).abs() < 0.9).double().mean() > 0.99
    angle = torch.atan2(samples[:, 1].double(), samples[:, 0].double())
    mode = torch.round(angle / (2 * math.pi / 8)).long() % 8
    share = torch.bincount(mode, minlength=8).double() / 2000
    assert (share > 0.06).all() and (share < 0.19).all(), share


def test_resolved_recipe_with_default_base_round_trips(registry):
    """A recipe that leaves `shifted`'s base at its default (cosine) resolves to a dict that
    loads again to the same schedule (run directories store the resolved recipe)."""
    recipe = fundiff.load_recipe(_oracle_recipe("shifted", "v"), registry)
    again = fundiff.load_recipe(recipe.to_dict(), registry)
    assert again["schedule"] == recipe["schedule"]


def test_resolved_recipe_with_explicit_base_round_trips(registry):
    """With the base written out, the resolved recipe names it and loads to the same schedule."""
    recipe = fundiff.load_recipe(_oracle_recipe({"name": "zero-terminal-snr", "base": {"name": "cosine", "offset": 0.01}}, "v"), registry)
    resolved = recipe.to_dict()
    assert resolved["schedule"]["base"]["name"] == "cosine"
    again = fundiff.load_recipe(resolved, registry)
    assert again["schedule"] == recipe["schedule"] and again["schedule"].base.offset == 0.01
