"""The categorical chains d3pm-uniform and d3pm-absorbing (Austin et al. 2021, "Structured
Denoising Diffusion Models in Discrete State-Spaces"; survey sec. 3.2.3), the ``logits``
parameterization, the ``d3pm-ancestral`` sampler and the ``binary-digits`` data set.

The transition matrices are checked against D3PM's direct formulas written out here
(uniform: Q(a) = a I + (1 - a) 11^T / K, appendix A.2.1; absorbing: Q(a) = a I + (1 - a)
1 e_mask^T, appendix A.2.2), the posteriors against Bayes' rule computed by brute force from
those matrices (eq. 3 and eq. 4), the hybrid loss against its definition (eq. 5), the sampler
against exact predictions, and the two recipes end to end on binarised digits.

Statistical bounds use ``Z_SCORE`` = 6 standard errors of the stated sample size.
"""

from __future__ import annotations

import math
import os
import types

import pytest
import torch
from helpers import RECIPES
from hypothesis import example, given
from hypothesis import strategies as st

import fundiff
from fundiff import DataSpec, Level, LevelTensors, TrainingBatch, rng
from fundiff.errors import FundiffError, RecipeError
from fundiff.testing import ROUNDINGS, Z_SCORE, U, check_component
from fundiff_plugins.chains.d3pm_absorbing import D3PMAbsorbing
from fundiff_plugins.chains.d3pm_uniform import D3PMUniform

CHAINS = {"d3pm-uniform": D3PMUniform, "d3pm-absorbing": D3PMAbsorbing}
#: a random stream id for this file's own draws, far from fundiff's streams
STREAM = 1000


def direct_matrix(name: str, keep: float, k: int) -> torch.Tensor:
    """D3PM's matrices written out for K data classes (M = K states, or K + 1 with [MASK] last)."""
    if name == "d3pm-uniform":
        return keep * torch.eye(k, dtype=torch.float64) + (1.0 - keep) * torch.full((k, k), 1.0 / k, dtype=torch.float64)
    q = keep * torch.eye(k + 1, dtype=torch.float64)
    q[:, k] += 1.0 - keep  # every class moves to [MASK] with probability 1 - keep; [MASK] stays
    return q


def one_hot(index: torch.Tensor, m: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, m).movedim(-1, 1).to(torch.float64)


def tensor_level(chain, logsnr: torch.Tensor) -> LevelTensors:
    alpha, sigma = chain.alpha_sigma(logsnr)
    return LevelTensors(logsnr=logsnr, alpha=alpha, sigma=sigma)


# ------------------------------------------------------------------ transition matrices


@pytest.mark.parametrize("name", CHAINS)
@given(keep=st.floats(0.0, 1.0), other=st.floats(0.0, 1.0), k=st.integers(2, 6))
@example(keep=0.0, other=0.0, k=2)
@example(keep=1.0, other=0.3, k=5)
def test_transition_matrices_are_stochastic_and_compose(name, keep, other, k):
    """Every row of Q(a) is a distribution (entries >= 0, rows sum to 1), Q(a) is D3PM's
    direct formula, and Q(a) Q(b) = Q(a b): the keep probabilities of successive steps
    multiply (1 pi^T is idempotent). A few roundings per entry: R U M."""
    chain = CHAINS[name]()
    m = k + chain.extra_classes
    q = chain.transition_matrix(keep, m)
    tol = ROUNDINGS * U * m
    assert (q >= 0).all()
    assert (q.sum(1) - 1).abs().max().item() <= tol
    assert (q - direct_matrix(name, keep, k)).abs().max().item() <= tol
    composed = q @ chain.transition_matrix(other, m)
    assert (composed - chain.transition_matrix(keep * other, m)).abs().max().item() <= tol


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("schedule_name", ["cosine", "simple-linear"])
def test_cumulative_product_of_steps_is_the_direct_formula(registry, name, schedule_name):
    """On the chain's grid of T = 50 steps of a schedule, the product of the step matrices
    Q_{k|k-1} = Q(alpha_bar_k / alpha_bar_{k-1}) (from ``step_keep`` of consecutive levels,
    each row a distribution) equals the direct cumulative matrix Q-bar_n = Q(alpha_bar_n) of
    D3PM at every n, and ``marginal`` of one-hot x0 is its row x0 Q-bar_n (eq. 2). Each
    product adds a few roundings per entry: tolerance n R U M."""
    chain = CHAINS[name](num_steps=50)
    schedule = registry.build("schedule", schedule_name)
    k = 3
    m = k + chain.extra_classes
    ts = torch.arange(1, 51, dtype=torch.float64) / 50
    levels = [chain.level(math.inf)] + [chain.level(v) for v in schedule.logsnr(ts).tolist()]
    product = torch.eye(m, dtype=torch.float64)
    x0 = one_hot(torch.arange(m)[:, None], m)  # (M, M, 1): every state class once
    for n in range(1, 51):
        keep, leave = chain.step_keep(levels[n - 1], levels[n])
        assert abs(keep + leave - 1.0) <= 4 * U
        product = product @ chain.transition_matrix(keep, m)
        expected = direct_matrix(name, levels[n].alpha, k)
        tol = n * ROUNDINGS * U * m
        assert (product - expected).abs().max().item() <= tol, n
        assert (chain.marginal(x0, levels[n])[..., 0] - expected).abs().max().item() <= ROUNDINGS * U * m


