"""Guidance mechanisms: vanilla, cfg, cfg-pp, apg, autoguidance, classifier.

The exact denoiser of a Gaussian mixture (``gmm-oracle`` with ``conditional: true``) gives
both the exact conditional prediction E[x0 | x_t, y] and, with the null label -1, the exact
unconditional one E[x0 | x_t], in float64 and with no training; most identities below are
checked against it. Two slow tests train small models on the 2-D ring (a conditional MLP
with condition dropout, a noise-aware classifier) to show that guidance does what it is for.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fundiff
from fundiff import Level
from fundiff.pipeline import make_denoise, make_predict
from fundiff.testing import U, logsnrs, seeds
from fundiff_plugins.guidances import classifier as classifier_module
from helpers import oracle_recipe

MODES = 8
#: std 0.5 on a radius-2 ring: neighbouring modes (1.53 apart) overlap, so even exact
#: conditional samples land nearer another mode ~9% of the time and guidance has room to act
OVERLAP = {"name": "gmm", "modes": MODES, "radius": 2.0, "std": 0.5}
CONDITIONAL = {"name": "gmm-oracle", "conditional": True}
#: guidances that need files (a run, a classifier) and are tested on their own below
NEEDS_FILES = {"autoguidance", "classifier"}
VP = fundiff.Registry.discover().build("chain", "vp")


def pipeline(registry, **sections) -> fundiff.Pipeline:
    return fundiff.Pipeline(fundiff.load_recipe(oracle_recipe(**sections), registry))


def conditional_pipeline(registry, guidance, **sections) -> fundiff.Pipeline:
    sections.setdefault("data", OVERLAP)
    return pipeline(registry, denoiser=CONDITIONAL, guidance=guidance, **sections)


def start_points(seed: int, n: int, level: Level) -> torch.Tensor:
    """Points of the noisy marginal's scale at ``level`` (data of radius ~2), float64."""
    z = fundiff.rng.normal(seed, 1000, 0, torch.arange(n), (2,))
    return level.alpha * 2.0 * z + level.sigma * z.flip(1)


def mode_fraction(samples: torch.Tensor, means: torch.Tensor, labels) -> float:
    """Fraction of samples whose nearest mode is the requested one."""
    return float((torch.cdist(samples.double(), means).argmin(1) == labels).double().mean())


