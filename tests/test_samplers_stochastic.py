"""Stochastic samplers (euler-ancestral, euler-maruyama, pc, dpmpp-2s-ancestral, dpmpp-2m-sde,
dpmpp-3m-sde) and per-sample Brownian trees (fundiff.brownian).

Exactness tests run in float64 against the exact denoiser of a Gaussian mixture (the
``gmm-oracle``); two algebraically equal forms of a sampler then differ by rounding only.
Each step rounds a few times at U = 2.2e-16 relative to the operands; the sigma~-space
references carry x~ = x / alpha, whose absolute rounding is U |x| / alpha -- at the first
cosine level alpha ~ 5e-5, so ~1e-11 there -- and the flow between two modes of the ring
stretches perturbations by up to ~(radius / std)^2 ~ 200. Observed differences are <= 4e-12
(Euler on the cosine grid) and ~1e-14 elsewhere; ``TOL = 1e-9`` keeps a margin above that,
while a wrong coefficient moves samples by 1e-4 or more.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fundiff
from fundiff import Level, noiselevel
from fundiff.brownian import BrownianTree, StepNoise, level_time
from fundiff.errors import RecipeError
from fundiff.pipeline import make_denoise
from fundiff.testing import U, Z_SCORE, check_sampler
from helpers import oracle_recipe, sliced_wasserstein

TOL = 1e-9
SDE_SAMPLERS = ("euler-ancestral", "euler-maruyama", "dpmpp-2s-ancestral", "dpmpp-2m-sde", "dpmpp-3m-sde")


# --------------------------------------------------------------------------------------
# helpers: the oracle as a plain denoise function on a grid of levels
# --------------------------------------------------------------------------------------


def pipeline(registry, **sections) -> fundiff.Pipeline:
    return fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(**sections), registry))


def oracle(registry, schedule="cosine", chain="vp", steps=30):
    """(denoise, levels, start(ids), noise(ids)) for the exact 8-mode ring oracle, float64."""
    p = pipeline(registry, schedule=schedule, chain=chain, parameterization="x0")
    denoise = make_denoise(p.model, p.parameterization, p.guidance)
    levels = fundiff.noise_levels(p.schedule, p.chain, steps)

    def start(ids):
        z = fundiff.NoiseStream(7, ids, (2,), stream=fundiff.rng.STREAM_PRIOR, dtype=torch.float64).normal(0)
        return p.chain.prior(levels[0], z)

    def noise(ids):
        return fundiff.NoiseStream(7, ids, (2,), stream=fundiff.rng.STREAM_SAMPLER, dtype=torch.float64)

    return denoise, levels, start, noise


def stilde(level: Level) -> float:
    return level.sigma / level.alpha


class FixedNoise:
    """A noise source returning a given tensor for every draw (for one-step identities)."""

    def __init__(self, z):
        self.z = z

    def sample(self, draw):
        return self.z


# --------------------------------------------------------------------------------------
# Brownian trees
# --------------------------------------------------------------------------------------


def test_brownian_increments_are_independent_with_variance_of_the_interval():
    """W(b) - W(a) ~ N(0, |b - a|) and increments over disjoint intervals are independent
    (the definition of Brownian motion, which the Levy-Ciesielski construction satisfies
    exactly at the dyadic points the tree snaps to). Over n = 40000 values: the sample mean
    within Z sqrt(v / n), the variance within Z sqrt((m4 - v^2) / n) (CLT, m4 the sample
    fourth moment), the correlation of disjoint increments within Z / sqrt(n)."""
    tree = BrownianTree(3, torch.arange(20000), (2,), dtype=torch.float64)
    points = [0.0, 1e-4, 0.013, 0.25, 0.2500001, 0.5, 0.61, 1.0]
    tree.prefetch(points)
    increments = []
    for a, b in zip(points, points[1:]):
        inc = tree.increment(a, b).flatten()
        v = (tree.snap(b) - tree.snap(a)) * tree.resolution
        n = inc.numel()
        m4 = (inc**4).mean()
        assert abs(inc.mean()) < Z_SCORE * math.sqrt(v / n), (a, b)
        assert abs((inc**2).mean() - v) < Z_SCORE * math.sqrt((m4 - v * v) / n), (a, b, float((inc**2).mean()), v)
        increments.append(inc / math.sqrt(v))
    for x, y in zip(increments, increments[1:]):
        assert abs((x * y).mean()) < Z_SCORE / math.sqrt(x.numel())
    # the normalised form is N(0, 1) too, and a different seed gives a different path
    z = tree.normal(0.25, 0.61)
    assert abs(float(z.var()) - 1.0) < Z_SCORE * math.sqrt(2.0 / z.numel())
    other = BrownianTree(4, torch.arange(20000), (2,), dtype=torch.float64)
    assert not torch.equal(other.increment(0.25, 0.61), tree.increment(0.25, 0.61))


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**64 - 1),
    cuts=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=3, max_size=6, unique=True).map(sorted),
)
def test_brownian_increments_over_adjacent_intervals_add_up(seed, cuts):
    """W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)) for a <= b <= c: the tree holds one path, so
    this is exact up to the two float64 subtractions and one addition, each rounding by at
    most U times the largest |W| involved."""
    tree = BrownianTree(seed, torch.arange(16), (3,), dtype=torch.float64)
    whole = tree.increment(cuts[0], cuts[-1])
    parts = sum(tree.increment(a, b) for a, b in zip(cuts, cuts[1:]))
    scale = max(float(tree.value(u).abs().max()) for u in cuts) + 1e-300
    assert (whole - parts).abs().max().item() <= 4 * len(cuts) * U * scale
    # the same interval twice gives the same increment, bit for bit
    assert torch.equal(tree.increment(cuts[0], cuts[1]), tree.increment(cuts[0], cuts[1]))


def test_brownian_path_is_per_sample_and_independent_of_query_order():
    """Sample i's path is a function of (seed, i) alone (node normals keyed by seed, stream,
    sample id and node): a tree over a few samples, queried in another order and with
    another prefetch, gives bit-identical values to the tree over the whole batch."""
    points = [0.9, 0.31, 0.5, 0.0017, 0.75]
    full = BrownianTree(11, torch.arange(64), (2, 3), dtype=torch.float64)
    full.prefetch(points)
    expected = {u: full.value(u) for u in points}
    sub_ids = torch.tensor([63, 5, 40])
    part = BrownianTree(11, sub_ids, (2, 3), dtype=torch.float64)
    for u in reversed(points):
        assert torch.equal(part.value(u), expected[u][sub_ids]), u
    assert torch.equal(full.value(0.0), torch.zeros(64, 2, 3))
    # float32 trees return the same path rounded, on the requested dtype
    z32 = BrownianTree(11, sub_ids, (2, 3), dtype=torch.float32).normal(0.31, 0.9)
    assert z32.dtype == torch.float32
    assert torch.allclose(z32.double(), part.normal(0.31, 0.9), rtol=1e-6, atol=1e-6)


def test_brownian_tree_refuses_points_closer_than_its_resolution():
    """Normalising by sqrt(|b - a|) needs two distinct grid points."""
    tree = BrownianTree(0, torch.arange(2), (1,), depth=10)
    with pytest.raises(ValueError, match="resolution"):
        tree.normal(0.5, 0.5 + 1e-5)


def test_level_time_is_a_monotone_clock_from_noise_to_data():
    """u = sigmoid(-logSNR / 8): 0 at the clean level, 1 at logSNR = -inf, decreasing."""
    chain_levels = [Level(lam, *noiselevel.vp_alpha_sigma(lam)) for lam in (-40.0, -5.0, 0.0, 5.0, 40.0)]
    times = [level_time(lv) for lv in chain_levels]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert level_time(Level(math.inf, 1.0, 0.0)) == 0.0 and level_time(Level(-math.inf, 0.0, 1.0)) == 1.0


# --------------------------------------------------------------------------------------
# conformance and the per-sample contract
# --------------------------------------------------------------------------------------

CONFIGS = [
    ("euler-ancestral", {}),
    ("euler-ancestral", {"eta": 0.5, "noise": "brownian"}),
    ("euler-maruyama", {"steps": 200}),
    ("euler-maruyama", {"steps": 200, "noise": "brownian"}),
    ("pc", {"steps": 100}),
    ("pc", {"steps": 100, "predictor": "euler-maruyama", "corrector_steps": 2}),
    ("pc", {"steps": 100, "step_rule": "per-sample", "snr": 0.05}),
    ("dpmpp-2s-ancestral", {}),
    ("dpmpp-2s-ancestral", {"noise": "brownian"}),
    ("dpmpp-2m-sde", {}),
    ("dpmpp-2m-sde", {"solver_type": "heun", "noise": "brownian"}),
    ("dpmpp-3m-sde", {}),
    ("dpmpp-3m-sde", {"eta": 0.5, "noise": "brownian"}),
]


@pytest.mark.parametrize("name, params", CONFIGS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in CONFIGS])
def test_conformance(registry, name, params):
    """fundiff.testing.check_sampler: shapes, dtype, reproducibility, sample i independent
    of its batch (fresh per-sample streams and Brownian trees alike), and the sanity band
    with an exact Gaussian denoiser on the VP chain."""
    check_sampler(registry.build("sampler", name, **params))


@pytest.mark.parametrize("name", SDE_SAMPLERS + ("pc",))
def test_float32_inputs(registry, name):
    """float32 in, float32 out (coefficients are host floats; noise comes in the stream's
    dtype), with fresh noise and, where offered, Brownian noise."""
    denoise, levels, start, noise = oracle(registry, steps=20)
    ids = torch.arange(64)
    modes = [{}] + ([{"noise": "brownian"}] if name != "pc" else [])
    for params in modes:
        sampler = registry.build("sampler", name, **params)
        src = fundiff.NoiseStream(7, ids, (2,), stream=fundiff.rng.STREAM_SAMPLER, dtype=torch.float32)
        out = sampler.sample(lambda x, lv: denoise(x, lv).float(), start(ids).float(), levels, src)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), params


def test_brownian_noise_is_refused_with_a_non_gaussian_noise_type(registry):
    """A Brownian tree draws Gaussian increments; a recipe whose noise type is not Gaussian
    (gamma) is refused at load time, naming the capability."""
    with pytest.raises(RecipeError, match="gaussian-noise"):
        fundiff.load_recipe(oracle_recipe(noise="gamma", sampler={"name": "dpmpp-2m-sde", "noise": "brownian"}), registry)
    fundiff.load_recipe(oracle_recipe(noise="gamma", sampler={"name": "dpmpp-2m-sde"}), registry)


# --------------------------------------------------------------------------------------
# equivalences the literature proves
# --------------------------------------------------------------------------------------


def euler_reference(denoise, x, levels):
    """Euler on the PF-ODE dx~/ds~ = (x~ - D) / s~ in (x~, s~) = (x / alpha, sigma / alpha)
    (Karras et al. 2022, Algorithm 1 without the Heun correction), the last step to D."""
    for t, s in zip(levels, levels[1:]):
        d = denoise(x, t)
        xt = x / t.alpha
        xs = d if s.is_clean else xt + (stilde(s) - stilde(t)) * (xt - d) / stilde(t)
        x = s.alpha * xs
    return x


def dpmpp_2m_reference(denoise, x, levels):
    """DPM-Solver++(2M) as k-diffusion's sample_dpmpp_2m writes it, in x~ = x / alpha with
    t = -log s~ (Lu et al. 2022b, Algorithm 2)."""
    old, t_prev = None, None
    for t, s in zip(levels, levels[1:]):
        d = denoise(x, t)
        xt = x / t.alpha
        if s.is_clean:
            xs = d
        else:
            tt, tn = -math.log(stilde(t)), -math.log(stilde(s))
            h = tn - tt
            dd = d if old is None else (1 + 1 / (2 * ((tt - t_prev) / h))) * d - (1 / (2 * ((tt - t_prev) / h))) * old
            xs = (stilde(s) / stilde(t)) * xt - math.expm1(-h) * dd
            t_prev = tt
        old = d
        x = s.alpha * xs
    return x


def dpmpp_2s_reference(denoise, x, levels):
    """Deterministic DPM-Solver++(2S) with r = 1/2 (k-diffusion's sample_dpmpp_2s_ancestral,
    eta = 0) in x~, the midpoint evaluated at s~_m = sqrt(s~_t s~_s) on the VP chain."""
    for t, s in zip(levels, levels[1:]):
        d = denoise(x, t)
        xt = x / t.alpha
        if s.is_clean:
            xs = d
        else:
            tt, tn = -math.log(stilde(t)), -math.log(stilde(s))
            h = tn - tt
            sm = math.exp(-(tt + h / 2))
            mid = Level(-2 * math.log(sm), *noiselevel.vp_alpha_sigma(-2 * math.log(sm)))
            x2 = (sm / stilde(t)) * xt - math.expm1(-h / 2) * d
            d2 = denoise(mid.alpha * x2, mid)
            xs = (stilde(s) / stilde(t)) * xt - math.expm1(-h) * d2
        x = s.alpha * xs
    return x


def dpmpp_3m_reference(denoise, x, levels):
    """k-diffusion's sample_dpmpp_3m_sde with eta = 0, line for line in x~ (closed-form phi)."""
    d1 = d2 = h1 = h2 = None
    for t, s in zip(levels, levels[1:]):
        d = denoise(x, t)
        xt = x / t.alpha
        if s.is_clean:
            xs = d
        else:
            h = -math.log(stilde(s)) + math.log(stilde(t))
            xs = math.exp(-h) * xt - math.expm1(-h) * d
            phi2 = math.expm1(-h) / h + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d10, d11 = (d - d1) / r0, (d1 - d2) / r1
                dd1 = d10 + (d10 - d11) * r0 / (r0 + r1)
                dd2 = (d10 - d11) / (r0 + r1)
                xs = xs + phi2 * dd1 - (phi2 / h - 0.5) * dd2
            elif h1 is not None:
                xs = xs + phi2 * (d - d1) / (h1 / h)
            h1, h2 = h, h1
        d1, d2 = d, d1
        x = s.alpha * xs
    return x


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_eta_zero_variants_equal_their_deterministic_solvers(registry, schedule):
    """With eta = 0 the ancestral / SDE samplers are their ODE solvers (k-diffusion;
    Lu et al. 2022b): euler-ancestral is Euler in sigma~-space (Karras et al. 2022),
    dpmpp-2s-ancestral is DPM-Solver++(2S), dpmpp-2m-sde (midpoint) is DPM-Solver++(2M),
    dpmpp-3m-sde is DPM-Solver++(3M). References are written independently in (x~, s~);
    agreement to TOL (module doc) in float64, and no noise is drawn (noise=None works)."""
    denoise, levels, start, _ = oracle(registry, schedule=schedule, steps=25)
    x = start(torch.arange(300))
    cases = [
        ("euler-ancestral", {"eta": 0.0}, euler_reference),
        ("dpmpp-2s-ancestral", {"eta": 0.0}, dpmpp_2s_reference),
        ("dpmpp-2m-sde", {"eta": 0.0}, dpmpp_2m_reference),
        ("dpmpp-3m-sde", {"eta": 0.0}, dpmpp_3m_reference),
    ]
    for name, params, reference in cases:
        out = registry.build("sampler", name, **params).sample(denoise, x, levels)
        ref = reference(denoise, x, levels)
        assert (out - ref).abs().max().item() < TOL, name