@pytest.mark.parametrize("name", CHAINS)
def test_levels_store_keep_probabilities(name):
    """Level.alpha = alpha_bar = sigmoid(lambda) and Level.sigma = 1 - alpha_bar =
    sigmoid(-lambda) (host floats and tensors agree); the clean level (lambda = inf) has
    sigma = 0 and the terminal one (lambda = -inf) alpha = 0; levels carry the chain."""
    chain = CHAINS[name]()
    lam = torch.tensor([-30.0, -3.0, 0.0, 2.5, 30.0], dtype=torch.float64)
    alpha, sigma = chain.alpha_sigma(lam)
    for i, value in enumerate(lam.tolist()):
        level = chain.level(value)
        assert level.chain is chain
        assert level.alpha == pytest.approx(float(alpha[i]), rel=ROUNDINGS * U)
        assert level.sigma == pytest.approx(float(sigma[i]), rel=ROUNDINGS * U)
        assert level.alpha == pytest.approx(1.0 / (1.0 + math.exp(-value)), rel=ROUNDINGS * U)
    assert chain.level(math.inf).is_clean and chain.level(math.inf).alpha == 1.0
    assert chain.level(-math.inf).alpha == 0.0 and chain.level(-math.inf).sigma == 1.0
    # 1 - alpha_bar_t / alpha_bar_s keeps its relative accuracy near the clean end (expm1)
    _, leave = chain.step_keep(chain.level(40.0), chain.level(39.0))
    exact = math.exp(-39.0) - math.exp(-40.0)  # 1 - sigmoid(39) / sigmoid(40) to first order in e^-39
    assert leave == pytest.approx(exact, rel=1e-12)


# ------------------------------------------------------------------ posteriors


def brute_posterior(name: str, k: int, s: Level, t: Level, x_t: int, x0: torch.Tensor) -> torch.Tensor:
    """q(x_s | x_t, x0) by Bayes' rule from the direct matrices: for a distribution x0 over
    the classes, proportional to sum_c x0_c q(x_t | x_s) q(x_s | x0 = c) (eq. 3 for one-hot
    x0, eq. 4 for a predicted distribution)."""
    step = direct_matrix(name, t.alpha / s.alpha, k)
    cumulative_s = direct_matrix(name, s.alpha, k)
    joint = sum(x0[c] * cumulative_s[c, :] * step[:, x_t] for c in range(x0.numel()))
    return joint / joint.sum()