class Counting(torch.nn.Module):
    """Wraps a denoiser network and records the batch size of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batches: list[int] = []

    def forward(self, x, logsnr, cond=None):
        self.batches.append(x.shape[0])
        return self.model(x, logsnr, cond)


# ------------------------------------------------------------------ conformance


def guidance_names(registry) -> list[str]:
    return registry.names("guidance")


def test_every_registered_guidance_is_covered(registry):
    """Each built-in guidance is either in the conformance test below or tested with its
    files (run directory, classifier) further down; a new one cannot slip through."""
    names = set(guidance_names(registry))
    assert {"none", "vanilla", "cfg", "cfg-pp", "apg"} | NEEDS_FILES <= names


@pytest.mark.parametrize("name", ["none", "vanilla", "cfg", "cfg-pp", "apg"])
def test_guidance_conformance(registry, name):
    """The guidance contract, with the exact conditional denoiser (float64):

    * the result is finite, float64, shaped like x; x is not modified;
    * every predict call gets a fundiff.Level, and labels of the batch it is given;
    * sample i's result does not depend on the batch around it (per-sample guidance);
    * when the condition carries no information (the model ignores it), every mechanism
      that extrapolates between conditional and unconditional predictions returns the
      prediction itself: all their updates are multiples of x0_c - x0_u = 0.
    Tolerance: a handful of float64 roundings of the O(1) predictions (ROUNDINGS-free: 64 U)."""
    p = conditional_pipeline(registry, name)
    guidance = p.guidance
    predict = make_predict(p.model, p.parameterization)
    grid = p.levels(10)
    seen = []

    def checked(x, level, cond):
        seen.append((type(level), None if cond is None else cond.shape[0], x.shape[0]))
        return predict(x, level, cond)

    def uninformed(x, level, cond):  # the unconditional prediction whatever the label
        return predict(x, level, None)

    cond = torch.arange(16) % MODES
    for level in grid[:-1]:
        x = start_points(3, 16, level)
        before = x.clone()
        run = guidance.start(grid)
        out = run.denoise(checked, x, level, cond)
        assert out.shape == x.shape and out.dtype == torch.float64 and torch.isfinite(out).all()
        assert torch.equal(x, before)
        part = guidance.start(grid).denoise(checked, x[[5, 0, 11]], level, cond[[5, 0, 11]])
        assert (part - out[[5, 0, 11]]).abs().max() <= 64 * U * (1 + out.abs().max())
        same = guidance.start(grid).denoise(uninformed, x, level, cond)
        reference = predict(x, level, None)
        assert (same - reference).abs().max() <= 64 * U * (1 + reference.abs().max()), name
    assert all(kind is Level and labels == batch for kind, labels, batch in seen)


# ------------------------------------------------------------------ the oracle's null label


@settings(max_examples=30)
@given(lam=logsnrs(-8.0, 8.0), seed=seeds())
def test_oracle_treats_label_minus_one_as_unconditional(registry, lam, seed):
    """The conditional oracle with label -1 (the null token of condition dropout) is exactly
    the unconditional oracle, E[x0 | x_t] (all mixture responsibilities kept)."""
    level = VP.level(lam)
    conditional = conditional_pipeline(registry, "none")
    unconditional = pipeline(registry, data=OVERLAP)
    x = start_points(seed, 32, level)
    null = torch.full((32,), -1)
    a = make_predict(conditional.model, conditional.parameterization)(x, level, null)
    b = make_predict(unconditional.model, unconditional.parameterization)(x, level, None)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ cfg


@settings(max_examples=30)
@given(lam=logsnrs(-8.0, 8.0), seed=seeds())
def test_cfg_scale_one_is_conditional_and_zero_unconditional(registry, lam, seed):
    """Ho & Salimans 2022, eq. 6: x0_u + w (x0_c - x0_u) is the conditional model at w = 1
    and the unconditional one at w = 0 -- exactly (bit for bit, float64) against the two
    halves of the same doubled-batch forward, since torch.lerp returns its end points
    exactly. Against separate single-batch calls the rows agree to float64 rounding only:
    CPU kernels may vectorise a batch of 48 rows differently from one of 24."""
    level = VP.level(lam)
    x = start_points(seed, 24, level)
    cond = torch.arange(24) % MODES
    null = torch.full_like(cond, -1)
    p1 = conditional_pipeline(registry, {"name": "cfg", "scale": 1.0})
    p0 = conditional_pipeline(registry, {"name": "cfg", "scale": 0.0})
    predict = make_predict(p1.model, p1.parameterization)
    both = predict(torch.cat([x, x]), level, torch.cat([cond, null]))
    assert torch.equal(p1.guidance.denoise(predict, x, level, cond), both[:24])
    assert torch.equal(p0.guidance.denoise(predict, x, level, cond), both[24:])
    for half, alone in ((both[:24], predict(x, level, cond)), (both[24:], predict(x, level, null))):
        assert torch.allclose(half, alone, rtol=1e-12, atol=1e-12 * float(alone.abs().max()))


def test_cfg_calls_the_model_once_per_step_on_the_doubled_batch(registry):
    """Both branches come from one forward pass (Ho & Salimans 2022, sec. 3.2): DDIM with 12
    steps calls the network 12 times, each on 2B rows. Outside the guidance interval the
    conditional branch alone is evaluated (B rows)."""
    p = conditional_pipeline(registry, {"name": "cfg", "scale": 3.0}, sampler={"name": "ddim", "steps": 12})
    grid = p.levels()
    counting = Counting(p.model)
    x = start_points(0, 10, grid[0])
    p.sampler.sample(make_denoise(counting, p.parameterization, p.guidance, torch.zeros(10, dtype=torch.long), grid), x, grid)
    assert counting.batches == [20] * 12
    inside = [lv for lv in grid[:-1] if -2.0 <= lv.logsnr <= 2.0]
    assert 0 < len(inside) < 12
    q = conditional_pipeline(registry, {"name": "cfg", "scale": 3.0, "interval": [-2.0, 2.0]}, sampler={"name": "ddim", "steps": 12})
    counting = Counting(q.model)
    q.sampler.sample(make_denoise(counting, q.parameterization, q.guidance, torch.zeros(10, dtype=torch.long), grid), x, grid)
    assert counting.batches == [20 if -2.0 <= lv.logsnr <= 2.0 else 10 for lv in grid[:-1]]


def test_cfg_interval_uses_the_conditional_prediction_outside(registry):
    """Kynkaanniemi et al. 2024: guidance only for lambda in [low, high]; outside it the
    estimate is the conditional model's (exactly), inside it plain CFG's (exactly)."""
    plain = conditional_pipeline(registry, {"name": "cfg", "scale": 3.0})
    limited = conditional_pipeline(registry, {"name": "cfg", "scale": 3.0, "interval": [-1.0, 1.0]})
    predict = make_predict(plain.model, plain.parameterization)
    chain = plain.chain
    cond = torch.arange(8)
    for lam in (-3.0, -1.0, 0.0, 1.0, 3.0):
        level = chain.level(lam)
        x = start_points(1, 8, level)
        out = limited.guidance.denoise(predict, x, level, cond)
        expected = plain.guidance.denoise(predict, x, level, cond) if -1.0 <= lam <= 1.0 else predict(x, level, cond)
        assert torch.equal(out, expected), lam


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_cfg_rescale_matches_the_conditional_std(registry, space):
    """Lin et al. 2024, sec. 3.4: with phi = 1 the guided prediction's per-sample std (in the
    chosen space) equals the conditional prediction's; phi = 0 is plain CFG; phi = 1/2 is the
    midpoint of the two. Tolerance: relative float64 roundings (the factor is a ratio of stds
    of O(1) values, re-mapped once through eps = (x - alpha x0) / sigma)."""
    chain = conditional_pipeline(registry, "none").chain
    level = chain.level(0.5)
    x = start_points(2, 12, level)
    cond = torch.arange(12) % MODES

    def guided(phi):
        p = conditional_pipeline(registry, {"name": "cfg", "scale": 4.0, "rescale": phi, "rescale_space": space})
        return p.guidance.denoise(make_predict(p.model, p.parameterization), x, level, cond), make_predict(p.model, p.parameterization)

    full, predict = guided(1.0)
    plain, _ = guided(0.0)
    half, _ = guided(0.5)
    x0_c = predict(x, level, cond)
    to_space = (lambda x0: x0) if space == "x0" else (lambda x0: (x - level.alpha * x0) / level.sigma)
    std = lambda t: to_space(t).std(dim=1, correction=0)  # noqa: E731
    tol = 1e-12
    assert torch.allclose(std(full), std(x0_c), rtol=tol, atol=0)
    assert not torch.allclose(std(plain), std(x0_c), rtol=1e-3)
    assert torch.allclose(to_space(half), 0.5 * (to_space(full) + to_space(plain)), rtol=0, atol=tol * 10)


def test_cfg_training_drops_labels_with_probability_p(registry):
    """Ho & Salimans 2022, Algorithm 1: the label is replaced by the null token -1 exactly
    where u < p_uncond, and kept elsewhere."""
    p = conditional_pipeline(registry, {"name": "cfg", "drop_prob": 0.25})
    cond = torch.arange(1000) % MODES
    u = fundiff.rng.uniform(0, 1000, 0, torch.arange(1000))
    out = p.guidance.training_condition(cond, u)
    assert torch.equal(out == -1, u < 0.25)
    assert torch.equal(out[u >= 0.25], cond[u >= 0.25])


def test_cfg_raises_the_requested_mode_fraction_with_the_exact_model(registry):
    """With exact conditional and unconditional predictions on overlapping modes, exact
    conditional samples (w = 1) fall nearest the requested mode ~91% of the time; CFG
    aims at p(x | y) p(y | x)^(w - 1) (sharper), so w = 3 must do clearly better: by at
    least 0.05, about 7 standard errors of a fraction near 0.9 with n = 2000 (~0.007)."""
    _, means, _ = conditional_pipeline(registry, "none").data_set.mixture()
    fractions = {}
    for w in (0.0, 1.0, 3.0):
        p = conditional_pipeline(registry, {"name": "cfg", "scale": w}, sampler={"name": "ddim", "steps": 25})
        samples, labels = p.sample(2000, seed=1, batch_size=2000, dtype=torch.float64, label=3)
        fractions[w] = mode_fraction(samples, means, labels)
    assert abs(fractions[0.0] - 1 / MODES) < 0.03, fractions  # unconditional: ~1/8
    assert 0.8 < fractions[1.0] < 0.95, fractions
    assert fractions[3.0] > fractions[1.0] + 0.05, fractions


@pytest.mark.slow
def test_cfg_raises_the_requested_mode_fraction_of_a_trained_model(registry, tmp_path):
    """A small conditional MLP trained on the overlapping 8-mode ring with condition dropout
    (p = 0.2, 800 steps): scale 3 puts more samples nearest the requested mode than scale 1.

    Stated threshold: an increase of at least 0.04 (the exact model gains ~0.1; the standard
    error of each fraction, n = 3000, is below 0.007, so 0.04 is over 4 combined standard
    errors), and the unguided unconditional branch (w = 0) stays near 1/8 (it learned p(x))."""
    recipe = oracle_recipe(
        data=OVERLAP,
        denoiser={"name": "mlp", "width": 32, "depth": 2, "embed_dim": 16, "conditional": True},
        guidance={"name": "cfg", "drop_prob": 0.2},
        sampler={"name": "ddim", "steps": 25},
        train={"steps": 800, "batch_size": 128, "lr": 3e-3, "ema": 0.99, "seed": 0},
    )
    fundiff.train(fundiff.load_recipe(recipe, registry), tmp_path / "run", quiet=True)
    fractions = {}
    for w in (0.0, 1.0, 3.0):
        p = fundiff.load_run(tmp_path / "run", registry=registry, overrides={"guidance.scale": w})
        samples, labels = p.sample(3000, seed=1, batch_size=3000)
        fractions[w] = mode_fraction(samples, p.data_set.mixture()[1], labels)
    assert abs(fractions[0.0] - 1 / MODES) < 0.04, fractions
    assert fractions[3.0] > fractions[1.0] + 0.04, fractions


# ------------------------------------------------------------------ vanilla and refusals


@pytest.mark.parametrize("name", ["vanilla", "cfg", "cfg-pp", "apg"])
def test_guidances_that_need_a_conditional_model_refuse_an_unconditional_one(registry, name):
    """A recipe with an unconditional denoiser is refused at load time, naming the fix."""
    with pytest.raises(fundiff.RecipeError, match="conditional"):
        pipeline(registry, guidance=name)
    with pytest.raises(fundiff.RecipeError, match="class labels"):
        fundiff.load_recipe(oracle_recipe(data={"name": "two-moons"}, denoiser="mlp", guidance=name), registry)


def test_vanilla_is_the_conditional_model(registry):
    """vanilla: the conditional denoiser's prediction, untouched (exact)."""
    p = conditional_pipeline(registry, "vanilla")
    predict = make_predict(p.model, p.parameterization)
    level = p.chain.level(0.0)
    x, cond = start_points(0, 8, level), torch.arange(8)
    assert torch.equal(p.guidance.denoise(predict, x, level, cond), predict(x, level, cond))


