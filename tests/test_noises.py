"""Noise types: moments, per-sample streams, distribution-specific properties, and end-to-end
training with non-Gaussian noise.

Statistical bounds are Z = 5 standard errors from the central limit theorem (two-sided
p ~ 6e-7 per bound), with the seeds fixed so every run draws the same numbers. Where a
distribution's higher moments are known they give the standard error (a sample fourth
moment of skewed noise is itself too noisy to bound anything with); distribution checks use
the Dvoretzky-Kiefer-Wolfowitz inequality, P(sup |F_n - F| > e) <= 2 exp(-2 n e^2), at
e for a failure probability of 1e-9.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fundiff
from fundiff import Data, DataSpec, NoiseStream
from fundiff.components import ADDITIVE_NOISE
from helpers import RECIPES, sliced_wasserstein

Z = 5.0
STREAM = 1000  # a third-party stream id, as fundiff.rng asks
SHAPE = (2, 4, 4)  # a small image spec: 2 channels of 4 x 4 (every noise type accepts it)
BATCH = 4096

_REGISTRY = fundiff.Registry.discover()
ADDITIVE = sorted(e.name for e in _REGISTRY.entries("noise") if ADDITIVE_NOISE in e.cls.provides)


def draw(noise, ids, draw_index=0, *, seed=0, shape=SHAPE, dtype=torch.float64):
    stream = NoiseStream(seed, torch.as_tensor(ids), shape, stream=STREAM, dtype=dtype)
    return noise.sample(stream, draw_index)


def dkw_bound(n: int, p: float = 1e-9) -> float:
    """e with P(sup |F_n - F| > e) <= p for n i.i.d. values (Dvoretzky-Kiefer-Wolfowitz)."""
    return math.sqrt(math.log(2.0 / p) / (2.0 * n))


def ks_distance(values: torch.Tensor, cdf) -> float:
    """sup_x |F_n(x) - F(x)| for the empirical distribution of ``values``."""
    x = values.flatten().double().sort().values
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def gamma_central_moments(k: float) -> dict[int, float]:
    """Central moments 2..6 of the standardised Gamma(k) (mean 0, variance 1)."""
    mu = {2: k, 3: 2 * k, 4: 3 * k * k + 6 * k, 5: 20 * k * k + 24 * k, 6: 15 * k**3 + 130 * k * k + 120 * k}
    return {n: m / k ** (n / 2) for n, m in mu.items()}


def known_fourth_moment(name: str, noise) -> float | None:
    """E[eps^4] where the distribution is known (the default parameters); None otherwise."""
    if name == "gamma":
        return gamma_central_moments(noise.k)[4]
    if name == "gaussian-mixture":
        w, mu, s = noise.components()
        return float((w * (mu**4 + 6 * mu**2 * s**2 + 3 * s**4)).sum())
    if name in {"gaussian", "gaussian-diagonal", "correlated", "pyramid", "offset"}:
        return 3.0  # every element is N(0, 1) with the default parameters
    return None


# --------------------------------------------------------------------------------------
# Every additive noise type
# --------------------------------------------------------------------------------------


def test_the_noise_types_are_registered():
    assert {"gaussian", "gaussian-diagonal", "gaussian-mixture", "gamma", "correlated", "pyramid", "offset"} <= set(ADDITIVE)


@pytest.mark.parametrize("name", ADDITIVE)
def test_mean_and_variance_per_element(registry, name):
    """Each of the 32 elements of a (2, 4, 4) sample has mean 0 and variance 1 over 4096
    samples: |mean| <= Z / sqrt(n), |var - 1| <= Z sqrt((m4 - 1) / n), m4 the known fourth
    moment (the sample's where the distribution is not known to this test)."""
    noise = registry.build("noise", name)
    z = draw(noise, torch.arange(BATCH))
    assert z.shape == (BATCH, *SHAPE) and z.dtype == torch.float64 and torch.isfinite(z).all()
    n = BATCH
    mean = z.mean(0)
    second = (z**2).mean(0)  # the mean is known to be 0
    m4 = known_fourth_moment(name, noise)
    m4 = (z**4).mean(0) if m4 is None else torch.full_like(second, m4)
    assert (mean.abs() <= Z / math.sqrt(n)).all(), mean.abs().max()
    se_var = ((m4 - 1.0).clamp(min=0.0) / n).sqrt()
    assert ((second - 1.0).abs() <= Z * se_var).all(), ((second - 1.0).abs() / se_var).max()


@pytest.mark.parametrize("name", ADDITIVE)
def test_sample_i_does_not_depend_on_its_batch(registry, name):
    """Same seed: sample i is identical alone, in a batch of 64 and at another position."""
    noise = registry.build("noise", name)
    full = draw(noise, torch.arange(64))
    for i in (0, 17, 63):
        assert torch.equal(draw(noise, [i])[0], full[i])
    moved = torch.tensor([63, 5, 17, 0, 40])
    assert torch.equal(draw(noise, moved), full[moved])


@pytest.mark.parametrize("name", ADDITIVE)
def test_deterministic_and_keyed_by_seed_and_draw(registry, name):
    """The same (seed, draw) gives the same numbers; another seed or draw different ones;
    float32 streams give the float64 numbers rounded (within float32 precision)."""
    noise = registry.build("noise", name)
    ids = torch.arange(32)
    a = draw(noise, ids)
    assert torch.equal(a, draw(noise, ids))
    assert not torch.equal(a, draw(noise, ids, seed=1))
    assert not torch.equal(a, draw(noise, ids, 1))
    assert (a != draw(noise, ids, seed=1)).float().mean() > 0.9  # not just one element differs
    single = draw(noise, ids, dtype=torch.float32)
    assert single.dtype == torch.float32
    assert torch.allclose(single.double(), a, rtol=4 * 2.0**-24, atol=4 * 2.0**-24)


# --------------------------------------------------------------------------------------
# gamma
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.5, 2.0])
def test_gamma_follows_the_standardised_gamma_distribution(registry, k):
    """For k = 0.5 (the u^(1/k) boost) and k = 2: E[eps^3] = skewness = 2 / sqrt(k) within Z
    standard errors sqrt((mu6 - mu3^2) / n) of the exact moments, and the empirical CDF is
    within the DKW bound of P(eps <= x) = P(g <= k + sqrt(k) x), the regularised lower
    incomplete gamma function."""
    noise = registry.build("noise", "gamma", k=k)
    z = draw(noise, torch.arange(8192), shape=(16,)).flatten()
    n = z.numel()
    mu = gamma_central_moments(k)
    assert mu[3] == pytest.approx(2 / math.sqrt(k))
    third = float((z**3).mean())
    assert abs(third - mu[3]) <= Z * math.sqrt((mu[6] - mu[3] ** 2) / n), (third, mu[3])

    def cdf(x):
        return torch.special.gammainc(torch.tensor(k, dtype=torch.float64), (k + math.sqrt(k) * x).clamp(min=0.0))

    assert z.min() >= -math.sqrt(k) - 1e-12  # g >= 0
    assert ks_distance(z, cdf) <= dkw_bound(n)