@pytest.mark.parametrize("name", CHAINS)
@given(
    lam_t=st.floats(-8.0, 8.0),
    gap=st.floats(1e-3, 10.0),
    k=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
@example(lam_t=-8.0, gap=16.0, k=2, seed=0)
@example(lam_t=7.9, gap=1e-3, k=4, seed=1)
def test_posterior_is_bayes_rule(name, lam_t, gap, k, seed):
    """``posterior`` equals Bayes' rule by brute force from the direct matrices, for every
    one-hot x_t and x0 with q(x_t | x0) > 0 (eq. 3) and for a random predicted distribution
    of x0 (eq. 4); it sums to 1; host levels and per-sample tensor levels agree.

    Tolerance: the brute force forms 1 - a by subtraction (absolute error U) and divides by
    q(x_t | x0) >= min(alpha_t, 1 - alpha_t) / M here, so entries agree within
    R U / q(x_t | x0)."""
    chain = CHAINS[name]()
    m = k + chain.extra_classes
    s, t = chain.level(lam_t + gap), chain.level(lam_t)
    states = torch.arange(m)
    x_t = one_hot(states.repeat_interleave(m)[:, None], m)  # every (x_t, x0) pair: (M^2, M, 1)
    x0 = one_hot(states.repeat(m)[:, None], m)
    post = chain.posterior(x_t, x0, s, t)
    tensor_post = chain.posterior(
        x_t,
        x0,
        tensor_level(chain, torch.full((m * m,), s.logsnr, dtype=torch.float64)),
        tensor_level(chain, torch.full((m * m,), t.logsnr, dtype=torch.float64)),
    )
    assert (post - tensor_post).abs().max().item() <= ROUNDINGS * U * m
    cumulative_t = direct_matrix(name, t.alpha, k)
    for row in range(m * m):
        j, c = row // m, row % m
        if c >= k or cumulative_t[c, j] == 0:  # x0 is never [MASK]; x_t impossible given x0
            continue
        expected = brute_posterior(name, k, s, t, j, torch.eye(m, dtype=torch.float64)[c])
        tol = ROUNDINGS * U / cumulative_t[c, j].item()
        assert (post[row, :, 0] - expected).abs().max().item() <= tol, (j, c)
        assert abs(post[row].sum().item() - 1.0) <= ROUNDINGS * U * m
    # eq. 4: a predicted distribution over the data classes in place of one-hot x0
    weights = rng.uniform(seed, STREAM, 0, [0], (k,))[0].to(torch.float64) + 0.05
    predicted = torch.cat([weights / weights.sum(), torch.zeros(m - k, dtype=torch.float64)])
    for j in range(m):
        got = chain.posterior(one_hot(torch.tensor([[j]]), m), predicted[None, :, None], s, t)[0, :, 0]
        expected = brute_posterior(name, k, s, t, j, predicted)
        norm = float(sum(predicted[c] * cumulative_t[c, j] for c in range(m)))
        assert (got - expected).abs().max().item() <= ROUNDINGS * U / norm, j


@pytest.mark.parametrize("name", CHAINS)
@given(lam_s=st.floats(-6.0, 10.0), gap=st.floats(1e-2, 8.0))
def test_posterior_averages_back_to_the_marginal(name, lam_s, gap):
    """Law of total probability, by exact enumeration over x_t:
    sum_j q(x_t = j | x0) q(x_s | x_t = j, x0) = q(x_s | x0), for every x0 (float64, R U M)."""
    chain = CHAINS[name]()
    k = 3
    m = k + chain.extra_classes
    s, t = chain.level(lam_s), chain.level(lam_s - gap)
    for c in range(k):
        x0 = one_hot(torch.full((m, 1), c), m)
        x_t = one_hot(torch.arange(m)[:, None], m)
        weights = chain.marginal(x0[:1], t)[0, :, 0]  # q(x_t = j | x0)
        total = (weights[:, None] * chain.posterior(x_t, x0, s, t)[:, :, 0]).sum(0)
        assert (total - chain.marginal(x0[:1], s)[0, :, 0]).abs().max().item() <= ROUNDINGS * U * m


@pytest.mark.parametrize("name", CHAINS)
def test_perturbation_frequencies_match_the_marginal(name):
    """Draws of x_t ~ q(x_t | x0), both from standard normal noise (``perturb``, the CDF of
    channel 0) and from uniforms (``sample_categorical``, as training draws them), have the
    class frequencies alpha_bar x0 + (1 - alpha_bar) pi within Z_SCORE binomial standard
    errors sqrt(p (1 - p) / n) of n = 40000 draws."""
    chain = CHAINS[name]()
    k, n = 3, 40000
    m = k + chain.extra_classes
    x0 = chain.encode(one_hot(torch.full((n, 1), 1), k))
    level = chain.level(0.7)
    expected = chain.marginal(x0[:1], level)[0, :, 0]
    ids = torch.arange(n)
    noise = rng.normal(0, STREAM, 1, ids, (m, 1)).to(torch.float64)
    alpha, sigma = torch.tensor(level.alpha, dtype=torch.float64), torch.tensor(level.sigma, dtype=torch.float64)
    from_noise = chain.perturb(x0, noise, alpha, sigma).mean(0)[:, 0]
    from_uniforms = chain.sample_categorical(
        chain.marginal(x0, level), rng.uniform(0, STREAM, 2, ids, (m, 1)).to(torch.float64)
    ).mean(0)[:, 0]
    se = (expected * (1 - expected) / n).sqrt()
    for frequencies in (from_noise, from_uniforms):
        assert ((frequencies - expected).abs() <= Z_SCORE * se + 1e-12).all(), (frequencies, expected)


# ------------------------------------------------------------------ state, conformance, logits


def test_state_spec_encode_decode(registry):
    """The uniform chain's state is the data's one-hot; the absorbing chain adds an empty
    [MASK] channel that ``decode`` drops (a leftover [MASK] becomes the most probable data
    class); the prior is uniform over data classes resp. all [MASK]."""
    spec = DataSpec(shape=(2, 8, 8), num_classes=10, modality="one-hot-images")
    x0 = one_hot(torch.tensor([[[0, 1], [1, 1]]]), 2)
    uniform, absorbing = registry.build("chain", "d3pm-uniform"), registry.build("chain", "d3pm-absorbing")
    assert uniform.state_spec(spec) == spec
    assert absorbing.state_spec(spec).shape == (3, 8, 8)
    state = absorbing.encode(x0)
    assert state.shape == (1, 3, 2, 2) and (state[:, 2] == 0).all()
    assert torch.equal(absorbing.decode(state), x0) and torch.equal(uniform.decode(uniform.encode(x0)), x0)
    source = types.SimpleNamespace(uniform=lambda draw: rng.uniform(0, STREAM, 3, torch.arange(4000), (3, 2)))
    start = absorbing.initial_state(absorbing.level(-math.inf), source)
    assert (start[:, 2] == 1).all()  # every position masked
    source2 = types.SimpleNamespace(uniform=lambda draw: rng.uniform(0, STREAM, 3, torch.arange(4000), (2, 2)))
    start = uniform.initial_state(uniform.level(-math.inf), source2)
    assert abs(start[:, 1].mean().item() - 0.5) <= Z_SCORE * 0.5 / math.sqrt(4000 * 2 * 2)


@pytest.mark.parametrize("name", CHAINS)
def test_kit_accepts_the_components_and_catches_broken_ones(registry, name):
    """fundiff.testing's categorical checks pass for both chains, the logits
    parameterization and the d3pm-ancestral sampler (both last steps), and fail for a chain
    whose posterior forgets the likelihood factor and for a sampler that returns its start."""
    chain = registry.build("chain", name)
    check_component("chain", chain)
    check_component("parameterization", registry.build("parameterization", "logits"), chain=chain)
    for last_step in ("draw", "argmax"):
        check_component("sampler", registry.build("sampler", "d3pm-ancestral", steps=12, last_step=last_step), chain=chain)

    class NoLikelihood(CHAINS[name]):
        def posterior(self, x_t, x0, s, t):
            probs = self.marginal(x0, s)  # q(x_s | x0) alone: ignores x_t
            return probs / probs.sum(1, keepdim=True)

    with pytest.raises(AssertionError, match="posterior at s = t must be the point mass at x_t"):
        check_component("chain", NoLikelihood())

    class ReturnsStart(type(registry.build("sampler", "d3pm-ancestral"))):
        def sample(self, denoise, x, levels, noise=None, callback=None):
            if callback is not None:
                callback(0, x, denoise(x, levels[0]))
            return x

    with pytest.raises(AssertionError, match="differ from the point"):
        check_component("sampler", ReturnsStart(steps=5), chain=chain)


def test_logits_parameterization(registry):
    """to_x0 is the softmax over the class axis; from_x0 is a log (softmax(log p) = p); there
    is no regression target, so target and the MSE factor refuse with a FundiffError that
    names the categorical chains."""
    param = registry.build("parameterization", "logits")
    out = torch.tensor([[[0.0], [math.log(3.0)]]], dtype=torch.float64)
    assert torch.allclose(
        param.to_x0(out, None, 1.0, 0.0), torch.tensor([[[0.25], [0.75]]], dtype=torch.float64), rtol=0, atol=4 * U
    )
    hot = one_hot(torch.tensor([[1]]), 3)
    assert (param.to_x0(param.from_x0(hot, None, 1.0, 0.0), None, 1.0, 0.0) - hot).abs().max().item() <= 4 * U
    for call in (lambda: param.target(hot, hot, hot, 1.0, 0.0), lambda: param.log_x0_mse_factor(1.0, 0.0)):
        with pytest.raises(FundiffError, match="d3pm-uniform or d3pm-absorbing"):
            call()


# ------------------------------------------------------------------ the hybrid loss


@pytest.mark.parametrize("name", CHAINS)
def test_training_loss_is_the_hybrid_loss(registry, name):
    """``training_losses`` equals D3PM's eq. 5 computed directly: for a network with fixed
    logits, x_t drawn by inverse CDF from the batch's uniforms at the grid step k = ceil(t T),
    the loss is the mean over positions of KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)) +
    lambda CE, with both posteriors from brute-force Bayes' rule over the direct matrices;
    at k = 1 the KL is -log p(x0 | x_1). float64 throughout: agreement within 1e-10."""
    steps, k, positions = 10, 2, 3
    chain = CHAINS[name](num_steps=steps, hybrid_coeff=0.25)
    m = k + chain.extra_classes
    schedule = registry.build("schedule", "cosine")
    param = registry.build("parameterization", "logits")
    ts = torch.tensor([0.05, 0.1, 0.42, 0.97, 1.0], dtype=torch.float64)  # steps 1, 1, 5, 10, 10
    batch_size = ts.numel()
    logsnr = schedule.logsnr(ts)
    x0 = chain.encode(one_hot(torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]]), k))
    uniforms = rng.uniform(0, STREAM, 4, torch.arange(batch_size), (m, positions)).to(torch.float64)
    logits = rng.normal(0, STREAM, 5, torch.arange(batch_size), (m, positions)).to(torch.float64)
    seen = {}

    def network(x, lam, cond):
        seen["x_t"], seen["logsnr"] = x, lam
        return logits

    batch = TrainingBatch(
        x0=x0,
        cond=None,
        logsnr=logsnr,
        log_extra=None,
        noise=types.SimpleNamespace(uniform=lambda draw: uniforms),
        network=network,
        components={"schedule": schedule, "parameterization": param},
        step=0,
    )
    losses = chain.training_losses(batch)
    assert losses.shape == (batch_size,)
    predicted = torch.softmax(logits, dim=1)
    predicted[:, k:] = 0.0  # x0 is never [MASK]
    predicted /= predicted.sum(1, keepdim=True)
    for b, step in enumerate([1, 1, 5, 10, 10]):
        t = chain.level(float(schedule.logsnr(torch.tensor(step / steps, dtype=torch.float64))))
        s = (
            chain.level(math.inf)
            if step == 1
            else chain.level(float(schedule.logsnr(torch.tensor((step - 1) / steps, dtype=torch.float64))))
        )
        assert float(seen["logsnr"][b]) == t.logsnr
        total = 0.0
        for p in range(positions):
            c = int(x0[b, :, p].argmax())
            q_t = direct_matrix(name, t.alpha, k)[c]
            j = int((q_t.cumsum(0) < uniforms[b, 0, p] * q_t.sum()).sum())  # inverse CDF at channel 0's uniform
            assert int(seen["x_t"][b, :, p].argmax()) == j
            target = brute_posterior(name, k, s, t, j, torch.eye(m, dtype=torch.float64)[c])
            model = brute_posterior(name, k, s, t, j, predicted[b, :, p])
            kl = sum(float(q * (math.log(q) - math.log(model[i]))) for i, q in enumerate(target) if q > 0)
            if step == 1:
                assert kl == pytest.approx(-math.log(model[c]), rel=1e-12)  # the decoder term L_0
            total += kl + 0.25 * -math.log(predicted[b, c, p])
        assert float(losses[b]) == pytest.approx(total / positions, rel=1e-10, abs=1e-12), b