# ------------------------------------------------------------------ apg


@settings(max_examples=30)
@given(lam=logsnrs(-8.0, 8.0), seed=seeds(), w=st.floats(0.0, 8.0))
def test_apg_with_eta_one_no_threshold_no_momentum_is_cfg(registry, lam, seed, w):
    """Sadat et al. 2024, eq. 8 with eta = 1, r = inf, beta = 0: x0_c + (w - 1)(x0_c - x0_u)
    = x0_u + w (x0_c - x0_u). Equal up to a few roundings of w times the O(1) predictions."""
    level = VP.level(lam)
    apg = conditional_pipeline(registry, {"name": "apg", "scale": w, "eta": 1.0, "momentum": 0.0})
    cfg = conditional_pipeline(registry, {"name": "cfg", "scale": w})
    predict = make_predict(cfg.model, cfg.parameterization)
    x, cond = start_points(seed, 16, level), torch.arange(16) % MODES
    a = apg.guidance.denoise(predict, x, level, cond)
    b = cfg.guidance.denoise(predict, x, level, cond)
    scale = (1 + w) * (1 + predict(x, level, cond).abs().max())
    assert (a - b).abs().max() <= 16 * U * scale


def test_apg_projection_threshold_and_momentum(registry):
    """The three parts of APG (Sadat et al. 2024, sec. 4), each against its definition:

    * eta = 0: the update x0_apg - x0_c is orthogonal to x0_c (per sample);
    * r: with eta = 1 the update's norm is at most (w - 1) r, and equals (w - 1) ||d|| where
      ||d|| < r;
    * beta: over two steps of one run, the second update uses D_2 = d_2 + beta d_1, and a
      new run (``start``) begins with an empty buffer."""
    p = conditional_pipeline(registry, "none")
    predict = make_predict(p.model, p.parameterization)
    cond = torch.arange(8)
    l1, l2 = p.chain.level(-1.0), p.chain.level(0.5)
    x1, x2 = start_points(4, 8, l1), start_points(5, 8, l2)
    d = lambda x, lv: predict(x, lv, cond) - predict(x, lv, torch.full_like(cond, -1))  # noqa: E731
    w = 3.0

    def apg(**options):
        return conditional_pipeline(registry, {"name": "apg", "scale": w, **options}).guidance

    update = apg(eta=0.0, momentum=0.0).denoise(predict, x1, l1, cond) - predict(x1, l1, cond)
    x0_c = predict(x1, l1, cond)
    cosine = (update * x0_c).sum(1) / (update.norm(dim=1) * x0_c.norm(dim=1))
    assert cosine.abs().max() < 1e-12

    norms = d(x1, l1).norm(dim=1)
    r = float(norms.median())
    capped = (apg(eta=1.0, momentum=0.0, norm_threshold=r).denoise(predict, x1, l1, cond) - x0_c).norm(dim=1)
    assert (capped <= (w - 1) * r * (1 + 1e-12)).all()
    below = norms < r
    assert torch.allclose(capped[below], (w - 1) * norms[below], rtol=1e-12, atol=0)

    beta = -0.5
    guidance = apg(eta=1.0, momentum=beta)
    run = guidance.start(None)
    run.denoise(predict, x1, l1, cond)
    second = run.denoise(predict, x2, l2, cond)
    expected = predict(x2, l2, cond) + (w - 1) * (d(x2, l2) + beta * d(x1, l1))
    assert torch.allclose(second, expected, rtol=0, atol=1e-12)
    fresh = guidance.start(None).denoise(predict, x2, l2, cond)
    assert torch.allclose(fresh, predict(x2, l2, cond) + (w - 1) * d(x2, l2), rtol=0, atol=1e-12)