@settings(max_examples=10)
@given(eta=st.floats(0.0, 1.0))
def test_euler_ancestral_is_ddim_with_the_same_eta(registry, eta):
    """An Euler step to s~_down plus noise s~_up is DDIM's eq. 12 with c = eta * sqrt(posterior
    variance) (Song et al. 2021a, eq. 16): both give x_s = alpha_s D + sqrt(sigma_s^2 - c^2)
    eps_hat + c z, so with the same per-step draws the samples agree to TOL."""
    denoise, levels, start, noise = oracle(registry, steps=20)
    ids = torch.arange(200)
    ea = registry.build("sampler", "euler-ancestral", eta=eta).sample(denoise, start(ids), levels, noise(ids))
    ddim = registry.build("sampler", "ddim", eta=eta).sample(denoise, start(ids), levels, noise(ids))
    assert (ea - ddim).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["dpmpp-2m-sde", "dpmpp-3m-sde", "euler-maruyama"])
def test_first_sde_step_against_the_ddpm_posterior(registry, name):
    """One step from t to s with the same z: SDE-DPM-Solver++ of order 1 with eta = 1 is
    exactly DDPM's posterior step (Lu et al. 2022b, sec. 5: its noise term is the posterior's
    sigma_s sqrt(1 - e^(-2h))); Euler-Maruyama in tau = s~^2 has the posterior *mean* and
    the variance alpha_s^2 (s~_t^2 - s~_s^2) (DDPM's 'upper' variance in x~ units)."""
    denoise, levels, start, _ = oracle(registry, steps=10)
    t, s = levels[3], levels[4]
    x = start(torch.arange(100))
    z = torch.linspace(-2, 2, 200, dtype=torch.float64).reshape(100, 2)
    out = registry.build("sampler", name).sample(denoise, x, [t, s], FixedNoise(z))
    coef_x0, coef_xt, var = noiselevel.posterior(s, t)
    mean = coef_x0 * denoise(x, t) + coef_xt * x
    std = math.sqrt(var) if name != "euler-maruyama" else s.alpha * math.sqrt(stilde(t) ** 2 - stilde(s) ** 2)
    assert (out - (mean + std * z)).abs().max().item() < TOL