# ------------------------------------------------------------------ the sampler


def _factorised_run(chain, schedule, denoise_kind: str, n: int = 10000, steps: int = 30):
    """Sample n states of K = 3 classes at 4 independent positions with known p_data, with
    the d3pm-ancestral sampler on 30 levels of the cosine schedule, from the prior; returns
    (class frequencies (K, 4), p_data)."""
    from fundiff_plugins.samplers.d3pm_ancestral import D3PMAncestral

    k, positions = 3, 4
    m = k + chain.extra_classes
    p_data = torch.tensor([[0.7, 0.1, 0.34, 0.05], [0.2, 0.1, 0.33, 0.9], [0.1, 0.8, 0.33, 0.05]], dtype=torch.float64)
    padded = torch.cat([p_data, torch.zeros(m - k, positions, dtype=torch.float64)])[None]
    classes = one_hot(torch.arange(m)[:, None].expand(m, positions), m)  # (M, M, positions): class c everywhere

    def exact_posterior(x, level):
        # q(x0 = c | x_t) proportional to q(x_t | x0 = c) p_data(c), position by position
        likelihood = torch.stack([(chain.marginal(classes[c : c + 1], level) * x).sum(1) for c in range(m)], 1)
        joint = likelihood * padded
        return joint / joint.sum(1, keepdim=True)

    def data_marginal(x, level):
        return padded.expand(x.shape[0], -1, -1)

    levels = fundiff.noise_levels(schedule, chain, steps)
    ids = torch.arange(n)
    source = types.SimpleNamespace(uniform=lambda draw: rng.uniform(0, STREAM, 6, ids, (m, positions)).to(torch.float64))
    noise = rng.NoiseStream(0, ids, (m, positions), stream=STREAM + 1, dtype=torch.float64)
    x = chain.initial_state(levels[0], source)
    out = D3PMAncestral(steps=steps).sample(exact_posterior if denoise_kind == "posterior" else data_marginal, x, levels, noise)
    return out.mean(0)[:k], p_data