def test_apg_momentum_state_is_per_run(registry):
    """Momentum lives in the per-run object: sampling twice gives identical samples, and
    sample i does not depend on the batch it is drawn in (each batch is its own run)."""
    p = conditional_pipeline(registry, {"name": "apg", "scale": 3.0, "momentum": -0.75}, sampler={"name": "ddim", "steps": 10})
    a, _ = p.sample(12, seed=2, batch_size=12, dtype=torch.float64)
    b, _ = p.sample(12, seed=2, batch_size=12, dtype=torch.float64)
    c, _ = p.sample(12, seed=2, batch_size=5, dtype=torch.float64)
    assert torch.equal(a, b)
    assert (a - c).abs().max() <= 64 * U * (1 + a.abs().max())


# ------------------------------------------------------------------ cfg-pp


def test_cfg_pp_under_ddim_is_the_cfgpp_update(registry):
    """Chung et al. 2024, Algorithm 1 (CFG++ DDIM): x0 from the guided eps, re-noised with the
    unconditional eps. Written out here step by step with the exact oracle, it must equal
    DDIM (eta = 0) driven by the cfg-pp guidance's x0 (derivation in the module docstring).
    Tolerance: the effective scale l / (1 - rho) amplifies roundings by at most ~1 / (1 - rho)
    <= 5 on this grid; 1e-10 on O(1) values leaves a wide margin."""
    lam = 0.6
    p = conditional_pipeline(registry, {"name": "cfg-pp", "scale": lam}, sampler={"name": "ddim", "steps": 15})
    grid = p.levels()
    predict = make_predict(p.model, p.parameterization)
    cond = torch.arange(64) % MODES
    x = start_points(7, 64, grid[0])
    out = p.sampler.sample(make_denoise(p.model, p.parameterization, p.guidance, cond, grid), x.clone(), grid)
    ref = x.clone()
    for t, s in zip(grid[:-1], grid[1:]):
        x0_c, x0_u = predict(ref, t, cond), predict(ref, t, torch.full_like(cond, -1))
        eps_c, eps_u = (ref - t.alpha * x0_c) / t.sigma, (ref - t.alpha * x0_u) / t.sigma
        eps_l = eps_u + lam * (eps_c - eps_u)
        x0_l = (ref - t.sigma * eps_l) / t.alpha
        ref = s.alpha * x0_l + s.sigma * eps_u
    assert (out - ref).abs().max() < 1e-10


