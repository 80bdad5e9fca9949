"""The manifold chains ``torus`` and ``sphere``, the ``geodesic-random-walk`` sampler and their
toy data (survey sec. 3.2; Jing et al. 2022, torsional diffusion; De Bortoli et al. 2022,
Riemannian score-based generative modelling).

Distances between point clouds are kernel MMD^2 (the biased V-statistic, Gretton et al.
2012, eq. 5) with a kernel of the manifold: exp(2 sum_i (cos(a_i - b_i) - 1)) on the torus
(a product of von Mises kernels) and exp(5 (<a, b> - 1)) on the sphere. Two independent
draws of 1000 data points are about 0.0015 (torus mixture) and 0.0011 (sphere mixture)
apart; the uniform prior is 0.10 and 0.076 from the data.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from helpers import RECIPES
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fundiff
from fundiff import Sampler, rng
from fundiff.testing import ROUNDINGS, U, check_sampler
from fundiff_plugins.chains.sphere import SWITCH_TIME, heat_kernel_g, walk_mean_cosine
from fundiff_plugins.chains.torus import (
    FOURIER_TERMS,
    SWITCH_SIGMA,
    WINDINGS,
    fourier_error_bound,
    winding_error_bound,
    wrap,
    wrapped_normal_score,
)
from fundiff_plugins.data.sphere_mixture import fibonacci_directions

TWO_PI = 2.0 * math.pi


def mmd(a: torch.Tensor, b: torch.Tensor, manifold: str) -> float:
    """Biased MMD^2 with the manifold's kernel (module docstring), float64."""
    a, b = a.double(), b.double()

    def kernel(x, y):
        if manifold == "torus":
            return torch.exp(2.0 * (torch.cos(x[:, None, :] - y[None, :, :]) - 1.0).sum(-1))
        return torch.exp(5.0 * (x @ y.T - 1.0))

    return float(kernel(a, a).mean() + kernel(b, b).mean() - 2.0 * kernel(a, b).mean())


# --------------------------------------------------------------------------------------
# torus: the wrapped normal's score
# --------------------------------------------------------------------------------------