def test_sampler_reproduces_factorised_data(registry):
    """With exact predictions the reverse steps are exact, and the samples have the data's
    class frequencies within Z_SCORE standard errors sqrt(p (1 - p) / n) (n = 10000):

    * absorbing chain, predictions q(x0 | x_t) (the exact posterior): a masked position's
      likelihood q(x_t = [MASK] | x0) = 1 - alpha_bar_t does not depend on x0, so eq. 4 is
      the mixture sum_x0 q(x_s | x_t, x0) q(x0 | x_t), the exact reverse step;
    * uniform chain, predictions p_data (the data marginal, whatever x_t): by Bayes,
      q(x_s | x_t) is proportional to q(x_t | x_s) sum_x0 q(x_s | x0) q(x0), which is eq. 4
      with p(x0 | x_t) = q(x0) for independent positions.

    And a property of eq. 4 itself: for the uniform chain, plugging the exact posterior
    q(x0 | x_t) into eq. 4 is not exact (eq. 4 lacks the factor 1 / q(x_t | x0) of the
    mixture of posteriors), which shows as frequencies more than 20 standard errors off;
    L_vb trains the network towards the prediction that makes eq. 4 exact, not towards
    q(x0 | x_t) (the cross-entropy term pulls that way, hence D3PM's small lambda)."""
    n = 10000
    schedule = registry.build("schedule", "cosine")
    for chain, kind in ((D3PMAbsorbing(), "posterior"), (D3PMUniform(), "marginal")):
        freq, p_data = _factorised_run(chain, schedule, kind, n)
        se = (p_data * (1 - p_data) / n).sqrt()
        assert ((freq - p_data).abs() <= Z_SCORE * se).all(), (type(chain).__name__, freq, p_data)
    freq, p_data = _factorised_run(D3PMUniform(), schedule, "posterior", n)
    se = (p_data * (1 - p_data) / n).sqrt()
    assert ((freq - p_data).abs() / se).max().item() > 20