def test_cfg_pp_limits_and_grid(registry):
    """l = 0 is the unconditional model (cfg with scale 0), exactly; the effective CFG scale
    is l / (1 - rho), rho = exp((lambda_t - lambda_s) / 2) for the grid step [t, s), the same
    for an evaluation inside the step (adaptive solvers), and l at the last step onto clean
    data; without a grid the guidance says what it needs."""
    zero = conditional_pipeline(registry, {"name": "cfg-pp", "scale": 0.0})
    cfg0 = conditional_pipeline(registry, {"name": "cfg", "scale": 0.0})
    predict = make_predict(zero.model, zero.parameterization)
    grid = zero.levels(8)
    cond = torch.arange(8)
    for level in grid[:-1]:
        x = start_points(1, 8, level)
        assert torch.equal(zero.guidance.start(grid).denoise(predict, x, level, cond), cfg0.guidance.denoise(predict, x, level, cond))
    run = conditional_pipeline(registry, {"name": "cfg-pp", "scale": 0.5}).guidance.start(grid)
    t, s = grid[2], grid[3]
    assert math.isclose(run.effective_scale(t), 0.5 / (1 - math.exp((t.logsnr - s.logsnr) / 2)), rel_tol=1e-12)
    between = zero.chain.level(0.5 * (t.logsnr + s.logsnr))
    assert run.effective_scale(between) == run.effective_scale(t)  # the scale of the step it falls in
    assert run.effective_scale(grid[-2]) == 0.5
    with pytest.raises(ValueError, match="levels"):
        zero.guidance.denoise(predict, start_points(1, 8, grid[0]), grid[0], cond)


