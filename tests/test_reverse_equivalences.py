"""Equivalences of the reverse-process designs: parameterizations describe one denoiser,
weightings are one objective whatever the network predicts, and the limits and special cases
the papers state hold (issue 5, "Properties"; DESIGN.md, "Tests").

Every check is the public ``fundiff.testing`` call a third-party author would use
(check_parameterization_agreement, check_weighting_equivalence, check_stateful_weighting,
target_log_weight), run here on the built-in components, in float64. Tolerances are the kit's
round-off bounds (R U times the conditioning of the conversion); the limit tests bound the
truncation error by the closed-form remainder derived in each docstring.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fundiff
from fundiff import Schedule, noiselevel
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.testing import (
    ROUNDINGS,
    U,
    check_component,
    check_parameterization_agreement,
    check_stateful_weighting,
    check_weighting,
    check_weighting_equivalence,
    logsnrs,
    roundoff_bound,
    seeds,
    shapes,
    target_log_weight,
)
from helpers import RECIPES

_REGISTRY = fundiff.Registry.discover()
#: parameterizations of Gaussian states: those that require no other kind of chain state
#: (categorical ones such as logits have no regression target to compare)
_CHAIN_CAPABILITIES = frozenset().union(*(e.cls.provides for e in _REGISTRY.entries("chain")))
PARAMS = [
    name
    for name in _REGISTRY.names("parameterization")
    if _REGISTRY.resolve("parameterization", name).cls.requires & _CHAIN_CAPABILITIES <= {GAUSSIAN_MARGINALS}
]
WEIGHTINGS = _REGISTRY.names("weighting")
PAIRS = list(itertools.permutations(PARAMS, 2))
FAMILIES = {"vp": noiselevel.vp_alpha_sigma, "alpha=1": noiselevel.ve_alpha_sigma}


def _params(registry):
    return [registry.build("parameterization", name) for name in PARAMS]


def _vp(lam: float):
    lam_t = torch.tensor([lam], dtype=torch.float64)
    alpha, sigma = noiselevel.vp_alpha_sigma(lam_t)
    return lam_t, alpha, sigma


class RectifiedFlow(Schedule):
    """alpha = 1 - t, sigma = t (SD3's rectified flow): lambda(t) = -2 logit(t), t in [1e-4, 1]."""

    @property
    def t_min(self) -> float:
        return 1e-4

    def logsnr(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return -2.0 * (torch.log(t) - torch.log1p(-t))

    def t_from_logsnr(self, logsnr):
        return torch.sigmoid(-0.5 * torch.as_tensor(logsnr, dtype=torch.float64))


# ------------------------------------------------------------------ conformance


@pytest.mark.parametrize("name", PARAMS)
def test_parameterization_conforms_on_vp_and_ve(registry, name):
    """check_parameterization on the registered vp and ve chains (round trips, ideal output =
    target, measured MSE factor = stated one)."""
    for chain in ("vp", "ve"):
        check_component("parameterization", registry.build("parameterization", name), chain=registry.build("chain", chain))


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_weighting_conforms_on_several_schedules(registry, name):
    """check_weighting against the kit's schedule and the linear, cosine, edm and
    zero-terminal-SNR schedules; weightings that learn also pass check_stateful_weighting."""
    weighting = registry.build("weighting", name)
    for schedule in (None, "linear", "cosine", "edm", "zero-terminal-snr"):
        check_weighting(weighting, registry.build("schedule", schedule) if schedule else None)
    check_stateful_weighting(weighting)


# ------------------------------------------------------------------ parameterization pairs


@pytest.mark.parametrize("p_name, q_name", PAIRS)
def test_pairs_agree_on_a_grid(registry, p_name, q_name):
    """For every ordered pair (P, Q) at 61 logSNRs in [-15, 15] on both core families:
    Q.target from P's ideal output = Q's ideal output, and D(x) through P = through Q
    (Salimans and Ho 2022 sec. 4; Karras et al. 2022 Table 1: all are reparameterizations of
    one x0 estimate)."""
    check_parameterization_agreement(registry.build("parameterization", p_name), registry.build("parameterization", q_name))


@given(pair=st.sampled_from(PAIRS), lam=logsnrs(-20.0, 20.0), seed=seeds(), shape=shapes())
@example(pair=("edm", "mean"), lam=-20.0, seed=0, shape=(2,))
@example(pair=("score", "switch"), lam=20.0, seed=0, shape=(2,))
@example(pair=("switch", "eps"), lam=0.0, seed=1, shape=(3,))
def test_pairs_agree_at_any_level(pair, lam, seed, shape):
    """The same agreement at any float64 logSNR in [-20, 20] (the switch's crossover 0
    included), any seed and per-sample shape, on both core families."""
    p, q = (_REGISTRY.build("parameterization", n) for n in pair)
    check_parameterization_agreement(p, q, logsnr=[lam], seed=seed, shape=shape)


# ------------------------------------------------------------------ loss identities


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(lam=logsnrs(-20.0, 20.0), seed=seeds())
def test_mse_identities(family, lam, seed):
    """From x_t = alpha x0 + sigma eps: eps_hat - eps = -(alpha / sigma)(x0_hat - x0), so
    eps-MSE = SNR x0-MSE on any chain (Ho et al. 2020 eq. 14 vs. x0 loss); v_hat - v =
    -((alpha^2 + sigma^2) / sigma)(x0_hat - x0), so v-MSE = (SNR + 1) x0-MSE on VP
    (Salimans and Ho 2022 sec. 4) and (alpha^2 + sigma^2)^2 / sigma^2 times it in general.
    Computed with the core conversions; relative bound 2 * roundoff / RMS of the difference."""
    alpha, sigma = FAMILIES[family](torch.tensor(lam, dtype=torch.float64))
    a, s = float(alpha), float(sigma)
    x0 = 2.0 * fundiff.rng.normal(seed, 1000, 0, torch.arange(1), (16,))
    eps = fundiff.rng.normal(seed, 1000, 1, torch.arange(1), (16,))
    x0_hat = x0 + fundiff.rng.normal(seed, 1000, 2, torch.arange(1), (16,))
    x_t = a * x0 + s * eps
    eps_hat = noiselevel.eps_from_x0(x0_hat, x_t, a, s)
    v = noiselevel.v_from_x0_eps(x0, eps, a, s)
    v_hat = noiselevel.v_from_x0_eps(x0_hat, eps_hat, a, s)
    x0_mse = ((x0_hat - x0) ** 2).mean()
    scale = float(x0.abs().max() + x0_hat.abs().max() + eps.abs().max())
    tol = roundoff_bound(a, s, scale)
    for what, mse, factor, diff in (
        ("eps", ((eps_hat - eps) ** 2).mean(), math.exp(lam), eps_hat - eps),
        ("v", ((v_hat - v) ** 2).mean(), (a * a + s * s) ** 2 / (s * s), v_hat - v),
    ):
        rms = float(diff.pow(2).mean().sqrt())
        rel = 2 * tol * (1 + float(diff.abs().max()) / scale) / rms + ROUNDINGS * U * (1 + abs(lam))
        assert abs(float(mse / (factor * x0_mse)) - 1) <= rel, what
    if family == "vp":
        assert abs((a * a + s * s) ** 2 / (s * s) / (math.exp(lam) + 1) - 1) <= ROUNDINGS * U * (1 + abs(lam))


# ------------------------------------------------------------------ weightings across parameterizations


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_weighting_is_one_objective_on_a_grid(registry, name):
    """Each weighting's trainer loss is w(lambda) x0-MSE whichever registered
    parameterization predicts the same x0_hat (Kingma et al. 2021 eq. 13; Kingma and Gao 2023
    sec. 2), at 61 logSNRs on both core families: this is what catches a per-target formula
    applied to the wrong target (min-SNR for v)."""
    check_weighting_equivalence(registry.build("weighting", name), _params(registry))


@given(name=st.sampled_from(WEIGHTINGS), lam=logsnrs(-20.0, 20.0), seed=seeds(), shape=shapes())
@example(name="min-snr", lam=math.log(5.0), seed=0, shape=(2,))
@example(name="edm", lam=-20.0, seed=0, shape=(1,))
def test_weighting_is_one_objective_at_any_level(name, lam, seed, shape):
    """The same at any float64 logSNR in [-20, 20], seed and shape."""
    check_weighting_equivalence(_REGISTRY.build("weighting", name), _params(_REGISTRY), logsnr=[lam], seed=seed, shape=shape)


@given(lam=logsnrs(-20.0, 20.0), gamma=st.floats(0.1, 20.0))
@example(lam=math.log(5.0), gamma=5.0)
def test_min_snr_per_target_forms(registry, lam, gamma):
    """Hang et al. 2023 (Min-SNR-gamma), per target on a VP chain: the weight on the eps-MSE
    is min(SNR, gamma) / SNR, on the x0-MSE min(SNR, gamma), on the v-MSE
    min(SNR, gamma) / (SNR + 1) — the trainer's weight (target_log_weight) for each."""
    weighting = registry.build("weighting", "min-snr", gamma=gamma)
    logsnr, alpha, sigma = _vp(lam)
    snr, m = math.exp(lam), min(math.exp(lam), gamma)
    for target, expected in (("eps", m / snr), ("x0", m), ("v", m / (snr + 1))):
        got = float(torch.exp(target_log_weight(weighting, registry.build("parameterization", target), logsnr, alpha, sigma)))
        assert abs(got / expected - 1) <= ROUNDINGS * U * (1 + abs(lam)), (target, got, expected)


def test_min_snr_for_v_pitfall_is_caught(registry):
    """A control for the equivalence check: a v-parameterization that declares the eps MSE
    factor (i.e. applies the eps form min(SNR, gamma) / SNR to the v-loss) fails
    check_weighting_equivalence — so the check is not vacuous."""
    v_class = type(registry.build("parameterization", "v"))

    class BuggyV(v_class):
        def log_x0_mse_factor(self, alpha, sigma):
            return noiselevel.log_x0_mse_factor_eps(alpha, sigma)

    with pytest.raises(AssertionError, match="BuggyV"):
        check_weighting_equivalence(registry.build("weighting", "min-snr"), [BuggyV()])


@given(lam=logsnrs(-20.0, 20.0))
def test_stated_forms_of_the_simple_weightings(registry, lam):
    """In x0 units on VP (log w): snr = 0 (the x0-MSE); snr-plus-one = log(SNR + 1), so its
    weight on the v-MSE is 1 (Salimans and Ho 2022); truncated-snr = max(lambda, 0) = the max
    of the x0 and eps forms (ibid. eq. 9 with the max); p2 with gamma = 0 is the eps-MSE and
    with k = 1, gamma = 1 it is SNR / (1 + SNR) = alpha^2 (Choi et al. 2022 eq. 8);
    uniform-t's loss units give eps-mse, snr, snr-plus-one."""
    logsnr, alpha, sigma = _vp(lam)
    tol = ROUNDINGS * U * (1 + abs(lam))
    w = lambda name, **kw: float(registry.build("weighting", name, **kw).log_x0_weight(logsnr, alpha, sigma))  # noqa: E731
    tw = lambda wn, pn: float(target_log_weight(registry.build("weighting", wn), registry.build("parameterization", pn), logsnr, alpha, sigma))  # noqa: E731
    assert w("snr") == 0.0 and abs(tw("snr", "x0")) == 0.0
    assert abs(w("snr-plus-one") - math.log1p(math.exp(lam))) <= tol if lam < 30 else True
    assert abs(tw("snr-plus-one", "v")) <= tol
    assert w("truncated-snr") == max(w("snr"), w("eps-mse"))
    assert abs(w("p2", gamma=0.0) - w("eps-mse")) <= tol
    assert abs(w("p2", k=1.0, gamma=1.0) - 2 * math.log(float(alpha))) <= tol
    for loss, same in (("eps", "eps-mse"), ("x0", "snr"), ("v", "snr-plus-one")):
        assert abs(w("uniform-t", loss=loss) - w(same)) <= tol


# ------------------------------------------------------------------ edm: limits and special cases


def _edm_case(lam: float, seed: int, family: str = "vp"):
    alpha, sigma = FAMILIES[family](torch.tensor(lam, dtype=torch.float64))
    a, s = float(alpha), float(sigma)
    x0 = 2.0 * fundiff.rng.normal(seed, 1000, 0, torch.arange(1), (8,))
    eps = fundiff.rng.normal(seed, 1000, 1, torch.arange(1), (8,))
    return a, s, x0, eps, a * x0 + s * eps


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(lam=logsnrs(-10.0, 10.0), seed=seeds())
def test_edm_reduces_to_eps_and_x0_prediction(registry, family, lam, seed):
    """EDM's ideal output (Karras et al. 2022 Table 1, on x~ = x_t / alpha, sigma~ = sigma /
    alpha) is F = (rho x0 / sd - eps) / sqrt(1 + rho^2) with rho = sigma~ / sd, so it depends on
    the noise level and sigma_data only through rho:

    * rho -> 0 (sigma_data -> infinity at fixed noise, or sigma -> 0): F -> -eps, eps-prediction,
      with |F + eps| <= rho |x0| / sd + rho^2 |eps| / 2;
    * rho -> infinity (sigma_data -> 0, or sigma -> infinity): sd F -> x0, x0-prediction, with
      |sd F - x0| <= |x0| / (2 rho^2) + sd |eps| / rho.

    Checked at sd = 10^k for k = 2..5 and 10^-k (each side's remainder bound plus round-off),
    together with D = c_skip x~ + c_out F: for F = -eps it tends to eps-prediction's x0
    x~ - sigma~ eps (c_skip -> 1, c_out -> sigma~), for F = x0 / sd to x0 (c_skip -> 0,
    c_out -> sd), within |x~| / rho^2 + |x0| / (2 rho^2)."""
    a, s, x0, eps, x_t = _edm_case(lam, seed, family)
    sig = s / a
    scale = float(x0.abs().max() + eps.abs().max())
    for k in (2, 3, 4, 5):
        for sd, limit in ((sig * 10.0**k, "eps"), (sig * 10.0**-k, "x0")):
            p = registry.build("parameterization", "edm", sigma_data=sd)
            f = p.target(x0, eps, x_t, a, s)
            rho = sig / sd
            r_off = roundoff_bound(a, s, scale) * (1 + 1 / sd + sd)
            if limit == "eps":
                bound = rho * float(x0.abs().max()) / sd + rho**2 * float(eps.abs().max()) / 2
                assert float((f + eps).abs().max()) <= bound + r_off
                # D through edm with F = -eps_hat equals eps-prediction's x0 up to the same order
                d_edm = p.to_x0(-eps, x_t, a, s)
                d_eps = noiselevel.x0_from_eps(eps, x_t, a, s)
                assert float((d_edm - d_eps).abs().max()) <= sig * bound + r_off * (1 + sig)
            else:
                bound = float(x0.abs().max()) / (2 * rho**2) + sd * float(eps.abs().max()) / rho
                assert float((sd * f - x0).abs().max()) <= bound + sd * r_off
                # D = c_skip x~ + c_out F with F = x0 / sd: c_skip = 1 / (1 + rho^2) <= 1 / rho^2 and
                # |c_out / sd - 1| <= 1 / (2 rho^2)
                bound_d = (float(x_t.abs().max()) / a + float(x0.abs().max()) / 2) / rho**2
                assert float((p.to_x0(x0 / sd, x_t, a, s) - x0).abs().max()) <= bound_d + r_off * (1 + float(x_t.abs().max()))


@given(lam=logsnrs(-20.0, 20.0), seed=seeds())
def test_edm_with_unit_sigma_data_is_minus_v_on_vp(registry, lam, seed):
    """With sigma_data = 1 on a VP chain, sqrt(1 + rho^2) = 1 / alpha and F = sigma x0 -
    alpha eps = -v: EDM's preconditioning is v-prediction with the sign flipped (and
    c_in = 1: the network sees x_t unchanged). Round-off bound in v units."""
    a, s, x0, eps, x_t = _edm_case(lam, seed)
    p = registry.build("parameterization", "edm", sigma_data=1.0)
    v = registry.build("parameterization", "v")
    scale = float(x0.abs().max() + eps.abs().max())
    tol = roundoff_bound(a, s, scale)
    assert float((p.target(x0, eps, x_t, a, s) + v.target(x0, eps, x_t, a, s)).abs().max()) <= tol
    assert abs(float(p.input_scale(torch.tensor(a), torch.tensor(s))) - 1.0) <= ROUNDINGS * U
    lam_t, alpha, sigma = _vp(lam)
    assert abs(float(p.log_x0_mse_factor(alpha, sigma) - v.log_x0_mse_factor(alpha, sigma))) <= ROUNDINGS * U * (1 + abs(lam))


@given(lam=logsnrs(-20.0, 20.0), sd=st.floats(0.05, 5.0))
def test_edm_weighting_gives_unit_weight_on_the_edm_target(registry, lam, sd):
    """EDM sec. 5: lambda(sigma) = 1 / c_out(sigma)^2, so with the edm weighting and the edm
    parameterization of the same sigma_data the weight on the F-MSE is exactly 1 ("unit loss
    weight"), on any chain (both depend on sigma~ only)."""
    weighting = registry.build("weighting", "edm", sigma_data=sd)
    param = registry.build("parameterization", "edm", sigma_data=sd)
    for family in FAMILIES.values():
        logsnr = torch.tensor([lam], dtype=torch.float64)
        alpha, sigma = family(logsnr)
        assert abs(float(target_log_weight(weighting, param, logsnr, alpha, sigma))) <= ROUNDINGS * U * (1 + abs(lam) + abs(math.log(sd)))


# ------------------------------------------------------------------ score, mean, switch


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(lam=logsnrs(-12.0, 12.0), delta=st.floats(0.01, 3.0), seed=seeds())
def test_mean_is_the_posterior_mean(registry, family, lam, delta, seed):
    """The mean parameterization's target is alpha_t E[x_s / alpha_s | x_t, x0] for lambda_s =
    lambda_t + delta, from fundiff.noiselevel.posterior (VDM eq. 7; DDPM eq. 7): on alpha = 1
    exactly the posterior mean, on VP DDPM's mu~ times alpha_t / alpha_s. Bound: round-off in
    x_t units."""
    alpha, sigma = FAMILIES[family](torch.tensor(lam, dtype=torch.float64))
    chain = registry.build("chain", "vp" if family == "vp" else "ve")
    t_level, s_level = chain.level(lam), chain.level(lam + delta)
    coef_x0, coef_xt, _ = noiselevel.posterior(s_level, t_level)
    a, s, x0, eps, x_t = _edm_case(lam, seed, family)
    mu = (coef_x0 * x0 + coef_xt * x_t) * (t_level.alpha / s_level.alpha)
    got = registry.build("parameterization", "mean", delta=delta).target(x0, eps, x_t, a, s)
    scale = float(x0.abs().max() + x_t.abs().max())
    assert float((got - mu).abs().max()) <= ROUNDINGS * U * scale * (1 + 1 / delta)


@given(lam=logsnrs(-20.0, 20.0), crossover=st.floats(-5.0, 5.0), seed=seeds())
def test_switch_is_x0_below_and_eps_above_the_crossover(registry, lam, crossover, seed):
    """The switch (survey sec. 4.2.4) is x0-prediction where logSNR < crossover and
    eps-prediction at and above it: same target and MSE factor, bit for bit; the score
    parameterization's target is -eps / sigma (Tweedie)."""
    a, s, x0, eps, x_t = _edm_case(lam, seed)
    switch = registry.build("parameterization", "switch", crossover=crossover)
    lam_t, alpha, sigma = _vp(lam)
    lam_back = float(noiselevel.logsnr_from_alpha_sigma(alpha, sigma))
    same = registry.build("parameterization", "eps" if lam_back >= crossover else "x0")
    assert torch.equal(switch.target(x0, eps, x_t, alpha[:, None], sigma[:, None]), same.target(x0, eps, x_t, a, s))
    assert float(switch.log_x0_mse_factor(alpha, sigma)) == float(torch.as_tensor(same.log_x0_mse_factor(alpha, sigma)))
    assert torch.equal(registry.build("parameterization", "score").target(x0, eps, x_t, a, s), -eps / s)


# ------------------------------------------------------------------ densities


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@pytest.mark.parametrize("schedule_name", [None, "edm", "cosine"])
def test_log_normal_density_is_the_truncated_normal(registry, schedule_name):
    """EDM (Karras et al. 2022 sec. 5): ln sigma~ ~ N(P_mean, P_std^2), i.e. logSNR ~
    N(-2 P_mean, 4 P_std^2), truncated to the schedule's range. With N stratified uniforms
    u_i = (i + 1/2) / N the empirical CDF of the draws is the exact truncated CDF within 1 / N
    (one stratum) at every point; edm and log-normal share the density."""
    schedule = registry.build("schedule", schedule_name) if schedule_name else fundiff.testing._LinearLogSNRSchedule()
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    lo, hi = schedule.logsnr_at(1.0), schedule.logsnr_at(schedule.t_min)
    for name, kw in (("edm", {}), ("log-normal", {"p_mean": 0.5, "p_std": 2.0})):
        weighting = registry.build("weighting", name, **kw)
        pm, ps = weighting.p_mean, weighting.p_std
        lam = weighting.sample_logsnr(u, schedule)
        assert (lam >= lo).all() and (lam <= hi).all()
        # CDF of lambda = P(ln sigma~ >= -x/2): 1 - Phi((-x/2 - pm)/ps), renormalised on [lo, hi]
        cdf = lambda x: 1.0 - _normal_cdf((-0.5 * x - pm) / ps)  # noqa: E731
        for x in torch.linspace(lo + 1e-3, hi - 1e-3, 17).tolist():
            exact = (cdf(x) - cdf(lo)) / (cdf(hi) - cdf(lo))
            empirical = float((lam <= x).double().mean())
            assert abs(empirical - exact) <= 1.0 / n + 1e-12, (name, x, empirical, exact)


@given(m=st.floats(-2.0, 2.0), s=st.floats(0.3, 3.0))
def test_logit_normal_on_rectified_flow_is_log_normal(registry, m, s):
    """On the rectified-flow schedule (alpha = 1 - t, sigma = t; Esser et al. 2024), sigma~ =
    t / (1 - t), so logit(t) ~ N(m, s^2) is ln sigma~ ~ N(m, s^2): logit-normal(m, s) draws the
    logSNRs of log-normal(p_mean = m, p_std = s), both truncated at t_min. Bound: the rounding
    of sigmoid then logit, amplified by |d lambda / d logit t| = 2 and by 1 / (t (1 - t))."""
    schedule = RectifiedFlow()
    u = torch.linspace(1e-6, 1 - 1e-6, 257, dtype=torch.float64)
    a = registry.build("weighting", "logit-normal", m=m, s=s).sample_logsnr(u, schedule)
    b = registry.build("weighting", "log-normal", p_mean=m, p_std=s).sample_logsnr(u, schedule)
    t = torch.sigmoid(-0.5 * b)
    tol = ROUNDINGS * U * (1 + b.abs()) / (t * (1 - t))
    assert ((a - b).abs() <= tol).all(), float((a - b).abs().max())


def test_sigmoid_weighting_tends_to_likelihood(registry):
    """Kingma and Gao 2023: w(lambda) = sigmoid(b - lambda) weights the ELBO integrand, so as
    b -> infinity it is the likelihood weighting: the same draws and per-sample factor
    -lambda'(t) / 2, and log weights within log(1 + e^(lambda - b)) <= e^(lambda - b)."""
    schedule = registry.build("schedule", "cosine")
    u = torch.linspace(0.01, 0.99, 33, dtype=torch.float64)
    sig = registry.build("weighting", "sigmoid", bias=60.0)
    lik = registry.build("weighting", "likelihood")
    (l1, e1), (l2, e2) = sig.draw(u, schedule), lik.draw(u, schedule)
    assert torch.equal(l1, l2) and torch.equal(e1, e2)
    alpha, sigma = noiselevel.vp_alpha_sigma(l1)
    diff = (sig.log_x0_weight(l1, alpha, sigma) - lik.log_x0_weight(l1, alpha, sigma)).abs()
    assert (diff <= torch.exp(l1 - 60.0) + ROUNDINGS * U * (1 + l1.abs())).all()
    # and it is monotonic (decreasing in lambda) in eps units, as the paper requires
    grid = torch.linspace(-15, 15, 61, dtype=torch.float64)
    eps_w = registry.build("weighting", "sigmoid").log_x0_weight(grid, *noiselevel.vp_alpha_sigma(grid)) - grid
    assert (eps_w[1:] < eps_w[:-1]).all()


# ------------------------------------------------------------------ importance sampling


def test_importance_is_uniform_until_every_bin_is_full(registry):
    """Improved DDPM sec. 3.3: until each bin has `history` losses, t is uniform and the
    importance weight is 1 — the module draws exactly what uniform-t / likelihood draw."""
    schedule = registry.build("schedule", "cosine")
    module = registry.build("weighting", "importance", bins=4, history=2).build_module()
    u = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    logsnr, extra = module.draw(u, schedule)
    ref_logsnr, ref_extra = registry.build("weighting", "likelihood").draw(u, schedule)
    assert torch.allclose(logsnr, ref_logsnr, rtol=0, atol=ROUNDINGS * U * 20) and torch.allclose(extra, ref_extra, rtol=0, atol=ROUNDINGS * U * 20)
    module.update(logsnr[:5], torch.ones(5, dtype=torch.float64))  # some bins filled, not all
    assert torch.equal(module.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))


def test_importance_follows_the_second_moment_and_is_unbiased(registry):
    """After warm-up p_k = (1 - m) sqrt(E[L_k^2]) / sum + m / K (improved DDPM eq. 17 and the
    uniform mixture of its code), and the per-sample weight exp(extra) = 1 / (K p_k) makes the
    estimate unbiased: with N stratified uniforms, mean(w(t_i) f(t_i)) is a midpoint rule of
    the uniform-t integral of f, within max|f'| h + K max|f| h (h the widest t-cell; one cell
    per bin edge may straddle it)."""
    schedule = fundiff.testing._LinearLogSNRSchedule()  # t_min = 0
    k_bins = 4
    config = registry.build("weighting", "importance", bins=k_bins, history=3, uniform_mix=0.1, loss="eps")
    module = config.build_module()
    module.draw(torch.tensor([0.5], dtype=torch.float64), schedule)  # remembers the schedule
    levels = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    centres = (torch.arange(k_bins, dtype=torch.float64) + 0.5) / k_bins
    for _ in range(3):
        # losses arrive importance-weighted; while uniform the weight is 1
        module.update(schedule.logsnr(centres), levels)
    expected = 0.9 * levels / levels.sum() + 0.1 / k_bins
    assert torch.allclose(module.probabilities(), expected, rtol=0, atol=ROUNDINGS * U)
    n = 40000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    logsnr, extra = module.draw(u, schedule)
    t = schedule.t_from_logsnr(logsnr)
    f = lambda x: torch.cos(3 * x) + x**2  # noqa: E731
    estimate = float((torch.exp(extra) * f(t)).mean())
    exact = math.sin(3.0) / 3.0 + 1.0 / 3.0
    h = float((t[1:] - t[:-1]).abs().max())
    assert abs(estimate - exact) <= 5.0 * h + k_bins * 2.0 * h
    # the bins are drawn with the right frequencies
    counts = torch.bincount((t * k_bins).floor().clamp(max=k_bins - 1).long(), minlength=k_bins).double() / n
    assert torch.allclose(counts, expected, rtol=0, atol=1.0 / n + 1e-12)
    # a second update divides the importance weight back out: raw losses are recorded
    module.update(schedule.logsnr(centres), levels / (k_bins * expected))
    assert torch.allclose(module.losses[:, -1], levels, rtol=1e-12)


@pytest.mark.slow
def test_importance_trains_and_resumes_exactly(tmp_path, registry):
    """The trainer calls update after each step, the history lives in the checkpoint, and a
    run resumed from it repeats the uninterrupted one bit for bit (architecture: resuming
    continues exactly)."""
    recipe = fundiff.load_recipe(os.path.join(RECIPES, "two-moons.yaml")).to_dict()
    recipe["weighting"] = {"name": "importance", "bins": 4, "history": 2}
    recipe["denoiser"].update(width=16, depth=1)
    recipe["train"].update({"steps": 12, "batch_size": 16, "checkpoint_every": 6})
    full = fundiff.train(recipe, tmp_path / "full", quiet=True, registry=registry)
    assert bool((full.weighting_module.counts == 2).all())
    half = dict(recipe, train=dict(recipe["train"], steps=6))
    fundiff.train(half, tmp_path / "half", quiet=True, registry=registry)
    resumed = fundiff.train(recipe, tmp_path / "half", resume=True, quiet=True, registry=registry)
    assert torch.equal(resumed.weighting_module.losses, full.weighting_module.losses)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
