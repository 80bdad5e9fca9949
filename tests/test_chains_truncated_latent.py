"""The `truncated` and `latent` chains (survey sec. 3.2.1 and 3.2.3).

truncated: EM in float64 (monotone objective, recovery of a known mixture), the sampling grid
cut at the truncation level with fewer denoiser evaluations, oracle sampling as good as the
full chain's, per-sample randomness, checkpoints, resume, the training-level clip, refusals
and the shipped recipe end to end.

latent: autoencoder reconstruction of held-out data, unit-scale codes, the shipped recipe
end to end (autoencoder, then diffusion on codes, then decoding), resume and refusals.
"""

from __future__ import annotations

import math
import os

import attrs
import pytest
import torch
from helpers import RECIPES, oracle_recipe, sliced_wasserstein
from torch import nn

import fundiff
from fundiff.checkpoint import load_checkpoint
from fundiff_plugins.chains import _generators
from fundiff_plugins.chains._generators import MixtureGenerator, fit_gaussian_mixture
from fundiff_plugins.chains.truncated import Truncated
from fundiff_plugins.denoisers._autoencoder import Autoencoder

CUT = 0.0  # truncation logSNR of the oracle tests (37 of the linear schedule's 50 DDIM steps are noisier)

#: the recipes' networks and training shrunk to test size (600 steps of 64-wide, 2-block MLPs)
TEST_SIZE = {
    "denoiser.width": 64,
    "denoiser.depth": 2,
    "train.steps": 600,
    "train.lr": 3e-3,
    "train.ema": 0.99,
    "train.warmup": 50,
    "sampler.steps": 20,
}


def _oracle(chain: dict | str, steps: int = 50) -> dict:
    return oracle_recipe(chain=chain, sampler={"name": "ddim", "steps": steps})


def _truncated(**params) -> dict:
    return {"name": "truncated", "truncate_logsnr": CUT, "components": 8, "fit_samples": 10000, **params}


def _tiny_vae() -> dict:
    return _truncated(generator="vae", vae_steps=30, vae_width=16, vae_batch_size=64)