# ------------------------------------------------------------------ autoguidance


@pytest.fixture(scope="module")
def oracle_runs(tmp_path_factory, registry):
    """Two 'trained' runs of the exact denoiser (nothing to train): the mixture itself, and
    a worse model of the same ring that believes the modes are wider."""
    root = tmp_path_factory.mktemp("runs")
    good = oracle_recipe(sampler={"name": "ddim", "steps": 20})
    fundiff.train(fundiff.load_recipe(good, registry), root / "good", quiet=True)
    bad = oracle_recipe(data={"name": "gmm", "modes": MODES, "radius": 2.0, "std": 0.4}, sampler={"name": "ddim", "steps": 20})
    fundiff.train(fundiff.load_recipe(bad, registry), root / "bad", quiet=True)
    return root


def test_autoguidance_with_itself_is_the_good_model(registry, oracle_runs):
    """Karras et al. 2024, eq. 1: x0_bad + w (x0_good - x0_bad) is x0_good when bad = good,
    for any w (exactly: lerp of two equal tensors)."""
    plain = fundiff.load_run(oracle_runs / "good", registry=registry)
    guided = fundiff.load_run(
        oracle_runs / "good", registry=registry, overrides={"guidance.name": "autoguidance", "guidance.run_dir": str(oracle_runs / "good"), "guidance.scale": 2.5}
    )
    a, _ = plain.sample(200, seed=3, batch_size=200, dtype=torch.float64)
    b, _ = guided.sample(200, seed=3, batch_size=200, dtype=torch.float64)
    assert torch.equal(a, b)