def test_dpmpp_3m_sde_starts_as_dpmpp_2m_sde_heun(registry):
    """k-diffusion's 3M SDE takes a first-order, then a second-order step whose correction
    phi2(h_eta) (D_1 - D_0) / r is the 2M SDE's heun correction: on a two-step grid the two
    samplers agree for any eta with the same noise (to TOL)."""
    denoise, levels, start, noise = oracle(registry, steps=10)
    grid = levels[2:5]
    ids = torch.arange(100)
    for eta in (0.0, 0.7, 1.0):
        a = registry.build("sampler", "dpmpp-3m-sde", eta=eta).sample(denoise, start(ids), grid, noise(ids))
        b = registry.build("sampler", "dpmpp-2m-sde", eta=eta, solver_type="heun").sample(denoise, start(ids), grid, noise(ids))
        assert (a - b).abs().max().item() < TOL, eta


def test_pc_without_corrector_is_its_predictor(registry):
    """PC with corrector_steps = 0 is its predictor alone: with the Euler-Maruyama predictor
    it is the euler-maruyama sampler bit for bit (same coefficients, same draws); on a VE
    chain Song et al.'s reverse-diffusion predictor (their eq. 47, x + (s_t^2 - s_s^2) score
    + sqrt(s_t^2 - s_s^2) z) is the same step as Euler-Maruyama in tau = sigma^2, to TOL
    times the VE scale (sigma_max ~ 150 here)."""
    ids = torch.arange(200)
    denoise, levels, start, noise = oracle(registry, steps=30)
    pc = registry.build("sampler", "pc", corrector_steps=0, predictor="euler-maruyama")
    em = registry.build("sampler", "euler-maruyama")
    assert torch.equal(pc.sample(denoise, start(ids), levels, noise(ids)), em.sample(denoise, start(ids), levels, noise(ids)))
    denoise, levels, start, noise = oracle(registry, chain="ve", steps=30)
    rd = registry.build("sampler", "pc", corrector_steps=0).sample(denoise, start(ids), levels, noise(ids))
    em = em.sample(denoise, start(ids), levels, noise(ids))
    assert (rd - em).abs().max().item() < TOL * (1 + levels[0].sigma)