# ------------------------------------------------------------------ recipes


def _refusal(registry, recipe_file: str, **overrides) -> str:
    with pytest.raises(RecipeError) as info:
        fundiff.load_recipe(os.path.join(RECIPES, recipe_file), registry, overrides=overrides)
    return str(info.value)


def test_incompatible_components_are_refused(registry):
    """A categorical chain with Gaussian samplers (they require gaussian-marginals), with a
    Gaussian parameterization, with image data that is not one-hot or with a corrupting noise
    type; the logits parameterization and the d3pm-ancestral sampler with a Gaussian chain:
    all refused at load time with the requirement and a fix."""
    for sampler in ("dpm-solver", "ddim"):
        message = _refusal(registry, "d3pm-uniform.yaml", **{"sampler.name": sampler})
        assert "requires 'gaussian-marginals'" in message and "chain/vp" in message
    message = _refusal(registry, "d3pm-absorbing.yaml", **{"parameterization.name": "eps"})
    assert "chain 'd3pm-absorbing' has a categorical state" in message and "use parameterization: logits" in message
    message = _refusal(registry, "d3pm-uniform.yaml", **{"data.name": "digits"})
    assert "needs one-hot data" in message and "use data: binary-digits" in message
    message = _refusal(registry, "d3pm-uniform.yaml", **{"noise.name": "blur"})
    assert "use noise: gaussian" in message
    message = _refusal(registry, "digits-unet.yaml", **{"parameterization.name": "logits"})
    assert "parameterization 'logits' requires 'categorical-state'" in message and "chain/d3pm-uniform" in message
    message = _refusal(registry, "digits-unet.yaml", **{"sampler.name": "d3pm-ancestral"})
    assert "sampler 'd3pm-ancestral' requires 'categorical-state'" in message