def test_autoguidance_interpolates_between_the_two_runs(registry, oracle_runs):
    """w = 0 samples the bad run's model and w = 1 the good one's, exactly; w = 2 follows
    eq. 1 at every evaluation (checked on one level against the two predictions)."""
    def run(w):
        return fundiff.load_run(
            oracle_runs / "good", registry=registry, overrides={"guidance.name": "autoguidance", "guidance.run_dir": str(oracle_runs / "bad"), "guidance.scale": w}
        )

    bad = fundiff.load_run(oracle_runs / "bad", registry=registry)
    good = fundiff.load_run(oracle_runs / "good", registry=registry)
    draw = lambda p: p.sample(100, seed=4, batch_size=100, dtype=torch.float64)[0]  # noqa: E731
    assert torch.equal(draw(run(0.0)), draw(bad))
    assert torch.equal(draw(run(1.0)), draw(good))
    level = good.chain.level(0.0)
    x = start_points(0, 16, level)
    x0_good = make_predict(good.model, good.parameterization)(x, level, None)
    x0_bad = make_predict(bad.model, bad.parameterization)(x, level, None)
    out = run(2.0).guidance.denoise(make_predict(good.model, good.parameterization), x, level, None)
    assert torch.allclose(out, x0_good + (x0_good - x0_bad), rtol=0, atol=1e-12)


def test_autoguidance_refuses_a_missing_run(registry, tmp_path):
    """check_recipe names the missing run directory (and an empty run_dir) at load time."""
    with pytest.raises(fundiff.RecipeError, match="not found"):
        pipeline(registry, guidance={"name": "autoguidance", "run_dir": str(tmp_path / "nope")})
    with pytest.raises(fundiff.RecipeError, match="needs run_dir"):
        pipeline(registry, guidance="autoguidance")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fundiff.RecipeError, match="not a trained fundiff run"):
        pipeline(registry, guidance={"name": "autoguidance", "run_dir": str(tmp_path / "empty")})


# ------------------------------------------------------------------ classifier


class ExactClassifier(torch.nn.Module):
    """log p(y | x_t) of the mixture: the log responsibilities of its noisy components."""

    def __init__(self, data_set):
        super().__init__()
        self.log_w, self.means, stds = (t for t in data_set.mixture())
        self.log_w = self.log_w.log()
        self.var = stds**2

    def forward(self, x_t, logsnr, alpha, sigma):
        v = alpha[:, None] ** 2 * self.var[None] + sigma[:, None] ** 2
        sq = ((x_t[:, None, :] - alpha[:, None, None] * self.means[None]) ** 2).sum(-1)
        return self.log_w[None] - 0.5 * x_t.shape[1] * torch.log(v) - 0.5 * sq / v