class CountingModel(nn.Module):
    """Counts forward calls (denoiser evaluations) of the wrapped network."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def oracle_runs(tmp_path_factory, registry) -> dict:
    """`fundiff train` of the oracle recipe with the vp, truncated-gmm and truncated-vae chains
    (the oracle needs no training: train fits the chain and writes the checkpoint)."""
    runs = {}
    for name, chain in (("vp", "vp"), ("gmm", _truncated()), ("vae", _tiny_vae())):
        run_dir = tmp_path_factory.mktemp(f"oracle-{name}")
        runs[name] = (run_dir, fundiff.train(_oracle(chain), run_dir, quiet=True, registry=registry))
    return runs


# ----------------------------------------------------------------------------- EM


def _known_mixture(n: int):
    """N points from a 3-component 2-D mixture with full covariances, float64 (a fixed generator)."""
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
    covariances = torch.tensor(
        [[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 0.8]], [[0.4, 0.0], [0.0, 0.9]]], dtype=torch.float64
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.multinomial(weights, n, replacement=True, generator=generator)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = means[labels] + (torch.linalg.cholesky(covariances)[labels] @ z[:, :, None])[:, :, 0]
    return x, weights, means, covariances


@pytest.mark.parametrize("covariance, floor", [("full", 0.0), ("full", 1e-3), ("diagonal", 1e-3)])
def test_em_never_decreases_its_objective(covariance, floor):
    """EM's monotonicity (Dempster et al. 1977; Bishop 2006, sec. 9.4): every iteration's
    objective (mean log-likelihood, minus the floor's prior term when floor > 0) is at least
    the previous one's, up to float64 rounding of a mean of N log-densities (1e-12 relative).
    With floor = 0 the objective is the plain log-likelihood, so that rises too."""
    x, *_ = _known_mixture(4000)
    # tolerance -inf: all 60 iterations run, well past convergence (where steps are rounding)
    fit = fit_gaussian_mixture(x, 3, covariance=covariance, iterations=60, tolerance=-math.inf, covariance_floor=floor, seed=1)
    steps = torch.tensor(fit.objective).diff()
    assert fit.iterations == 60 and len(fit.objective) == 60
    assert (steps >= -1e-12 * abs(fit.objective[0])).all(), steps.min()
    assert fit.objective[-1] > fit.objective[0] + 0.1  # it moved from the k-means++ start
    if floor == 0.0:
        assert fit.objective == fit.log_likelihood


def test_em_recovers_a_known_mixture_within_sampling_error():
    """With N = 20000 points, the EM estimates of a well-separated 3-component mixture are
    the per-component sample moments up to a vanishing overlap, so they sit within 5 standard
    errors of the truth: weights sqrt(pi (1 - pi) / N), mean coordinates sqrt(Sigma_ii / N_k),
    covariance entries sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / N_k) (Gaussian sample moments)."""
    n = 20000
    x, weights, means, covariances = _known_mixture(n)
    fit = fit_gaussian_mixture(x, 3, covariance="full", iterations=200, covariance_floor=0.0, seed=0)
    order = torch.cdist(means, fit.means).argmin(1)  # match each true component to its estimate
    assert sorted(order.tolist()) == [0, 1, 2]
    counts = weights * n
    var = torch.diagonal(covariances, dim1=1, dim2=2)
    se_weights = (weights * (1 - weights) / n).sqrt()
    se_means = (var / counts[:, None]).sqrt()
    se_cov = ((var[:, :, None] * var[:, None, :] + covariances**2) / counts[:, None, None]).sqrt()
    assert ((fit.weights[order] - weights).abs() <= 5 * se_weights).all(), (fit.weights[order], weights)
    assert ((fit.means[order] - means).abs() <= 5 * se_means).all(), (fit.means[order], means)
    assert ((fit.covariances[order] - covariances).abs() <= 5 * se_cov).all(), (fit.covariances[order], covariances)


def test_mixture_generator_samples_have_the_fitted_moments():
    """Draws from the fitted generator (component by uniform, then mu_k + L_k z) have the
    mixture's mean and covariance, sum_k pi_k mu_k and sum_k pi_k (Sigma_k + mu_k mu_k^T) -
    mean mean^T, within 5 standard errors (n = 20000 draws)."""
    x, *_ = _known_mixture(20000)
    generator = MixtureGenerator(3, 2, "full")
    generator.fit(x, iterations=100, tolerance=1e-10, covariance_floor=0.0, seed=0, stream=7)
    n = 20000
    ids = torch.arange(n)
    u = fundiff.rng.uniform(5, 1000, 0, ids)
    draws = generator.sample(u, lambda count: fundiff.rng.normal(5, 1000, 1, ids, (count,)))
    w = torch.exp(generator.log_weights)
    mean = (w[:, None] * generator.means).sum(0)
    cov_k = generator.scales @ generator.scales.transpose(1, 2)
    second = (w[:, None, None] * (cov_k + generator.means[:, :, None] * generator.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    assert ((draws.mean(0) - mean).abs() <= 5 * (torch.diagonal(cov) / n).sqrt()).all()
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(draws.T) - cov).abs() <= 5 * se_cov * 2).all()  # x2: mixtures have heavier tails than a Gaussian


def test_fitted_mixture_matches_the_exact_marginal_at_the_cut(oracle_runs):
    """For mixture data the marginal at the cut is exact: sum_k pi_k N(alpha mu_k, (alpha^2
    s_k^2 + sigma^2) I). The Monte Carlo KL(exact || fitted) over M = 20000 exact draws must be
    below 2 p / (2 N) + 4 standard errors, where p / (2 N) is the expected KL of a maximum-
    likelihood fit with p = 47 free parameters (8 components in 2-D, full covariance) from
    N = 10000 points (Akaike's asymptotics). N(0, I), the untruncated prior, scores 0.15 there."""
    pipeline = oracle_runs["gmm"][1]
    weights, means, stds = pipeline.data_set.mixture()
    level = pipeline.chain.level(CUT)
    m = 20000
    x0, _ = pipeline.data_set.draw(m, seed=77)
    x = level.alpha * x0 + level.sigma * fundiff.rng.normal(77, 1000, 0, torch.arange(m), (2,))
    variances = (level.alpha**2 * stds**2 + level.sigma**2)[:, None].expand(-1, 2)
    log_exact = torch.logsumexp(torch.log(weights) + _generators._component_log_densities(x, level.alpha * means, variances), 1)
    gap = log_exact - pipeline.chain.generator.log_density(x)
    params, n = 8 * (2 + 3) + 7, 10000
    bound = 2 * params / (2 * n) + 4 * float(gap.std()) / math.sqrt(m)
    assert float(gap.mean()) < bound, (float(gap.mean()), bound)
    standard = -0.5 * (2 * math.log(2 * math.pi) + (x**2).sum(1))
    assert float((log_exact - standard).mean()) > 20 * bound  # the check can tell a wrong start apart


# ----------------------------------------------------------------------------- sampling


def test_sampling_starts_at_the_cut_and_evaluates_the_denoiser_less(oracle_runs):
    """The truncated grid begins exactly at the cut and keeps only the spacing's levels less
    noisy than it; DDIM (one evaluation a step) then calls the denoiser once per remaining
    step, fewer than the full chain's 50, and `sampling_note` reports the steps skipped."""
    full = oracle_runs["vp"][1]
    truncated = oracle_runs["gmm"][1]
    grid = truncated.levels(through_chain=False)
    cut = truncated.levels()
    assert cut[0].logsnr == CUT and cut[0].chain is truncated.chain
    assert [lvl.logsnr for lvl in cut[1:]] == [lvl.logsnr for lvl in grid if lvl.logsnr > CUT]
    counts = {}
    for name, pipeline in (("full", full), ("truncated", truncated)):
        pipeline.model = CountingModel(pipeline.model)
        try:
            pipeline.sample(16, seed=0)
            counts[name] = pipeline.model.calls
        finally:
            pipeline.model = pipeline.model.inner
    skipped = len(grid) - len(cut)
    assert counts == {"full": 50, "truncated": 50 - skipped} and skipped >= 20
    assert truncated.sampling_note() == (
        f"truncated chain: started at logSNR {CUT:g} from the gmm generator, {skipped} of 50 steps skipped"
    )
    assert full.sampling_note() is None


def test_fundiff_sample_prints_the_steps_saved(oracle_runs, tmp_path, capsys):
    """`fundiff sample` on a truncated run says where it started and how many steps it
    skipped (on stderr: stdout stays the list of written files)."""
    from fundiff.cli import main

    run_dir, pipeline = oracle_runs["gmm"]
    skipped = len(pipeline.levels(through_chain=False)) - len(pipeline.levels())
    assert main(["sample", str(run_dir), "-n", "4", "--no-plot", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr()
    assert f"truncated chain: started at logSNR {CUT:g} from the gmm generator, {skipped} of 50 steps skipped" in out.err
    assert "truncated chain" not in out.out


@pytest.mark.parametrize("generator", ["gmm", "vae"])
def test_truncated_oracle_samples_are_as_close_to_the_data_as_the_full_chains(oracle_runs, generator):
    """With the exact denoiser on the 8-mode ring, the only error the cut adds is the
    generator's misfit at the cut: its samples must be within the two-sample noise floor
    (sliced Wasserstein-2 between two independent data draws of the same size) of the full
    chain's distance to held-out data. The 8-component mixture is the exact family there
    (a GMM stays a GMM under the Gaussian chain), the 30-step VAE an approximation. Measured
    (n = 4000): full 0.105, gmm 0.155, vae 0.114, floor 0.089: W2 weighs the little mass a
    near-perfect fit (KL 0.001 nats, see above) puts in the wrong mode by the modes' distance."""
    n = 4000
    full = oracle_runs["vp"][1]
    truncated = oracle_runs[generator][1]
    held_a, _ = full.data_set.draw(n, seed=101)
    held_b, _ = full.data_set.draw(n, seed=102)
    floor = sliced_wasserstein(held_a, held_b)
    sw_full = sliced_wasserstein(full.sample(n, seed=0)[0].double(), held_a)
    sw_truncated = sliced_wasserstein(truncated.sample(n, seed=0)[0].double(), held_a)
    assert sw_truncated <= sw_full + floor, (sw_truncated, sw_full, floor)


@pytest.mark.parametrize("generator", ["gmm", "vae"])
def test_sample_i_does_not_depend_on_the_batch(oracle_runs, generator):
    """The generator's component choice and normals come from sample i's own uniforms, so
    samples 5..7 drawn alone equal rows 5..7 of a batch of 8 (bit for bit)."""
    pipeline = oracle_runs[generator][1]
    together, _ = pipeline.sample(8, seed=4, batch_size=8)
    alone, _ = pipeline.sample(3, seed=4, start=5, batch_size=2)
    assert torch.equal(together[5:], alone)
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("generator", ["gmm", "vae"])
def test_checkpoint_round_trip_samples_identically(oracle_runs, registry, generator):
    """The generator's fitted state is in the checkpoint under `chain.`; a run loaded from
    its directory (a fresh, unfitted module filled from the file) samples exactly as the
    pipeline that fitted it."""
    run_dir, pipeline = oracle_runs[generator]
    tensors, _ = load_checkpoint(str(run_dir / "checkpoint.safetensors"))
    assert bool(tensors["chain.fitted"]) and any(k.startswith("chain.generator.") for k in tensors)
    loaded = fundiff.load_run(run_dir, registry=registry)
    assert bool(loaded.chain.fitted)
    assert torch.equal(loaded.sample(32, seed=9)[0], pipeline.sample(32, seed=9)[0])


def test_unfitted_generator_is_refused_with_the_fix(registry):
    recipe = fundiff.load_recipe(_oracle(_truncated()), registry)
    with pytest.raises(fundiff.FundiffError, match="generator is not fitted; train the recipe"):
        fundiff.Pipeline(recipe).sample(2)


def test_training_levels_are_clipped_to_the_cut(registry):
    """The weighting's draws noisier than the cut are moved onto it (lambda -> max(lambda,
    cut)); the others are unchanged."""
    pipeline = fundiff.Pipeline(fundiff.load_recipe(_oracle(_truncated()), registry))
    u = fundiff.rng.uniform(0, fundiff.rng.STREAM_TRAIN_LEVEL, 3, torch.arange(512))
    drawn = pipeline.weighting.draw(u, pipeline.schedule)[0].to(torch.float64)
    clipped = pipeline.training_logsnr(3, 512)
    assert (drawn < CUT).any() and (drawn > CUT).any()
    assert torch.equal(clipped, torch.where(drawn < CUT, torch.full_like(drawn, CUT), drawn))


# ----------------------------------------------------------------------------- training runs


def _tiny_trainable(chain: dict, **train) -> dict:
    return {
        "data": {"name": "two-moons", "n": 2000},
        "chain": chain,
        "schedule": "cosine",
        "noise": "gaussian",
        "denoiser": {"name": "mlp", "width": 16, "depth": 1},
        "parameterization": "v",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": 10},
        "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, **train},
    }


@pytest.mark.parametrize(
    "chain, fit",
    [
        ({"name": "truncated", "truncate_logsnr": 0.0, "components": 4, "fit_samples": 1000}, (MixtureGenerator, "fit")),
        (
            {"name": "latent", "autoencoder": {"name": "mlp-autoencoder", "width": 16, "steps": 20, "batch_size": 32}},
            (Autoencoder, "fit"),
        ),
    ],
    ids=["truncated", "latent"],
)
def test_resume_skips_the_fit_and_continues_exactly(tmp_path, registry, monkeypatch, chain, fit):
    """6 steps straight equal 3 steps, a stop and a resume to 6, bit for bit (chain state
    included); on resume the chain's fit does not run again (it would raise here)."""
    fundiff.train(_tiny_trainable(chain), tmp_path / "straight", quiet=True, registry=registry)
    fundiff.train(_tiny_trainable(chain, steps=3), tmp_path / "resumed", quiet=True, registry=registry)

    def refuse(*args, **kwargs):
        raise AssertionError("the chain was fitted again on resume")

    monkeypatch.setattr(*fit, refuse)
    fundiff.train(_tiny_trainable(chain), tmp_path / "resumed", resume=True, quiet=True, registry=registry)
    a, _ = load_checkpoint(str(tmp_path / "straight" / "checkpoint.safetensors"))
    b, _ = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("chain.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def _quality(pipeline, samples: torch.Tensor) -> tuple[float, float]:
    """(SW-2 of samples to held-out data, SW-2 of a moment-matched Gaussian to it)."""
    data = pipeline.data.x.double()
    n = samples.shape[0]
    held = data[:n]
    gaussian = data[n : 2 * n].mean(0) + data[n : 2 * n].std(0) * torch.randn(
        n, data.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    return sliced_wasserstein(samples.double(), held), sliced_wasserstein(gaussian, held)


@pytest.mark.slow
def test_truncated_recipe_trains_and_samples_close_to_the_data(tmp_path, registry):
    """recipes/truncated.yaml at test size (600 steps of a 64-wide MLP instead of 3000 of a
    128-wide one): the samples' sliced Wasserstein-2 distance to held-out data is under half
    a moment-matched Gaussian's, and sampling skips the grid's steps noisier than logSNR 0."""
    overrides = dict(TEST_SIZE)
    pipeline = fundiff.train(
        os.path.join(RECIPES, "truncated.yaml"), tmp_path / "run", quiet=True, registry=registry, overrides=overrides
    )
    samples, _ = fundiff.sample(tmp_path / "run", registry=registry, num_samples=1000, seed=3)
    sw_samples, sw_gaussian = _quality(pipeline, samples)
    assert sw_samples < 0.5 * sw_gaussian, (sw_samples, sw_gaussian)
    assert len(pipeline.levels()) < len(pipeline.levels(through_chain=False))


# ----------------------------------------------------------------------------- latent


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, registry):
    """recipes/latent.yaml at test size: a 600-step, 64-wide autoencoder, then 600 steps of a
    64-wide denoiser on its codes."""
    overrides = {
        "chain.autoencoder": {"name": "mlp-autoencoder", "latent_dim": 2, "width": 64, "depth": 2, "steps": 600},
        **TEST_SIZE,
    }
    run_dir = tmp_path_factory.mktemp("latent")
    pipeline = fundiff.train(os.path.join(RECIPES, "latent.yaml"), run_dir, quiet=True, registry=registry, overrides=overrides)
    return run_dir, pipeline


@pytest.mark.slow
def test_autoencoder_reconstructs_held_out_data_and_codes_have_unit_scale(latent_run, registry):
    """On 4000 held-out two-moons points (another seed of the data set), the reconstruction
    RMSE per coordinate is under 0.05 (5% of the data's unit standard deviation); the scaled
    codes of the training data have standard deviation 1 (the scale is 1 / their std, so
    within float64 rounding) and the held-out codes within 5% of it."""
    _, pipeline = latent_run
    chain = pipeline.chain
    assert state_shape(pipeline) == (2,)
    held = registry.build("data", "two-moons", n=4000, seed=1).load().x
    reconstruction = chain.decode(chain.encode(held))
    rmse = float(((reconstruction - held) ** 2).mean().sqrt())
    assert rmse < 0.05, rmse
    train_codes = chain.encode(pipeline.data.x).double()
    assert abs(float(train_codes.flatten().std()) - 1.0) < 1e-5
    assert abs(float(chain.encode(held).double().flatten().std()) - 1.0) < 0.05
    assert chain.losses[-1] < 0.1 * chain.losses[0]


def state_shape(pipeline) -> tuple[int, ...]:
    return tuple(pipeline.state_spec.shape)


@pytest.mark.slow
def test_latent_recipe_samples_decoded_points_close_to_the_data(latent_run, registry):
    """The diffusion model trained on codes, sampled and decoded: the points' sliced
    Wasserstein-2 distance to held-out data is under half a moment-matched Gaussian's. The
    loaded run (autoencoder and scale from the checkpoint) samples the same points."""
    run_dir, pipeline = latent_run
    samples, _ = pipeline.sample(1000, seed=3)
    assert samples.shape == (1000, 2)
    sw_samples, sw_gaussian = _quality(pipeline, samples)
    assert sw_samples < 0.5 * sw_gaussian, (sw_samples, sw_gaussian)
    loaded, _ = fundiff.sample(run_dir, registry=registry, num_samples=1000, seed=3)
    assert torch.equal(loaded, samples)


# ----------------------------------------------------------------------------- refusals


@attrs.frozen(kw_only=True)
class _NotGaussian(fundiff.Chain):
    """A chain whose state is categorical (declares no Gaussian marginals)."""

    provides = frozenset({fundiff.components.CATEGORICAL_STATE})

    def alpha_sigma(self, logsnr):
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def level(self, logsnr):
        return fundiff.Level(logsnr=logsnr, alpha=1.0, sigma=0.0 if logsnr == math.inf else 1.0)

    def prior(self, level, noise):
        return noise


def _problems(recipe: dict, registry) -> str:
    with pytest.raises(fundiff.RecipeError) as info:
        fundiff.load_recipe(recipe, registry)
    return str(info.value)


def test_incompatible_recipes_are_refused_with_the_fix(registry):
    """truncated: a non-Gaussian inner chain, an inner chain with fitted state, a cut outside
    the schedule, a conditional denoiser; latent: a closed-form denoiser, an image network on
    code vectors, a noise estimated from the data's elements; the autoencoder as a recipe's denoiser."""
    components = fundiff.load_recipe(_oracle(_truncated()), registry).components
    (message,) = Truncated(inner=_NotGaussian()).check_recipe(dict(components))
    assert "requires 'gaussian-marginals'" in message and "use inner: vp" in message
    assert "inner chain Latent fits its own" in _problems(_oracle(_truncated(inner={"name": "latent"})), registry)
    assert "outside the schedule's range" in _problems(_oracle(_truncated(truncate_logsnr=30.0)), registry)
    conditional = _oracle(_truncated())
    conditional["denoiser"] = {"name": "gmm-oracle", "conditional": True}
    assert "set the denoiser's conditional: false" in _problems(conditional, registry)

    latent = {"name": "latent", "autoencoder": {"name": "mlp-autoencoder", "latent_dim": 3}}
    assert "use a trainable denoiser such as mlp" in _problems(_oracle(latent), registry)
    digits = {
        "data": {"name": "digits"},
        "chain": latent,
        "schedule": "cosine",
        "noise": "gaussian",
        "denoiser": {"name": "unet"},
        "parameterization": "eps",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": "ddim",
    }
    message = _problems(digits, registry)
    assert "chain 'latent' gives the denoiser codes of shape (3) instead of the data: denoiser 'unet'" in message
    noise = {"name": "gaussian-diagonal", "from_data": True}
    assert "use noise: gaussian" in _problems({**digits, "denoiser": "mlp", "noise": noise}, registry)
    assert "nest it as chain: {name: latent" in _problems(_oracle("vp") | {"denoiser": "mlp-autoencoder"}, registry)


def test_the_generators_probit_is_finite_at_float32_extremes():
    """Uniforms in float32 can round up to 1.0; the probit clamps them (5.3 sigma at most)."""
    u = torch.tensor([0.5 / 2**32, 0.5, 1.0 - 2**-24, 1.0], dtype=torch.float32)
    z = _generators.probit(u)
    assert torch.isfinite(z).all() and z[1] == 0.0 and float(z.abs().max()) < 6.5
