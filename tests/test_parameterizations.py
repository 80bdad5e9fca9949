"""Parameterizations: each conforms, they agree pairwise, and the trainer's loss weights
make every parameterization optimise the same objective (DESIGN.md, "Tests").

The pipeline's loss for a parameterization P and weighting W is

    exp(W.log_x0_weight(lambda) - P.log_x0_mse_factor(alpha, sigma)) * ||out - P.target||^2,

computed here without a Pipeline. Tolerances come from fundiff.testing.roundoff_bound: a
conversion loses R U times the conditioning (1 + alpha/sigma + sigma/alpha)(1 + alpha + sigma)
times the data scale.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given

import fundiff
from fundiff import noiselevel, rng
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.testing import U, ROUNDINGS, check_parameterization, logsnrs, roundoff_bound, seeds, shapes
from helpers import kit_pairs

_REGISTRY = fundiff.Registry.discover()
#: what registered chains provide: the kinds of state a parameterization may require
CHAIN_CAPABILITIES = frozenset().union(*(e.cls.provides for e in _REGISTRY.entries("chain")))
#: the parameterizations of Gaussian states (x0, eps, score, v, ...): those that require no
#: other kind of state (categorical ones such as logits have their own checks in fundiff.testing)
PARAMS = [
    name
    for name in _REGISTRY.names("parameterization")
    if _REGISTRY.resolve("parameterization", name).cls.requires & CHAIN_CAPABILITIES <= {GAUSSIAN_MARGINALS}
]
WEIGHTINGS = _REGISTRY.names("weighting")
CHAINS = _REGISTRY.names("chain")
FAMILIES = {"vp": noiselevel.vp_alpha_sigma, "alpha=1": noiselevel.ve_alpha_sigma}


@pytest.mark.parametrize("name", PARAMS)
def test_registered_parameterization_conforms(registry, name):
    """check_parameterization on every registered parameterization of Gaussian states, for
    (alpha, sigma) of both core families (VP and alpha = 1) and of every registered chain
    with Gaussian marginals (helpers.kit_pairs)."""
    param = registry.build("parameterization", name)
    check_parameterization(param)
    for chain in CHAINS:
        if kit_pairs(type(param), registry.resolve("chain", chain).cls, CHAIN_CAPABILITIES):
            check_parameterization(param, registry.build("chain", chain))


def _setup(family: str, lam: float, seed: int, shape: tuple[int, ...]):
    alpha, sigma = FAMILIES[family](torch.tensor([lam], dtype=torch.float64))
    ids = torch.arange(1)
    x0 = 2.0 * rng.normal(seed, 1000, 0, ids, shape)
    eps = rng.normal(seed, 1000, 1, ids, shape)
    x0_hat = x0 + rng.normal(seed, 1000, 2, ids, shape)
    dims = len(shape) + 1
    a, s = noiselevel.append_dims(alpha, dims), noiselevel.append_dims(sigma, dims)
    x_t = a * x0 + s * eps
    scale = x0.abs().max().item() + x0_hat.abs().max().item() + eps.abs().max().item()
    return alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("p_name, q_name", list(itertools.permutations(PARAMS, 2)))
@given(lam=logsnrs(-20.0, 20.0), seed=seeds(), shape=shapes())
@example(lam=-20.0, seed=0, shape=(2,))
@example(lam=20.0, seed=0, shape=(2,))
@example(lam=0.0, seed=3, shape=(1,))
def test_pairs_agree(registry, family, p_name, q_name, lam, seed, shape):
    """Any two parameterizations P, Q describe the same x0 (Salimans and Ho 2022, sec. 4;
    Kingma et al. 2021, app. the equivalence of eps, x0 and v prediction):

    * Q's target follows from P's ideal output: Q.from_x0(P.to_x0(P.target)) = Q.target;
    * to_x0 agrees: P.to_x0(P.from_x0(x0_hat)) = Q.to_x0(Q.from_x0(x0_hat)) for any x0_hat.

    Bounds: roundoff_bound in x0 units; in Q's output units times (1 + |Q's output| / scale).
    """
    p = registry.build("parameterization", p_name)
    q = registry.build("parameterization", q_name)
    alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale = _setup(family, lam, seed, shape)
    tol = roundoff_bound(alpha.item(), sigma.item(), scale)
    q_target = q.target(x0, eps, x_t, a, s)
    via_p = q.from_x0(p.to_x0(p.target(x0, eps, x_t, a, s), x_t, a, s), x_t, a, s)
    tol_q = 2 * tol * (1 + q_target.abs().max().item() / scale)
    assert (via_p - q_target).abs().max().item() <= tol_q
    x0_p = p.to_x0(p.from_x0(x0_hat, x_t, a, s), x_t, a, s)
    x0_q = q.to_x0(q.from_x0(x0_hat, x_t, a, s), x_t, a, s)
    assert (x0_p - x0_q).abs().max().item() <= 2 * tol
    assert (x0_p - x0_hat).abs().max().item() <= tol


@pytest.mark.parametrize("weighting_name", WEIGHTINGS)
@given(lam=logsnrs(-20.0, 20.0), seed=seeds(), shape=shapes())
@example(lam=-20.0, seed=0, shape=(2,))
@example(lam=20.0, seed=0, shape=(2,))
def test_weighted_losses_equal_across_parameterizations(registry, weighting_name, lam, seed, shape):
    """With the trainer's loss weight exp(log w(lambda) - log_x0_mse_factor), the weighted
    target-space loss of every parameterization equals w(lambda) ||x0_hat - x0||^2 for the
    same x0 estimate: one weighting is one objective whatever the network predicts (Kingma et
    al. 2021 eq. 13; Kingma and Gao 2023, "Understanding diffusion objectives", sec. 2). For
    eps-mse (w = SNR, Ho et al. 2020 eq. 14) the common value is DDPM's simple loss
    ||eps_hat - eps||^2.

    Relative tolerance: twice the relative rounding of each output difference (its
    roundoff_bound against the difference's RMS) plus R U (1 + |lambda|) for the log weights.
    """
    weighting = registry.build("weighting", weighting_name)
    alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale = _setup("vp", lam, seed, shape)
    logsnr = torch.tensor([lam], dtype=torch.float64)
    log_w = torch.as_tensor(weighting.log_x0_weight(logsnr, alpha, sigma), dtype=torch.float64)
    x0_mse = ((x0_hat - x0) ** 2).sum().item()
    reference = torch.exp(log_w).item() * x0_mse
    tol_abs = roundoff_bound(alpha.item(), sigma.item(), scale)
    losses = {}
    for name in PARAMS:
        param = registry.build("parameterization", name)
        out = param.from_x0(x0_hat, x_t, a, s)
        target = param.target(x0, eps, x_t, a, s)
        factor = torch.as_tensor(param.log_x0_mse_factor(alpha, sigma), dtype=torch.float64)
        weight = torch.exp(log_w - factor).item()
        diff = out - target
        loss = weight * (diff**2).sum().item()
        rms = (diff**2).mean().sqrt().item()
        out_scale = out.abs().max().item() + target.abs().max().item()
        rel = 2 * tol_abs * (1 + out_scale / scale) / rms + ROUNDINGS * U * (1 + abs(lam))
        assert abs(loss / reference - 1) <= rel, f"{name}: {loss} vs w * x0-MSE {reference}"
        losses[name] = loss
    if weighting_name == "eps-mse":
        eps_hat = noiselevel.eps_from_x0(x0_hat, x_t, a, s)
        simple = ((eps_hat - eps) ** 2).sum().item()
        rel = 2 * tol_abs * (1 + sigma.item() / alpha.item()) / ((eps_hat - eps) ** 2).mean().sqrt().item()
        assert abs(simple / reference - 1) <= rel + ROUNDINGS * U * (1 + abs(lam))


@pytest.mark.parametrize("name", PARAMS)
def test_trainer_weight_depends_on_parameterization(registry, name):
    """A control for the property above: without dividing by the MSE factor, the losses of
    parameterizations with different factors differ (so the equality is not vacuous)."""
    factors = {}
    alpha, sigma = noiselevel.vp_alpha_sigma(torch.tensor([3.0], dtype=torch.float64))
    for other in PARAMS:
        factors[other] = float(torch.as_tensor(registry.build("parameterization", other).log_x0_mse_factor(alpha, sigma)))
    # several targets differ in their MSE factor (a parameterization may coincide with another
    # at this level, as `switch` does with eps above its crossover)
    assert len(set(round(v, 9) for v in factors.values())) >= 3, factors