def test_gamma_rejects_a_negligible_share_and_the_boost_matters(registry):
    """A wrong recipe is visible: Gamma(k + 1) without the u^(1/k) boost, drawn from the
    same streams, is far outside the DKW bound of the k = 0.5 distribution (so the check
    above can fail); and one candidate is accepted with probability >= 0.95 (0.951 at the
    worst proposal shape a = 1, 0.973 at 1.5, 0.992 at 4), so 12 candidates leave <= 0.05^12
    of the elements to the fallback — none of the 32768 here."""
    k = 0.5
    boosted = registry.build("noise", "gamma", k=k)
    stream = NoiseStream(0, torch.arange(4096), (8,), stream=STREAM, dtype=torch.float64)
    unboosted = registry.build("noise", "gamma", k=k + 1.0).standard_gamma(stream, 0)
    z_wrong = (unboosted - k) / math.sqrt(k)

    def cdf(x):
        return torch.special.gammainc(torch.tensor(k, dtype=torch.float64), (k + math.sqrt(k) * x).clamp(min=0.0))

    assert ks_distance(z_wrong, cdf) > 10 * dkw_bound(z_wrong.numel())
    assert ks_distance(boosted.sample(stream, 0), cdf) <= dkw_bound(z_wrong.numel())
    for shape_k, least in [(1.0, 0.95), (0.5, 0.97), (4.0, 0.99)]:  # proposal shape a = 1, 1.5, 4
        noise = registry.build("noise", "gamma", k=shape_k)
        _, accepted = noise.proposals(noise._uniforms(stream, 0))
        n = accepted[:, 0].numel()
        rate = float(accepted[:, 0].double().mean())
        assert rate >= least - Z * math.sqrt(least * (1 - least) / n), (shape_k, rate)
        assert accepted.any(dim=1).all()  # no element needs the fallback