def test_brownian_noise_refines_the_same_path(registry):
    """With Brownian-tree noise a grid and its refinement see the same Brownian path: the
    normalised noise of a coarse step is the sqrt-length-weighted sum of the fine steps'
    (W additive; to rounding, ~U / sqrt(step length) < 1e-12), so euler-ancestral with
    eta = 1 on 20 and on 40 steps (the 20-step grid interleaved) gives per-sample results
    far more alike than independent noise does (median distance 0.06 against 1.36 measured;
    asserted under a fifth)."""
    denoise, coarse, start, noise = oracle(registry, steps=20)
    _, fine, _, _ = oracle(registry, steps=40)
    assert all(c == f for c, f in zip(coarse, fine[::2]))
    ids = torch.arange(1000)
    src = StepNoise(noise(ids), "brownian", fine)
    for a, b, c in zip(fine[0:-2:2], fine[1:-1:2], fine[2::2]):
        # the tree normalises by the lengths between the points it snaps to
        ua, ub, uc = (src.tree.snap(level_time(lv)) * src.tree.resolution for lv in (a, b, c))
        combined = (math.sqrt(ua - ub) * src(0, a, b) + math.sqrt(ub - uc) * src(0, b, c)) / math.sqrt(ua - uc)
        assert (combined - src(0, a, c)).abs().max().item() < 1e-12
    brownian = registry.build("sampler", "euler-ancestral", noise="brownian")
    fresh = registry.build("sampler", "euler-ancestral")
    same_path = (brownian.sample(denoise, start(ids), coarse, noise(ids)) - brownian.sample(denoise, start(ids), fine, noise(ids))).norm(dim=1)
    other = (fresh.sample(denoise, start(ids), coarse, noise(ids)) - fresh.sample(denoise, start(ids), fine, noise(ids))).norm(dim=1)
    assert same_path.median() < 0.2 * other.median(), (float(same_path.median()), float(other.median()))