def reference_windings(d: torch.Tensor, sigma: float, k_max: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_sigma(d) of the wrapped normal with |k| <= 60 windings (the left-out mass is below
    exp(-(119 pi)^2 / (2 sigma^2)), nothing in float64 for sigma <= 20), and the windings'
    posterior weights with their offsets y = d + 2 pi k."""
    k = torch.arange(-k_max, k_max + 1, dtype=torch.float64)
    y = d[..., None] + TWO_PI * k
    log_q = -(y * y) / (2.0 * sigma * sigma)
    log_p = torch.logsumexp(log_q, -1) - 0.5 * math.log(TWO_PI * sigma * sigma)
    return log_p, (torch.softmax(log_q, -1), y)


@settings(max_examples=60)
@given(d=st.floats(-math.pi, math.pi, exclude_max=True), log_sigma=st.floats(math.log(0.01), math.log(20.0)))
@example(d=-math.pi, log_sigma=math.log(0.01))
@example(d=3.0, log_sigma=math.log(SWITCH_SIGMA))
@example(d=0.5, log_sigma=math.log(SWITCH_SIGMA) + 1e-9)
def test_torus_score_matches_finite_differences_of_the_log_density(d, log_sigma):
    """The chain's wrapped-normal score (windings below sigma = 2, Fourier series above)
    against the central difference (f(d + h) - f(d - h)) / 2h of log p_sigma computed with 60
    windings, in float64. Error of the difference: h^2 / 6 |f'''| + rounding 2 U' |f| / h.
    f''' = -kappa_3(y) / sigma^6, kappa_3 the third cumulant of the offset y = d + 2 pi k under
    the windings' posterior (f' = -E[y] / sigma^2 and each derivative of E[y] adds a cumulant
    over sigma^2), so |f'''| <= E|y - E y|^3 / sigma^6, taken at d - h, d, d + h with a factor
    2 for the points between. h = 3e-5 sigma^2 resolves the seam, where the posterior moves
    from one winding to the next over a width ~ sigma^2 / pi."""
    sigma = math.exp(log_sigma)
    h = 3e-5 * sigma * sigma
    stencil = torch.tensor([d - h, d, d + h], dtype=torch.float64)
    log_p, (weights, y) = reference_windings(stencil, sigma)
    fd = (log_p[2] - log_p[0]).item() / (2.0 * h)
    mean = (weights * y).sum(-1, keepdim=True)
    third = (weights * (y - mean).abs() ** 3).sum(-1).max().item()
    tol = h * h / 6.0 * 2.0 * third / sigma**6 + 2.0 * ROUNDINGS * U * (1.0 + log_p.abs().max().item()) / h
    score = wrapped_normal_score(torch.tensor([d], dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)).item()
    assert abs(score - fd) <= tol, (score, fd, tol)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 1.5, 1.999, 2.0, 2.001, 3.0, 8.0])
def test_torus_truncation_error_within_its_bound(sigma):
    """The truncated score (7 windings or 5 Fourier terms, torus.py) against the exact score of
    60 windings (autograd of the log-sum-exp, float64) on a grid of d in [-pi, pi): within the
    stated truncation bound plus rounding R U (1 + |score|) / sigma^2-sized terms. The bounds
    are tiny at the switch sigma = 2 for both branches (the choice of WINDINGS and
    FOURIER_TERMS)."""
    d = torch.linspace(-math.pi, math.pi, 401, dtype=torch.float64)[:-1].requires_grad_(True)
    log_p, _ = reference_windings(d, sigma)
    (exact,) = torch.autograd.grad(log_p.sum(), d)
    score = wrapped_normal_score(d.detach(), torch.tensor(sigma, dtype=torch.float64))
    bound = winding_error_bound(sigma) if sigma <= SWITCH_SIGMA else fourier_error_bound(sigma)
    rounding = ROUNDINGS * U * (1.0 + exact.abs().max().item() + math.pi / sigma**2)
    assert (score - exact).abs().max().item() <= bound + rounding
    assert winding_error_bound(SWITCH_SIGMA, WINDINGS) < 1e-24 and fourier_error_bound(SWITCH_SIGMA, FOURIER_TERMS) < 1e-29


def test_wrap_returns_angles_in_the_half_open_interval():
    """wrap maps onto [-pi, pi) in float32 and float64, including the values whose remainder
    rounds up to 2 pi (tiny negatives) and odd multiples of pi."""
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([-1e-9, -1e-30, math.pi, -math.pi, 3 * math.pi, -3 * math.pi, 7.0, -7.0, 100.0, 0.0], dtype=dtype)
        w = wrap(x)
        assert bool(((w >= -math.pi) & (w < math.pi)).all()), w
        assert torch.allclose(torch.cos(w.double()), torch.cos(x.double()), atol=1e-5)


# --------------------------------------------------------------------------------------
# sphere: the walk against Brownian motion, the heat-kernel score
# --------------------------------------------------------------------------------------


class _Draws:
    def __init__(self, seed: int, n: int):
        self.stream = rng.NoiseStream(seed, torch.arange(n), (3,), dtype=torch.float64)

    def sample(self, draw: int) -> torch.Tensor:
        return self.stream.normal(draw)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_sphere_walk_has_the_moments_of_brownian_motion(registry, sigma):
    """Brownian motion on S^2 with generator Delta / 2 for time t = sigma^2: the degree-l
    spherical harmonics are eigenfunctions of Delta with eigenvalue -l (l + 1), so
    E[P_l(<x_t, x0>)] = exp(-l (l + 1) t / 2): exp(-t) for l = 1, exp(-3 t) for l = 2.

    The walk's N = 32 isotropic steps of variance h = t / N each multiply E[P_l] by
    E[P_l(cos R)] exactly (Funk-Hecke), m(h) = E[cos R] for l = 1 and (1 + 3 m(4 h)) / 4 for
    l = 2 (cos^2 R = (1 + cos 2R) / 2). The Monte Carlo means over 20000 walks match these
    products within 5 standard errors (|P_l| <= 1); the products are within the walk's stated
    bias of Brownian motion's values: t^2 exp(-t) / (6 N) for l = 1 (1.2 times, for the
    O(t^3 / N^2) terms) and (3 t)^2 exp(-3 t) (1/6 + 1/3) / N-sized for l = 2."""
    chain = registry.build("chain", "sphere")
    n, t, steps = 20000, sigma * sigma, chain.substeps
    x0 = fibonacci_directions(1).expand(n, 3)
    x_t = chain.walk(x0, torch.full((n,), sigma, dtype=torch.float64), _Draws(3, n))
    assert chain.manifold_error(x_t).max().item() <= 1e-12
    c = (x_t * x0).sum(1)
    h = t / steps
    walk_l1 = walk_mean_cosine(h) ** steps
    walk_l2 = ((1.0 + 3.0 * walk_mean_cosine(4.0 * h)) / 4.0) ** steps
    for statistic, expected in ((c, walk_l1), (1.5 * c * c - 0.5, walk_l2)):
        stderr = statistic.std().item() / math.sqrt(n)
        assert abs(statistic.mean().item() - expected) <= 5.0 * stderr, (statistic.mean().item(), expected, stderr)
    assert abs(walk_l1 - math.exp(-t)) <= 1.2 * t * t * math.exp(-t) / (6.0 * steps)
    assert abs(walk_l2 - math.exp(-3.0 * t)) <= 1.2 * (3.0 * t) ** 2 * math.exp(-3.0 * t) / (2.0 * steps)
    # the walk converges: 32 times more steps leave a 32 times smaller gap (to 10%)
    fine = walk_mean_cosine(h / 32.0) ** (32 * steps)
    assert abs(fine - math.exp(-t)) <= 1.1 * abs(walk_l1 - math.exp(-t)) / 32.0


def reference_heat_kernel(theta: torch.Tensor, t: float, degrees: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """4 pi p_t(theta) = sum_l (2l + 1) exp(-l (l + 1) t / 2) P_l(cos theta), float64, and the
    sum S of its terms' magnitudes (its condition: the series cancels to p in the tail, so its
    rounding is about R U S, not R U p)."""
    c = torch.cos(theta)
    p_prev, p = torch.ones_like(c), c
    total = 1.0 + 3.0 * math.exp(-t) * c
    size = 1.0 + 3.0 * math.exp(-t) * c.abs()
    for l in range(1, degrees):
        p_prev, p = p, ((2 * l + 1) * c * p - l * p_prev) / (l + 1)
        weight = (2 * l + 3) * math.exp(-0.5 * (l + 1) * (l + 2) * t)
        total = total + weight * p
        size = size + weight * p.abs()
    return total, size


@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 2.0])
def test_sphere_score_is_the_derivative_of_the_log_heat_kernel(t):
    """The radial heat-kernel score -d/dtheta log p_t = g(theta, t) sin(theta) (sphere.py) against
    the derivative (autograd, float64) of log p_t from the spectral series with 400 degrees, for
    theta in [0.05, min(6 sqrt(t), pi - 0.05)] where the series is well conditioned (p >= 1e-6
    S: both use it there; the chain falls back to the small-time expansion below 1e-8 S, which
    never happens before theta = 4 sqrt(t)). Tolerance: the series' rounding, R U (S / p) times
    (1 + |d log p / d theta|)."""
    theta = torch.linspace(0.05, min(6.0 * math.sqrt(t), math.pi - 0.05), 41, dtype=torch.float64).requires_grad_(True)
    p, size = reference_heat_kernel(theta, t)
    (grad,) = torch.autograd.grad(torch.log(p).sum(), theta)
    p, size, theta = p.detach(), size.detach(), theta.detach()
    conditioned = p >= 1e-6 * size
    assert bool(conditioned[theta <= 4.0 * math.sqrt(t)].all())
    g = heat_kernel_g(torch.cos(theta), theta, torch.full_like(theta, t))
    tol = ROUNDINGS * U * (size / p) * (1.0 + grad.abs())
    assert ((g * torch.sin(theta) + grad).abs() <= tol)[conditioned].all()


@pytest.mark.parametrize("t", [0.005, 0.02, SWITCH_TIME * (1 - 1e-9)])
def test_sphere_small_time_expansion_is_accurate_where_it_is_used(t):
    """Below SWITCH_TIME the score is Varadhan's term plus the Van Vleck correction; against the
    exact series (400 degrees, exact to float64 there) its relative error on theta <= 6
    sqrt(t) is below the 2.1e-5 stated in sphere.py (the worst case is t -> 0.05)."""
    theta = torch.linspace(0.01, 6.0 * math.sqrt(t), 41, dtype=torch.float64)
    theta_ref = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.log(reference_heat_kernel(theta_ref, t)[0]).sum(), theta_ref)
    g = heat_kernel_g(torch.cos(theta), theta, torch.full_like(theta, t))
    relative = ((g * torch.sin(theta) + grad) / grad).abs().max().item()
    assert relative <= 2.1e-5


def test_sphere_kernel_score_is_tangent_and_points_at_x0(registry):
    """grad log p_t(x | x0) = g (x0 - cos(theta) x): orthogonal to x, and for small t its
    length is ~ theta / t towards x0 (Varadhan), so exp_x(t score) lands on x0 up to the
    Van Vleck factor: within theta t / 6 + O(t^2)."""
    chain = registry.build("chain", "sphere")
    n, sigma = 256, 0.1
    x0 = fibonacci_directions(n)
    x_t = chain.walk(x0, torch.full((n,), sigma, dtype=torch.float64), _Draws(4, n))
    score = chain.kernel_score(x_t, x0, torch.full((n,), sigma, dtype=torch.float64))
    assert (score * x_t).sum(1).abs().max().item() <= 1e-12
    theta = chain.distance(x_t, x0)
    back = chain.exp_map(x_t, sigma**2 * score)
    assert (chain.distance(back, x0) - theta * sigma**2 / 6.0).abs().max().item() <= 1e-3 * sigma**2


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


def test_sphere_mixture_draws_von_mises_fisher_exactly(registry):
    """Each mode's mean resultant length E<x, mu> = coth(kappa) - 1 / kappa (vMF on S^2) and
    the tangent part is isotropic (E of its component along any fixed tangent direction is 0),
    within 5 standard errors over 20000 points; the data are unit vectors and deterministic."""
    data_set = registry.build("data", "sphere-mixture", n=20000, kappa=8.0)
    x, labels = data_set.draw(20000, seed=0)
    assert (torch.linalg.vector_norm(x, dim=1) - 1.0).abs().max().item() <= 1e-12
    mu = data_set.means()
    expected = 1.0 / math.tanh(8.0) - 1.0 / 8.0
    for k in range(data_set.modes):
        mine = x[labels == k]
        w = mine @ mu[k]
        assert abs(w.mean().item() - expected) <= 5.0 * w.std().item() / math.sqrt(mine.shape[0])
        ortho = torch.linalg.cross(mu[k], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        side = mine @ (ortho / ortho.norm())
        assert abs(side.mean().item()) <= 5.0 * side.std().item() / math.sqrt(mine.shape[0])
    assert torch.equal(data_set.load().x, data_set.load().x)


def test_torus_mixture_is_a_wrapped_gaussian_mixture(registry):
    """For a wrapped normal, E[cos(x - mu)] = exp(-s^2 / 2) and E[sin(x - mu)] = 0 per
    coordinate (its first circular moment); within 5 standard errors over 20000 points. The
    points lie in [-pi, pi)."""
    data_set = registry.build("data", "torus-mixture")
    x, labels = data_set.draw(20000, seed=0)
    assert bool(((x >= -math.pi) & (x < math.pi)).all())
    _, means, stds = data_set.mixture()
    for k in range(data_set.modes):
        offset = x[labels == k] - means[k]
        for values, expected in ((torch.cos(offset), math.exp(-0.5 * stds[k].item() ** 2)), (torch.sin(offset), 0.0)):
            stderr = values.std(0) / math.sqrt(values.shape[0])
            assert ((values.mean(0) - expected).abs() <= 5.0 * stderr).all()


# --------------------------------------------------------------------------------------
# the sampler with the exact score
# --------------------------------------------------------------------------------------


def torus_mixture_score(data_set, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact score of the torus mixture perturbed to sigma: each wrapped normal component
    with std s becomes a wrapped normal with std sqrt(s^2 + sigma^2) (wrapped Gaussians
    convolve as Gaussians), and the mixture's score is the responsibility-weighted average of
    the components' scores (responsibilities from 60-winding log densities)."""
    weights, means, stds = data_set.mixture()
    std = math.sqrt(stds[0].item() ** 2 + sigma**2)
    d = wrap(x.double()[:, None, :] - means[None])
    log_p, _ = reference_windings(d, std)
    resp = torch.softmax(log_p.sum(-1) + torch.log(weights), dim=1)
    return (resp[..., None] * wrapped_normal_score(d, torch.tensor(std, dtype=torch.float64))).sum(1)


def test_sampler_with_the_exact_torus_score_reproduces_the_data(registry):
    """geodesic-random-walk from the uniform prior at sigma = pi to clean data with the exact
    score of the perturbed torus mixture (no training): MMD^2 to the data below 0.006 (four
    times the 0.0015 of two independent data draws; measured 0.001 at 25 steps), against 0.10
    for the prior; every intermediate state and x0 handed to the callback in [-pi, pi)."""
    data_set = registry.build("data", "torus-mixture", n=2000)
    chain = registry.build("chain", "torus")
    schedule = registry.build("schedule", "exponential", sigma_min=0.03, sigma_max=math.pi)
    sampler = registry.build("sampler", "geodesic-random-walk", steps=25)
    levels = fundiff.noise_levels(schedule, chain, sampler.steps)
    n = 1000
    ids = torch.arange(n)
    x = chain.initial_state(levels[0], rng.NoiseStream(0, ids, (2,), stream=rng.STREAM_PRIOR, dtype=torch.float64))

    def denoise(x, level):
        return x + level.sigma**2 * torus_mixture_score(data_set, x, level.sigma)

    off = []

    def callback(i, x_i, x0_i):
        for value in (x_i, x0_i):
            if not bool(((value >= -math.pi) & (value < math.pi)).all()):
                off.append(i)

    out = sampler.sample(denoise, x, levels, rng.NoiseStream(0, ids, (2,), dtype=torch.float64), callback)
    assert off == []
    data = data_set.load().x[:n]
    assert mmd(out, data, "torus") <= 0.006
    assert mmd(x, data, "torus") >= 0.08


@attrs.frozen(kw_only=True)
class _ScoreBlindWalk(Sampler):
    """A broken manifold sampler for the kit: walks with the right noise but no drift."""

    requires = frozenset({"manifold-state"})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        chain = levels[0].chain
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            denoise(x, t)
            z = chain.project_tangent(x, noise.sample(i))
            x = chain.exp_map(x, math.sqrt(t.sigma**2 - s.sigma**2) * z)
            if callback is not None:
                callback(i, x, x)
        return x


@pytest.mark.parametrize("chain_name", ["torus", "sphere"])
def test_kit_manifold_sampler_check_refuses_a_walk_without_drift(registry, chain_name):
    """fundiff.testing's manifold sampler check (data at one point, exact kernel score) passes
    the geodesic random walk with Langevin corrector steps and fails a walk that ignores the
    score, in its sanity band (mean distance to the point below 0.1)."""
    chain = registry.build("chain", chain_name)
    check_sampler(registry.build("sampler", "geodesic-random-walk", steps=20, corrector_steps=1), chain, batch=64)
    with pytest.raises(AssertionError, match="sanity band"):
        check_sampler(_ScoreBlindWalk(steps=20), chain, batch=64)


# --------------------------------------------------------------------------------------
# recipes: refusals, then end to end
# --------------------------------------------------------------------------------------


def _problems(registry, recipe: str, **overrides) -> list[tuple[str, str]]:
    with pytest.raises(fundiff.RecipeError) as err:
        fundiff.load_recipe(f"{RECIPES}/{recipe}.yaml", registry, overrides=overrides)
    return err.value.problems


def test_incompatible_components_are_refused_at_load(registry):
    """Gaussian samplers require 'gaussian-marginals', which the manifold chains do not provide;
    parameterizations that read the output as Euclidean noise or data, corruption noises, a
    reverse variance, wrongly shaped data, and a schedule that ends before the data are mixed
    are refused by the chains' check_recipe, each naming the requirement and the fix."""
    problems = _problems(registry, "torus", **{"parameterization.name": "eps"})
    assert (
        problems[0][0] == "chain"
        and "assumes Euclidean noise" in problems[0][1]
        and "use parameterization: score" in problems[0][1]
    )
    for sampler in ("dpm-solver", "ddim"):
        for recipe in ("torus", "sphere"):
            (path, message), *_ = _problems(registry, recipe, **{"sampler.name": sampler})
            assert path == "sampler" and "requires 'gaussian-marginals'" in message and "chain/vp" in message
    for param in ("x0", "v", "edm", "mean"):
        assert any(
            "use parameterization: score" in m for _, m in _problems(registry, "sphere", **{"parameterization.name": param})
        )
    assert any("use noise: gaussian" in m for _, m in _problems(registry, "torus", **{"noise.name": "blur"}))
    # Gaussian reverse variances are refused (by their own requirement, or by the chain)
    assert any(
        p == "variance" or "remove the 'variance' section" in m
        for p, m in _problems(registry, "torus", **{"variance.name": "fixed-small"})
    )
    assert any("sphere-mixture" in m for _, m in _problems(registry, "sphere", **{"data.name": "two-moons"}))
    assert any("torus-mixture" in m for _, m in _problems(registry, "torus", **{"data.name": "digits", "denoiser.name": "mlp"}))
    (_, message), *_ = _problems(registry, "sphere", **{"schedule.sigma_max": 1.0})
    assert "end the schedule at sigma >= 1.8" in message, message
    (path, message), *_ = _problems(registry, "two-moons", **{"sampler.name": "geodesic-random-walk"})
    assert path == "sampler" and "requires 'manifold-state'" in message and "chain/torus" in message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both recipes trained small: 300 optimizer steps of batch 256 (the sphere walk with 8
    substeps), about 3 s each on one core."""
    runs = {}
    sizes = {
        "train.steps": 300,
        "train.batch_size": 256,
        "train.checkpoint_every": 300,
        "sample.num_samples": 1000,
        "sampler.steps": 50,
    }
    extra = {"torus": {}, "sphere": {"chain.substeps": 8, "train.lr": 5e-3}}
    for name in ("torus", "sphere"):
        run_dir = tmp_path_factory.mktemp(name)
        runs[name] = (fundiff.train(f"{RECIPES}/{name}.yaml", run_dir, quiet=True, overrides={**sizes, **extra[name]}), run_dir)
    return runs


@pytest.mark.parametrize("name", ["torus", "sphere"])
def test_trained_recipe_samples_are_closer_to_the_data_than_the_prior(trained, name):
    """recipes/torus.yaml and recipes/sphere.yaml, trained small, sample 1000 points whose MMD^2
    to 1000 data points is below a quarter of the uniform prior's (measured: torus 0.0097 vs
    0.10, sphere 0.0095 vs 0.076), and every sample lies on the manifold in float32."""
    pipeline, _ = trained[name]
    samples, _ = pipeline.sample()
    assert samples.dtype == torch.float32
    chain = pipeline.chain
    if name == "torus":
        assert bool(((samples >= -math.pi) & (samples < math.pi)).all())
    else:
        assert (torch.linalg.vector_norm(samples, dim=1) - 1.0).abs().max().item() <= 1e-5
    data = pipeline.data.x[:1000]
    prior = chain.uniform_state(rng.uniform(1, rng.STREAM_PRIOR, 0, torch.arange(1000), tuple(data.shape[1:])))
    assert mmd(samples, data, name) <= 0.25 * mmd(prior, data, name)


@pytest.mark.parametrize("name", ["torus", "sphere"])
def test_every_intermediate_state_stays_on_the_manifold_in_float32(trained, name):
    """The trained model sampled in float32 with Langevin corrector steps, through the sampler's
    callback: every state x_i and every denoised x0_i lies on the manifold (angles in
    [-pi, pi), unit norm within 1e-5)."""
    pipeline, _ = trained[name]
    sampler = attrs.evolve(pipeline.sampler, steps=20, corrector_steps=1)
    levels = pipeline.levels(sampler=sampler)
    n = 256
    ids = torch.arange(n)
    shape = pipeline.state_spec.shape
    x = pipeline.chain.initial_state(levels[0], rng.NoiseStream(0, ids, shape, stream=rng.STREAM_PRIOR))
    denoise = fundiff.make_denoise(pipeline.sampling_model(), pipeline.parameterization, pipeline.guidance, None, levels)
    states = []
    with torch.no_grad():
        sampler.sample(denoise, x, levels, rng.NoiseStream(0, ids, shape), lambda i, x_i, x0_i: states.extend([x_i, x0_i]))
    assert len(states) == 2 * (len(levels) - 1)
    for state in states:
        assert state.dtype == torch.float32
        if name == "torus":
            assert bool(((state >= -math.pi) & (state < math.pi)).all())
        else:
            assert (torch.linalg.vector_norm(state, dim=1) - 1.0).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["torus", "sphere"])
def test_a_loaded_run_samples_what_the_trained_one_did(trained, name):
    """The checkpoint round trip: load_run rebuilds the model and samples exactly what the
    trained pipeline does; sample i depends only on (seed, i), so in batches of 5 the samples
    agree too, up to the float32 rounding of matrix products of another batch shape (1e-5)."""
    pipeline, run_dir = trained[name]
    expected, _ = pipeline.sample(16, seed=3)
    loaded = fundiff.load_run(run_dir)
    assert torch.equal(loaded.sample(16, seed=3)[0], expected)
    assert (loaded.sample(16, seed=3, batch_size=5)[0] - expected).abs().max().item() <= 1e-5