def test_fit_refuses_data_that_is_not_one_hot(registry, tmp_path):
    """Data declared one-hot whose values are not (a user's tensor file) are refused before
    training, naming the shape and the fix."""
    import numpy as np

    path = tmp_path / "soft.npz"
    np.savez(path, x=np.full((16, 2, 4), 0.5, dtype=np.float32))
    recipe = fundiff.load_recipe(
        os.path.join(RECIPES, "d3pm-uniform.yaml"),
        registry,
        overrides={"data.name": "tensor-file", "data.path": str(path), "data.modality": "one-hot", "train.steps": 1},
    )
    with pytest.raises(FundiffError, match=r"needs one-hot data .* of shape \(2, 4\)"):
        fundiff.train(recipe, tmp_path / "run", quiet=True, registry=registry)


def test_binary_digits(registry):
    """1797 one-hot (2, 8, 8) examples (pixel on when count >= 8 of 16), 32.3 % of pixels on,
    with their digit labels; the data set passes the kit's data check."""
    data_set = registry.build("data", "binary-digits")
    check_component("data", data_set)
    data = data_set.load()
    assert data.x.shape == (1797, 2, 8, 8) and data.spec.modality == "one-hot-images"
    assert torch.equal(data.x.sum(1), torch.ones(1797, 8, 8))
    assert data.x[:, 1].mean().item() == pytest.approx(0.32303, abs=1e-5)
    assert sorted(data.labels.unique().tolist()) == list(range(10))