# --------------------------------------------------------------------------------------
# distribution: the mixture is reproduced
# --------------------------------------------------------------------------------------

N = 2000
# step counts: the first-order SDE solvers (Euler-Maruyama, PC's reverse-diffusion predictor)
# need many steps; the others reach the bound with few (measured: SW / bound 0.5-0.85)
MIXTURE_CASES = [
    {"name": "euler-ancestral", "steps": 50},
    {"name": "euler-maruyama", "steps": 200},
    {"name": "pc", "steps": 100},
    {"name": "dpmpp-2s-ancestral", "steps": 15},
    {"name": "dpmpp-2m-sde", "steps": 25},
    {"name": "dpmpp-2m-sde", "steps": 25, "solver_type": "heun", "noise": "brownian"},
    {"name": "dpmpp-3m-sde", "steps": 25},
]


@pytest.mark.parametrize("sampler", MIXTURE_CASES, ids=[f"{c['name']}-{c['steps']}{'-brownian' if c.get('noise') else ''}" for c in MIXTURE_CASES])
def test_samplers_reproduce_the_mixture(registry, sampler):
    """Samples from the exact denoiser match exact mixture samples (as in
    test_sampling_oracle.py): sliced Wasserstein-2 to N exact samples below 1.5 times the
    distance between two independent exact draws (the finite-sample floor), and every one
    of the 8 modes populated in proportion (nearest-mode frequencies within 4 standard
    errors of 1/8)."""
    p = pipeline(registry, sampler=sampler)
    samples, _ = p.sample(N, seed=1, batch_size=N, dtype=torch.float64)
    exact_a, _ = p.data_set.draw(N, seed=101)
    exact_b, _ = p.data_set.draw(N, seed=202)
    bound = 1.5 * sliced_wasserstein(exact_a, exact_b)
    assert sliced_wasserstein(samples, exact_a) < bound
    _, means, _ = p.data_set.mixture()
    freq = torch.bincount(torch.cdist(samples, means).argmin(1), minlength=8).double() / N
    assert (freq - 1 / 8).abs().max() < 4 * math.sqrt((1 / 8) * (7 / 8) / N), freq