def test_gamma_parameters_are_validated(registry):
    with pytest.raises(fundiff.RecipeError, match="noise.k"):
        fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml"), registry, overrides={"noise.name": "gamma", "noise.k": 0})


# --------------------------------------------------------------------------------------
# gaussian-mixture
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{}, {"weights": [1.0, 3.0], "means": [0.0, 5.0], "stds": [1.0, 2.0]}],
    ids=["default", "rescaled"],
)
def test_mixture_matches_its_components(registry, params):
    """The empirical CDF is within the DKW bound of sum_j w_j Phi((x - mu_j) / s_j) for the
    (standardised) components, which have mean 0 and variance 1; an unstandardised mixture
    keeps its shape (the component means stay in the same ratio)."""
    noise = registry.build("noise", "gaussian-mixture", **params)
    w, mu, s = noise.components()
    assert float((w * mu).sum()) == pytest.approx(0.0, abs=1e-12)
    assert float((w * (mu**2 + s**2)).sum()) == pytest.approx(1.0, abs=1e-12)
    if params:
        assert float(w[1]) == pytest.approx(0.75)
        assert float((mu[1] - mu[0]) / s[0]) == pytest.approx(5.0)  # location and scale change, shape does not
    z = draw(noise, torch.arange(8192), shape=(16,)).flatten()

    def cdf(x):
        return (w * normal_cdf((x[:, None] - mu) / s)).sum(1)

    assert ks_distance(z, cdf) <= dkw_bound(z.numel())
    # and not a Gaussian with the same two moments
    assert ks_distance(z, normal_cdf) > 5 * dkw_bound(z.numel())


def test_mixture_moments_are_validated(registry):
    """standardize: false requires mean 0 and variance 1 as given; inconsistent lengths and
    non-positive weights are refused with the path of the section."""
    good = {"weights": [0.5, 0.5], "means": [-0.6, 0.6], "stds": [0.8, 0.8], "standardize": False}
    registry.build("noise", "gaussian-mixture", **good)
    recipe = os.path.join(RECIPES, "two-moons.yaml")
    bad = {"noise.name": "gaussian-mixture", "noise.standardize": False, "noise.means": [-1.0, 1.0], "noise.stds": [1.0, 1.0]}
    with pytest.raises(fundiff.RecipeError, match="variance 2"):
        fundiff.load_recipe(recipe, registry, overrides=bad)
    with pytest.raises(fundiff.RecipeError, match="one value per component"):
        fundiff.load_recipe(recipe, registry, overrides={"noise.name": "gaussian-mixture", "noise.stds": [1.0]})
    with pytest.raises(fundiff.RecipeError, match="weight must be"):
        fundiff.load_recipe(recipe, registry, overrides={"noise.name": "gaussian-mixture", "noise.weights": [1.0, 0.0]})