@settings(max_examples=30)
@given(lam=logsnrs(-6.0, 6.0), seed=seeds())
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_model(registry, lam, seed):
    """Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t). With the exact
    classifier, x0_u + sigma^2 / alpha grad log p(y | x_t) (w = 1) is therefore exactly the
    conditional posterior mean E[x0 | x_t, y] -- the x0-space form of Dhariwal & Nichol's
    score shift. Tolerance: sigma^2 / alpha amplifies the gradient's roundings; relative
    1e-9 of that factor covers |lambda| <= 6 with room."""
    level = VP.level(lam)
    uncond = pipeline(registry, data=OVERLAP)
    cond_p = conditional_pipeline(registry, "none")
    exact = ExactClassifier(uncond.data_set)
    guidance = classifier_module.ClassifierGuidance(path="exact", label=5, scale=1.0)
    x = start_points(seed, 16, level)
    with mock.patch.object(classifier_module, "load_classifier", lambda path, device, dtype: exact):
        out = guidance.denoise(make_predict(uncond.model, uncond.parameterization), x, level, None)
    expected = make_predict(cond_p.model, cond_p.parameterization)(x, level, torch.full((16,), 5))
    factor = 1 + level.sigma**2 / level.alpha
    assert (out - expected).abs().max() <= 1e-9 * factor * (1 + expected.abs().max())


@pytest.mark.slow
def test_trained_classifier_guides_the_unconditional_oracle_to_a_mode(registry, tmp_path):
    """A noise-aware classifier (width 64, 600 steps) trained on the ring's noisy points
    guides the *unconditional* exact denoiser towards mode 2: unguided, ~1/8 of the samples
    are nearest mode 2; with w = 1 the stated bound is at least 0.85 (an exact classifier
    gives ~1.0 on these well-separated modes; the trained one reaches ~0.97)."""
    base = pipeline(registry, sampler={"name": "ddim", "steps": 25})
    path = str(tmp_path / "classifier.safetensors")
    classifier_module.train_classifier(base, steps=600, batch_size=256, width=64, depth=2, lr=3e-3, path=path)
    means = base.data_set.mixture()[1]
    fractions = {}
    for w in (0.0, 1.0):
        p = pipeline(registry, sampler={"name": "ddim", "steps": 25}, guidance={"name": "classifier", "path": path, "label": 2, "scale": w})
        samples, _ = p.sample(2000, seed=1, batch_size=2000, dtype=torch.float64)
        fractions[w] = mode_fraction(samples, means, 2)
    assert abs(fractions[0.0] - 1 / MODES) < 0.03, fractions
    assert fractions[1.0] > 0.85, fractions


def test_classifier_cli_and_recipe_checks(registry, tmp_path, oracle_runs):
    """`fundiff train-classifier RUN_DIR --steps N` writes RUN_DIR/classifier.safetensors
    that the guidance accepts with path: RUN_DIR; recipes without a path, without a label
    for an unconditional denoiser, or with a missing file are refused at load time."""
    import shutil

    from fundiff.cli import main

    run = tmp_path / "run"
    shutil.copytree(oracle_runs / "good", run)
    assert main(["train-classifier", str(run), "--steps", "5", "-q"]) == 0
    assert (run / "classifier.safetensors").exists()
    p = fundiff.load_run(run, registry=registry, overrides={"guidance.name": "classifier", "guidance.path": str(run), "guidance.label": 1})
    samples, _ = p.sample(8, seed=0, batch_size=8, steps=4)
    assert torch.isfinite(samples).all()
    with pytest.raises(fundiff.RecipeError, match="needs path"):
        pipeline(registry, guidance={"name": "classifier", "label": 1})
    with pytest.raises(fundiff.RecipeError, match="needs label"):
        pipeline(registry, guidance={"name": "classifier", "path": str(run)})
    with pytest.raises(fundiff.RecipeError, match="no classifier at"):
        pipeline(registry, guidance={"name": "classifier", "path": str(tmp_path / "missing.safetensors"), "label": 1})
    with pytest.raises(fundiff.RecipeError, match="shape"):
        fundiff.load_recipe(
            oracle_recipe(data={"name": "gmm", "modes": MODES, "dim": 3}, guidance={"name": "classifier", "path": str(run), "label": 1}), registry
        )