def test_zero_terminal_snr(registry):
    """A schedule with zero terminal SNR (Lin et al. 2024: alpha = 0 at the first level) is
    sampled by the samplers whose x-space coefficients stay finite there (euler-ancestral,
    dpmpp-2s-ancestral, dpmpp-2m-sde and dpmpp-3m-sde with eta = 0 or 1: a first step to
    alpha_s D plus noise) and refused at load time by those whose first step is undefined
    (euler-maruyama: infinite variance; pc: its small-step predictors)."""
    schedule = {"name": "zero-terminal-snr", "base": "linear"}
    for sampler in (
        {"name": "euler-ancestral", "steps": 20},
        {"name": "dpmpp-2s-ancestral", "steps": 10},
        {"name": "dpmpp-2m-sde", "steps": 20, "eta": 0.0},
        {"name": "dpmpp-2m-sde", "steps": 20, "solver_type": "heun"},
        {"name": "dpmpp-3m-sde", "steps": 20, "eta": 0.0},
        {"name": "dpmpp-3m-sde", "steps": 20, "noise": "brownian"},
    ):
        p = pipeline(registry, schedule=schedule, parameterization="v", sampler=sampler)
        assert p.levels()[0].alpha == 0.0
        samples, _ = p.sample(200, seed=1, batch_size=200, dtype=torch.float64)
        assert torch.isfinite(samples).all() and samples.std() > 0.5, sampler
    for name in ("euler-maruyama", "pc"):
        with pytest.raises(RecipeError, match="zero terminal SNR"):
            fundiff.load_recipe(oracle_recipe(schedule=schedule, parameterization="v", sampler={"name": name}), registry)