# --------------------------------------------------------------------------------------
# correlated
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho, axis", [(0.7, 1), (-0.4, -1)])
def test_correlated_has_lag_correlations_rho_to_the_lag(registry, rho, axis):
    """Along the axis, Corr(eps_j, eps_{j+h}) = rho^h; across the other axis, 0. With unit
    variances known, the estimate mean(X Y) of a correlation r over n independent pairs has
    standard error sqrt((1 + r^2) / n) (bivariate normal); every lag-1 pair is checked
    separately, so the pairs in one estimate are independent."""
    noise = registry.build("noise", "correlated", rho=rho, axis=axis)
    z = draw(noise, torch.arange(8192), shape=(3, 6))  # correlated along the 6
    n = z.shape[0] * z.shape[1]
    for j in range(5):
        r = float((z[:, :, j] * z[:, :, j + 1]).mean())
        assert abs(r - rho) <= Z * math.sqrt((1 + rho**2) / n), (j, r)
    r2 = float((z[:, :, 1] * z[:, :, 3]).mean())
    assert abs(r2 - rho**2) <= Z * math.sqrt((1 + rho**4) / n), r2
    across = float((z[:, 0, :] * z[:, 1, :]).mean())
    assert abs(across) <= Z * math.sqrt(1 / (z.shape[0] * 6)), across
    variance = (z**2).mean((0, 1))  # per position along the axis: stationary, 1
    assert ((variance - 1).abs() <= Z * math.sqrt(2 / n)).all(), variance


def test_correlated_mixing_matrix_gives_the_ar1_covariance(registry):
    """L L^T is the AR(1) covariance rho^|i - j| (exactly, up to rounding)."""
    for rho in (0.0, 0.9, -0.5):
        mixing = registry.build("noise", "correlated", rho=rho).mixing_matrix(7)
        i = torch.arange(7, dtype=torch.float64)
        expected = torch.tensor(rho, dtype=torch.float64) ** (i[:, None] - i[None, :]).abs()
        assert torch.allclose(mixing @ mixing.T, expected, atol=1e-14)


def test_correlated_axis_must_exist(registry):
    with pytest.raises(fundiff.RecipeError, match="axis 2"):
        fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml"), registry, overrides={"noise.name": "correlated", "noise.axis": 2})
    with pytest.raises(ValueError, match="out of range"):
        draw(registry.build("noise", "correlated", axis=3), [0])


# --------------------------------------------------------------------------------------
# gaussian-diagonal
# --------------------------------------------------------------------------------------


def test_gaussian_diagonal_per_dimension_variances(registry):
    """Given scales s: variance s_d^2 per dimension (normalize: false), or s_d^2 / mean(s^2)
    (normalize: true), within Z standard errors s_d^2 sqrt(2 / n) (Gaussian elements)."""
    scales = [0.25, 0.5, 1.0, 2.0, 3.0, 0.1]
    n = 16384
    for normalize in (False, True):
        noise = registry.build("noise", "gaussian-diagonal", scales=scales, normalize=normalize)
        z = draw(noise, torch.arange(n), shape=(2, 3))
        expected = torch.tensor(scales, dtype=torch.float64) ** 2
        if normalize:
            expected = expected / expected.mean()
        variance = (z**2).mean(0).flatten()
        assert ((variance - expected).abs() <= Z * expected * math.sqrt(2 / n)).all(), (variance, expected)
        assert (z.mean(0).flatten().abs() <= Z * expected.sqrt() / math.sqrt(n)).all()