def _pixel_statistics(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel on-rates (64,) and the co-occurrence matrix E[x_i x_j] (64, 64) of 0/1 images."""
    flat = on.flatten(1).to(torch.float64)
    return flat.mean(0), flat.T @ flat / flat.shape[0]


@pytest.mark.parametrize("recipe_file", ["d3pm-uniform.yaml", "d3pm-absorbing.yaml"])
def test_recipe_trains_and_samples_binary_digits(registry, tmp_path, recipe_file):
    """The shipped recipe, shortened (300 steps, batch 128, MLP width 128 and depth 2),
    trains and then samples 600 binary digits with 20 steps of d3pm-ancestral (every fifth
    level of the chain's 100-step grid). Statistics against the 1797 data images:

    * mean on-rate within 0.03 of the data's 0.323 (the prior gives 0.5 resp. 0);
    * per-pixel on-rate error (mean absolute over the 64 pixels) below 0.03, far below the
      prior's (0.29 for uniform noise, 0.32 for all-[MASK] decoded as off);
    * pixel co-occurrence error, mean |E[x_i x_j] - data| over all pairs, below that of 600
      images with independent pixels at the data's on-rates (measured 0.013; floor of 600
      held-out data images 0.005): the samples have the digits' spatial structure, which
      no per-pixel model has. Measured at seed 0: uniform 0.008, absorbing 0.008.

    Also: sample i does not depend on the batch it is drawn in, and the picture of
    one-hot-images samples is written."""
    overrides = {
        "denoiser.width": 128,
        "denoiser.depth": 2,
        "train.steps": 300,
        "train.batch_size": 128,
        "train.lr": 3.0e-3,
        "train.ema": 0.99,
        "train.warmup": 50,
    }
    pipeline = fundiff.train(
        os.path.join(RECIPES, recipe_file), tmp_path / "run", quiet=True, registry=registry, overrides=overrides
    )
    n = 600
    samples, _ = pipeline.sample(num_samples=n, steps=20, seed=1)
    assert samples.shape == (n, 2, 8, 8) and torch.equal(samples.sum(1), torch.ones(n, 8, 8))
    data_on = pipeline.data.x[:, 1]
    rate_data, cooc_data = _pixel_statistics(data_on)
    rate, cooc = _pixel_statistics(samples[:, 1])
    generator = torch.Generator().manual_seed(0)
    independent = (torch.rand(n, 64, generator=generator, dtype=torch.float64) < rate_data).to(torch.float64)
    _, cooc_independent = _pixel_statistics(independent)
    assert abs(rate.mean().item() - rate_data.mean().item()) < 0.03
    assert (rate - rate_data).abs().mean().item() < 0.03
    cooc_error = (cooc - cooc_data).abs().mean().item()
    assert cooc_error < (cooc_independent - cooc_data).abs().mean().item(), cooc_error
    part, _ = pipeline.sample(num_samples=3, start=5, steps=20, seed=1, batch_size=2)
    assert torch.equal(part, samples[5:8])
    from fundiff.plotting import save_picture

    assert save_picture(str(tmp_path / "samples.png"), samples, pipeline.spec)
    assert (tmp_path / "samples.png").stat().st_size > 1000


@pytest.mark.parametrize("schedule_name", ["cosine", "simple-linear"])
def test_training_and_sampling_use_the_chain_grid(registry, schedule_name):
    """Training levels: ``uniform-t`` draws moved by ``training_logsnr`` land on the grid
    levels lambda(k / T), every step k in 1 .. T with frequency 1 / T (within Z_SCORE
    binomial standard errors of 50000 draws), and snapping again changes nothing. Sampling
    levels: a grid that is not on the chain's (karras spacing, and uniform with steps not
    dividing T) is moved onto grid levels, strictly decreasing in noise, ending clean."""
    chain = registry.build("chain", "d3pm-uniform", num_steps=20)
    schedule = registry.build("schedule", schedule_name)
    weighting = registry.build("weighting", "uniform-t")
    n = 50000
    drawn = weighting.sample_logsnr(rng.uniform(0, STREAM, 7, torch.arange(n)).to(torch.float64), schedule)
    snapped = chain.training_logsnr(drawn, schedule)
    grid = schedule.logsnr(torch.arange(1, 21, dtype=torch.float64) / 20)
    k = chain.grid_step(snapped, schedule)
    assert torch.equal(snapped, grid[k.long() - 1])
    assert torch.equal(chain.training_logsnr(snapped, schedule), snapped)
    counts = torch.bincount(k.long() - 1, minlength=20).to(torch.float64)
    assert ((counts / n - 1 / 20).abs() <= Z_SCORE * math.sqrt(0.05 * 0.95 / n)).all(), counts
    for spacing, steps in (("karras", 12), ("uniform", 7)):
        levels = registry.build("spacing", spacing).levels(schedule, chain, steps)
        moved = chain.sampling_levels(levels, schedule)
        noisy = torch.tensor([level.logsnr for level in moved[:-1]], dtype=torch.float64)
        assert moved[-1].is_clean and all(b.logsnr > a.logsnr for a, b in zip(moved, moved[1:]))
        on_grid = chain.grid_step(noisy, schedule)
        assert torch.equal(noisy, grid[on_grid.long() - 1]), spacing
