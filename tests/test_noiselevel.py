"""Properties of the core noise-level math (fundiff.noiselevel), in float64.

Tolerances are derived from the conditioning of each formula: ``U`` is float64's epsilon
and ``R`` a budget of roundings (a handful per formula, doubled for round trips). For
example x0_from_eps computes (x_t - sigma eps) / alpha, so an error of U |x_t| in x_t
becomes U |x_t| / alpha in x0: the bound is R U (|x0| + (sigma / alpha) |eps|).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fundiff
from fundiff import DiscreteSchedule, Level, noiselevel, rng
from fundiff.components import CATEGORICAL_STATE
from fundiff.testing import levels, logsnrs, seeds, shapes

U = float(torch.finfo(torch.float64).eps)
R = 64

FAMILIES = {
    "vp": noiselevel.vp_alpha_sigma,  # alpha^2 + sigma^2 = 1
    "ve": noiselevel.ve_alpha_sigma,  # alpha = 1
}


def data(seed: int, shape: tuple[int, ...], n: int = 4):
    """x0 (scaled by 2), eps and an independent perturbation, each (n, *shape), float64."""
    ids = torch.arange(n)
    return (
        2.0 * rng.normal(seed, 1000, 0, ids, shape),
        rng.normal(seed, 1000, 1, ids, shape),
        rng.normal(seed, 1000, 2, ids, shape),
    )


def vp_level(logsnr: float) -> Level:
    alpha, sigma = noiselevel.vp_alpha_sigma(logsnr)
    return Level(logsnr, alpha, sigma)


# --------------------------------------------------------------------------------------
# Conversions between predictions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(lam=logsnrs(-20.0, 20.0), seed=seeds(), shape=shapes())
@example(lam=-20.0, seed=0, shape=(3,))
@example(lam=20.0, seed=0, shape=(3,))
@example(lam=0.0, seed=1, shape=(1,))
def test_round_trips_x0_eps_v_score(family, lam, seed, shape):
    """x_t = alpha x0 + sigma eps (DDPM eq. 4); converting x0 -> eps -> x0, eps -> score ->
    eps (score = -eps / sigma, Song et al. 2021 eq. 5 / Tweedie), score -> x0 (Tweedie's
    formula) and (x0, eps) -> v -> x0 (v = alpha eps - sigma x0, Salimans and Ho 2022 sec. 4)
    recovers the input, on VP and on alpha = 1 chains.

    Bounds: recovering x0 from eps or the score divides by alpha, so the error is
    R U (|x0| + (sigma / alpha) |eps|); recovering eps from x0 is R U ((alpha / sigma) |x0|
    + |eps|); x0 from v divides alpha x_t - sigma v by alpha^2 + sigma^2, which is well
    conditioned: R U (|x0| + |eps|).
    """
    alpha, sigma = FAMILIES[family](torch.tensor(lam, dtype=torch.float64))
    a, s = alpha.item(), sigma.item()
    x0, eps, _ = data(seed, shape)
    x_t = alpha * x0 + sigma * eps
    sx, se = x0.abs().max().item(), eps.abs().max().item()
    tol_x0 = R * U * (sx + (s / a) * se)
    tol_eps = R * U * ((a / s) * sx + se)

    eps_back = noiselevel.eps_from_x0(x0, x_t, alpha, sigma)
    assert (eps_back - eps).abs().max().item() <= tol_eps
    x0_back = noiselevel.x0_from_eps(eps_back, x_t, alpha, sigma)
    assert (x0_back - x0).abs().max().item() <= 2 * tol_x0  # the eps error, carried back

    score = noiselevel.score_from_eps(eps, sigma)
    assert (noiselevel.eps_from_score(score, sigma) - eps).abs().max().item() <= R * U * se
    assert (noiselevel.x0_from_score(score, x_t, alpha, sigma) - x0).abs().max().item() <= tol_x0

    v = noiselevel.v_from_x0_eps(x0, eps, alpha, sigma)
    assert (noiselevel.x0_from_v(v, x_t, alpha, sigma) - x0).abs().max().item() <= R * U * (sx + se)
    # v's eps is eps_from_x0 of v's x0: (alpha / sigma) amplifies the x0 error
    eps_from_v = noiselevel.eps_from_x0(noiselevel.x0_from_v(v, x_t, alpha, sigma), x_t, alpha, sigma)
    assert (eps_from_v - eps).abs().max().item() <= R * U * (1 + a / s) * (sx + se)


@given(lam=logsnrs(-20.0, 20.0))
@example(lam=-20.0)
@example(lam=20.0)
@example(lam=0.0)
def test_vp_identity_and_logsnr_inverse(lam):
    """VP marginals (DDPM eq. 4; VP-SDE): alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)
    satisfy alpha^2 + sigma^2 = 1, and log(alpha^2 / sigma^2) gives lambda back.

    Host floats and tensors agree. alpha and sigma carry a few U of relative error, so the
    sum is within R U of 1 and the log ratio within R U (1 + |lambda|) (the log of a value
    rounded to a few U, plus the log's own relative rounding).
    """
    a, s = noiselevel.vp_alpha_sigma(lam)
    assert abs(a * a + s * s - 1.0) <= R * U
    assert abs(noiselevel.logsnr_from_alpha_sigma(a, s) - lam) <= R * U * (1 + abs(lam))
    ta, ts = noiselevel.vp_alpha_sigma(torch.tensor(lam, dtype=torch.float64))
    assert ta.dtype == torch.float64
    assert abs(ta.item() - a) <= R * U * a and abs(ts.item() - s) <= R * U * s
    back = noiselevel.logsnr_from_alpha_sigma(ta, ts)
    assert abs(back.item() - lam) <= R * U * (1 + abs(lam))
    assert abs(noiselevel.snr(lam) - a * a / (s * s)) <= R * U * noiselevel.snr(lam)


def test_logsnr_endpoints():
    """The clean level: sigma = 0 is lambda = +inf, alpha = 0 is lambda = -inf (host floats)."""
    assert noiselevel.logsnr_from_alpha_sigma(1.0, 0.0) == math.inf
    assert noiselevel.logsnr_from_alpha_sigma(0.0, 1.0) == -math.inf
    assert noiselevel.vp_alpha_sigma(math.inf) == (1.0, 0.0)
    assert noiselevel.ve_alpha_sigma(math.inf) == (1.0, 0.0)


# --------------------------------------------------------------------------------------
# Transitions and posteriors
# --------------------------------------------------------------------------------------


def _pair(lam_t: float, gap: float) -> tuple[Level, Level]:
    return vp_level(min(lam_t + gap, 20.0)), vp_level(lam_t)


@given(lam_t=logsnrs(-20.0, 19.0), gap=st.floats(1e-6, 40.0))
@example(lam_t=-20.0, gap=40.0)
@example(lam_t=19.0, gap=1e-6)
@example(lam_t=0.0, gap=1e-6)
@example(lam_t=-20.0, gap=1e-6)
def test_posterior_matches_textbook_formula(lam_t, gap):
    """q(x_s | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, var) for s less noisy than t (VDM,
    Kingma et al. 2021, eq. 7 and app. A), with the transition of transition():

        coef_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2,  coef_xt = alpha_{t|s} sigma_s^2 / sigma_t^2,
        var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2,     sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.

    The textbook sigma_{t|s}^2 cancels: its relative error is ~U / (1 - r) with
    r = SNR_t / SNR_s; and the level's lambda and (alpha, sigma) are consistent only to
    U (1 + |lambda|). Relative tolerance: R U (1 + |lambda_s| + |lambda_t|) / (1 - r).
    Also 0 <= var <= sigma_s^2.
    """
    s, t = _pair(lam_t, gap)
    if not s.logsnr > t.logsnr:
        return
    coef_x0, coef_xt, var = noiselevel.posterior(s, t)
    alpha_ts, var_ts = noiselevel.transition(s, t)
    assert alpha_ts == t.alpha / s.alpha
    ref_x0 = s.alpha * var_ts / t.sigma**2
    ref_xt = alpha_ts * s.sigma**2 / t.sigma**2
    ref_var = var_ts * s.sigma**2 / t.sigma**2
    one_minus_r = -math.expm1(t.logsnr - s.logsnr)
    rel = R * U * (1 + abs(s.logsnr) + abs(t.logsnr)) / one_minus_r
    assert abs(coef_x0 - ref_x0) <= rel * abs(ref_x0) + R * U * s.alpha
    assert abs(coef_xt - ref_xt) <= R * U * ref_xt
    assert abs(var - ref_var) <= rel * ref_var + R * U * s.sigma**2
    assert 0.0 <= var <= s.sigma**2


_REGISTRY = fundiff.Registry.discover()


#: categorical chains store keep probabilities as (alpha, sigma), not Gaussian marginals: their
#: own posterior is checked by fundiff.testing.check_chain and tests/test_chains_categorical.py
_NOT_CATEGORICAL = [n for n in _REGISTRY.names("chain") if CATEGORICAL_STATE not in _REGISTRY.resolve("chain", n).cls.provides]


@pytest.mark.parametrize("chain_name", _NOT_CATEGORICAL)
@given(data=st.data())
def test_posterior_is_consistent_with_the_marginals(registry, chain_name, data):
    """For every registered chain and levels s less noisy than t, the posterior
    q(x_s | x_t, x0) = N(c0 x0 + ct x_t, var) must average back to the marginal
    q(x_s | x0) = N(alpha_s x0, sigma_s^2) over x_t ~ q(x_t | x0) = N(alpha_t x0, sigma_t^2):

        c0 + ct alpha_t = alpha_s   (law of total expectation),
        var + ct^2 sigma_t^2 = sigma_s^2   (law of total variance),

    and the transition composes: alpha_{t|s} alpha_s = alpha_t, sigma_{t|s}^2 >= 0 (VDM,
    Kingma et al. 2021, eq. 5-7). Both sides are sums of non-negative terms, so the only
    error is the level's lambda vs (alpha, sigma) rounding: R U (1 + |lambda_s| + |lambda_t|)
    relative to alpha_s resp. sigma_s^2.
    """
    chain = registry.build("chain", chain_name)
    s, t = data.draw(levels(chain, -20.0, 20.0))
    c0, ct, var = noiselevel.posterior(s, t)
    alpha_ts, var_ts = noiselevel.transition(s, t)
    tol = R * U * (1 + abs(s.logsnr) + abs(t.logsnr))
    assert abs(c0 + ct * t.alpha - s.alpha) <= tol * s.alpha
    assert abs(var + ct * ct * t.sigma**2 - s.sigma**2) <= tol * s.sigma**2
    assert abs(alpha_ts * s.alpha - t.alpha) <= tol * t.alpha
    assert var_ts >= 0.0 and 0.0 <= var <= s.sigma**2


@given(lam_t=logsnrs(-20.0, 20.0))
def test_posterior_at_clean_level(lam_t):
    """At the clean level s (sigma_s = 0, lambda_s = inf) the posterior is the point
    x_s = alpha_s x0: coefficients (alpha_s, 0) and variance 0."""
    s = vp_level(math.inf)
    t = vp_level(lam_t)
    assert noiselevel.posterior(s, t) == (s.alpha, 0.0, 0.0)
    with pytest.raises(ValueError, match="sigma > 0"):
        noiselevel.posterior(t, s)


class _Betas(DiscreteSchedule):
    """A DiscreteSchedule with given betas (a test double of the core base class)."""

    def __init__(self, betas: list[float]):
        self._betas = torch.tensor(betas, dtype=torch.float64)
        self.num_steps = len(betas)

    def betas(self) -> torch.Tensor:
        return self._betas


@given(betas=st.lists(st.floats(1e-5, 0.5), min_size=2, max_size=60))
@example(betas=[1e-5, 1e-5])
@example(betas=[0.5] * 60)
@example(betas=[1e-4, 0.02])
def test_posterior_equals_ddpm_formulas_on_a_discrete_chain(betas):
    """Consecutive steps k-1 -> k of a DiscreteSchedule: the core posterior equals DDPM's
    (Ho et al. 2020, eq. 6-7)

        mu_tilde = sqrt(ab_{k-1}) beta_k / (1 - ab_k) x0 + sqrt(1 - beta_k) (1 - ab_{k-1}) / (1 - ab_k) x_t,
        beta_tilde_k = (1 - ab_{k-1}) / (1 - ab_k) beta_k,

    with ab = alpha_bar = cumprod(1 - beta) and 1 - ab evaluated as -expm1(log ab). The
    levels come from the continuous map at t = k / T, so this also checks that it sits on
    the discrete chain. Relative tolerance R U (1 + |lambda_{k-1}| + |lambda_k|) / (1 - r):
    1 - r = beta_k / (1 - ab_k) is the cancellation in the posterior.
    """
    schedule = _Betas(betas)
    steps = schedule.num_steps
    log_ab = schedule.log_alpha_bar_grid()
    beta = schedule.betas()
    for k in range(1, steps + 1):
        s = vp_level(schedule.logsnr_at((k - 1) / steps))
        t = vp_level(schedule.logsnr_at(k / steps))
        coef_x0, coef_xt, var = noiselevel.posterior(s, t)
        ab_prev, ab = math.exp(log_ab[k - 1].item()), math.exp(log_ab[k].item())
        om_prev, om = -math.expm1(log_ab[k - 1].item()), -math.expm1(log_ab[k].item())
        b = beta[k - 1].item()
        ref_x0 = math.sqrt(ab_prev) * b / om
        ref_xt = math.sqrt(1.0 - b) * om_prev / om
        ref_var = om_prev / om * b
        one_minus_r = b / om
        lam_s = 0.0 if s.is_clean else abs(s.logsnr)
        rel = R * U * (1 + lam_s + abs(t.logsnr)) / one_minus_r
        where = f"k={k}, T={steps}"
        assert abs(coef_x0 - ref_x0) <= rel * ref_x0, where
        assert abs(coef_xt - ref_xt) <= rel * ref_xt + R * U, where
        assert abs(var - ref_var) <= rel * ref_var, where
        assert 0.0 <= var <= s.sigma**2, where
        assert math.isclose(ab, t.alpha**2, rel_tol=R * U * (1 + abs(t.logsnr)))


# --------------------------------------------------------------------------------------
# Loss identities
# --------------------------------------------------------------------------------------


@given(lam=logsnrs(-20.0, 20.0), seed=seeds(), shape=shapes())
@example(lam=-20.0, seed=0, shape=(2,))
@example(lam=20.0, seed=0, shape=(2,))
def test_eps_and_v_mse_in_x0_units(lam, seed, shape):
    """For the same x0 estimate, ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 (the eps-MSE is
    the SNR-weighted x0-MSE, Kingma et al. 2021 eq. 13 / Salimans and Ho 2022 sec. 4) and, on
    VP, ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2 (Salimans and Ho 2022, eq. 9's
    "SNR+1" weighting). The core's log_x0_mse_factor_eps / _v are these logs.

    Relative error of the measured ratio: twice that of the difference eps_hat - eps, whose
    rounding is R U ((alpha/sigma)(|x0| + |x0_hat|) + |eps|) against its own size
    (alpha/sigma) |dx|; plus R U (1 + |lambda|) for the logs.
    """
    alpha, sigma = noiselevel.vp_alpha_sigma(torch.tensor(lam, dtype=torch.float64))
    a, s = alpha.item(), sigma.item()
    x0, eps, dx = data(seed, shape, n=1)
    x0_hat = x0 + dx
    x_t = alpha * x0 + sigma * eps
    dx2 = ((x0_hat - x0) ** 2).sum().item()
    scale = x0.abs().max().item() + x0_hat.abs().max().item() + eps.abs().max().item()
    dx_rms = math.sqrt(dx2 / dx.numel())

    eps_hat = noiselevel.eps_from_x0(x0_hat, x_t, alpha, sigma)
    ratio_eps = ((eps_hat - eps) ** 2).sum().item() / dx2
    rel_eps = 2 * R * U * (scale * (1 + s / a)) / dx_rms
    assert abs(ratio_eps / noiselevel.snr(lam) - 1) <= rel_eps

    v = noiselevel.v_from_x0_eps(x0, eps, alpha, sigma)
    v_hat = noiselevel.v_from_x0_eps(x0_hat, eps_hat, alpha, sigma)
    ratio_v = ((v_hat - v) ** 2).sum().item() / dx2
    rel_v = 2 * R * U * (scale * (1 + s / a)) / dx_rms
    assert abs(ratio_v / (noiselevel.snr(lam) + 1) - 1) <= rel_v

    log_tol = R * U * (1 + abs(lam))
    assert abs(noiselevel.log_x0_mse_factor_eps(a, s) - math.log(ratio_eps)) <= rel_eps + log_tol
    assert abs(noiselevel.log_x0_mse_factor_v(a, s) - math.log(ratio_v)) <= rel_v + log_tol
    # tensor and host forms agree
    assert abs(noiselevel.log_x0_mse_factor_v(alpha, sigma).item() - noiselevel.log_x0_mse_factor_v(a, s)) <= log_tol


def test_append_dims():
    """append_dims reshapes per-sample values (B,) to (B, 1, ..., 1)."""
    x = torch.arange(3.0)
    assert noiselevel.append_dims(x, 4).shape == (3, 1, 1, 1)
    assert noiselevel.append_dims(x, 1).shape == (3,)