def test_gaussian_diagonal_from_data(registry):
    """bind(data) estimates the per-dimension std, normalised to mean variance 1 and floored
    at min_scale times its RMS; the pipeline binds it; unbound, it refuses to draw."""
    noise = registry.build("noise", "gaussian-diagonal", from_data=True)
    assert type(noise).needs_data
    with pytest.raises(ValueError, match="bound to the data"):
        draw(noise, [0], shape=(3,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 3, generator=g) * torch.tensor([3.0, 1.0, 0.0]) + 7.0
    bound = noise.bind(Data(x=x, spec=DataSpec(shape=(3,))))
    assert not bound.from_data and bound.bind(None) is bound
    s = bound.scale_tensor((3,))
    std = x.double().std(0)
    rms = std.square().mean().sqrt()
    expected = std.clamp(min=noise.min_scale * rms)
    expected = expected / expected.square().mean().sqrt()
    assert torch.allclose(s, expected, rtol=1e-12)
    assert float(s.square().mean()) == pytest.approx(1.0, rel=1e-12)
    assert float(s[2]) > 0  # the constant dimension still gets noise

    recipe = fundiff.load_recipe(
        os.path.join(RECIPES, "two-moons.yaml"),
        registry,
        overrides={"data.standardize": False, "noise.name": "gaussian-diagonal", "noise.from_data": True},
    )
    pipeline = fundiff.Pipeline(recipe)
    data_std = pipeline.data.x.double().std(0)
    scales = pipeline.noise.scale_tensor((2,))
    assert torch.allclose(scales, data_std / data_std.square().mean().sqrt(), rtol=1e-6)
    assert abs(float(scales[0] - scales[1])) > 0.1  # the moons are wider than tall


def test_gaussian_diagonal_scales_must_fit_the_data(registry):
    recipe = os.path.join(RECIPES, "two-moons.yaml")
    with pytest.raises(fundiff.RecipeError, match="3 scales"):
        fundiff.load_recipe(recipe, registry, overrides={"noise.name": "gaussian-diagonal", "noise.scales": [1, 2, 3]})
    with pytest.raises(fundiff.RecipeError, match="not both"):
        fundiff.load_recipe(
            recipe, registry, overrides={"noise.name": "gaussian-diagonal", "noise.scales": [1, 2], "noise.from_data": True}
        )


# --------------------------------------------------------------------------------------
# pyramid
# --------------------------------------------------------------------------------------


def _pyramid_correlation(noise, height: int, width: int) -> torch.Tensor:
    """The exact (H W x H W) correlation of pyramid noise, built independently of the
    module's separable variance formula: each level's 2-D upsampling applied to one-hot
    images gives its matrix A_i; the covariance is sum_i discount^(2 i) A_i A_i^T."""
    cov = torch.zeros(height * width, height * width, dtype=torch.float64)
    for i, (h, w) in enumerate(noise.level_sizes(height, width)):
        basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
        if (h, w) != (height, width):
            options = {"align_corners": False} if noise.mode == "bilinear" else {}
            basis = F.interpolate(basis, size=(height, width), mode=noise.mode, **options)
        a = basis.reshape(h * w, height * width).T
        cov += noise.discount ** (2 * i) * a @ a.T
    d = cov.diagonal().sqrt()
    return cov / d[:, None] / d[None, :]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_pyramid_is_unit_variance_with_the_exact_pixel_correlations(registry, mode):
    """Per pixel variance 1 (Z sqrt(2 / n)); neighbour correlations equal the exact ones of
    the upsampling pyramid within Z sqrt((1 + r^2) / n); with discount 0 the pixels are
    independent."""
    noise = registry.build("noise", "pyramid", mode=mode)
    z = draw(noise, torch.arange(4096), shape=(2, 8, 8)).reshape(-1, 64)  # channels are independent pyramids
    n = z.shape[0]
    assert (((z**2).mean(0) - 1).abs() <= Z * math.sqrt(2 / n)).all()
    exact = _pyramid_correlation(noise, 8, 8)
    for p, q in [(0, 1), (9, 10), (9, 18), (27, 36), (0, 63)]:
        r = float(exact[p, q])
        estimate = float((z[:, p] * z[:, q]).mean())
        assert abs(estimate - r) <= Z * math.sqrt((1 + r * r) / n), (p, q, estimate, r)
    # real low-frequency content: neighbours correlate by about 0.5, opposite corners by the
    # shared 1 x 1 level alone, discount^(2 L) / (sum of the level weights) ~ 0.11 for 8 x 8
    assert float(exact[0, 1]) > 0.5 and float(exact[0, 63]) > 0.1
    white = draw(registry.build("noise", "pyramid", discount=0.0), torch.arange(4096), shape=(1, 8, 8)).reshape(-1, 64)
    assert abs(float((white[:, 9] * white[:, 10]).mean())) <= Z / math.sqrt(4096)


def test_pyramid_refuses_non_image_data(registry):
    with pytest.raises(fundiff.RecipeError, match="needs image data"):
        fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml"), registry, overrides={"noise.name": "pyramid"})
    with pytest.raises(ValueError, match="two"):
        draw(registry.build("noise", "pyramid"), [0], shape=(5,))


# --------------------------------------------------------------------------------------
# offset
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_offset_noise_shares_one_offset_per_channel(registry, normalize):
    """strength 1: pixels of one channel have covariance strength^2 (/ (1 + strength^2)
    normalised), channels are independent; the variance is 1 normalised, else 1 +
    strength^2. Standard errors of mean(X Y) for bivariate normals: sqrt((v^2 + c^2) / n)."""
    strength = 1.0
    noise = registry.build("noise", "offset", strength=strength, normalize=normalize)
    z = draw(noise, torch.arange(8192), shape=(3, 4, 4)).reshape(8192, 3, 16)
    n = z.shape[0]
    v = noise.variance
    assert v == (1.0 if normalize else 2.0)
    c = strength**2 / (1 + strength**2) if normalize else strength**2
    assert ((((z**2).mean(0)) - v).abs() <= Z * v * math.sqrt(2 / n)).all()
    same = float((z[:, 1, 0] * z[:, 1, 5]).mean())
    assert abs(same - c) <= Z * math.sqrt((v * v + c * c) / n), same
    other = float((z[:, 0, 3] * z[:, 2, 3]).mean())
    assert abs(other) <= Z * v / math.sqrt(n), other


# --------------------------------------------------------------------------------------
# End to end: non-Gaussian noise learns two-moons
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recipe_file", ["two-moons-gamma.yaml", "two-moons-mixture-noise.yaml"])
def test_non_gaussian_noise_learns_two_moons(tmp_path, registry, recipe_file):
    """A 1500-step run with gamma (resp. mixture) noise, sampled with DDPM and with DDIM
    (both drawing the recipe's noise type for the prior; DDPM also for every step).

    Statistic: the sliced Wasserstein-2 distance (256 projections) between 2000 samples and
    2000 held-out data points. Bounds, as for the Gaussian run in test_training.py: under 3
    times the floor between two disjoint data draws of the same size, and under half the
    distance of a moment-matched Gaussian (same mean and per-dimension std as the data).

    The 3x bound is tight for any noise at this training length: over training seeds 0, 1, 2
    (measured with one torch thread) DDIM's 30-step samples measured 2.5x, 2.3x and 3.1x the
    floor with this gamma recipe and 2.0x and 2.7x (seeds 0, 1) with Gaussian noise; seed 0
    is the one tested. The Gaussian-factor bound has a wide margin (about 0.2x measured)."""
    recipe = fundiff.load_recipe(os.path.join(RECIPES, recipe_file), registry).to_dict()
    recipe["denoiser"].update(width=96, depth=2)
    recipe["train"].update(steps=1500, batch_size=256, lr=3e-3, ema=0.99)
    n = 2000
    pipeline = fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)
    data = pipeline.data.x.double()
    held_a, held_b = data[:n], data[n : 2 * n]
    floor = sliced_wasserstein(held_a, held_b)
    generator = torch.Generator().manual_seed(0)
    gaussian = held_b.mean(0) + held_b.std(0) * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    sw_gaussian = sliced_wasserstein(gaussian, held_a)
    for sampler in ("ddpm", "ddim"):
        overrides = {"sampler.name": sampler, "sampler.steps": 30}
        samples, _ = fundiff.sample(tmp_path / "run", registry=registry, overrides=overrides, num_samples=n, seed=3)
        sw = sliced_wasserstein(samples.double(), held_a)
        assert sw < 3 * floor, (sampler, sw, floor)
        assert sw < 0.5 * sw_gaussian, (sampler, sw, sw_gaussian)
