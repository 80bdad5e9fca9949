"""The noise-level math every component shares.

Every Gaussian forward process in the survey (section 2.2, 3.2) has marginals

    x_t = alpha_t * x0 + sigma_t * eps,        eps ~ N(0, I)

and the log signal-to-noise ratio ``lambda_t = log(alpha_t**2 / sigma_t**2)`` is the one
currency components exchange: a schedule maps t to lambda, a chain maps lambda to
(alpha, sigma), a parameterization converts between network outputs and x0 / eps / score /
v with (alpha, sigma) alone, and a sampler walks a decreasing sequence of noise levels.

Two flavours of each formula live here:

* host scalars (Python floats, i.e. float64) for the per-step coefficients of samplers;
  they are computed on the CPU so a sampling loop never synchronises with a device;
* tensors (any dtype and device) for training and for the network-output conversions.

All functions are float64-safe: pass float64 tensors and the result is float64.
"""

from __future__ import annotations

import math
from typing import Any, Union

import attrs
import torch

Scalar = Union[float, torch.Tensor]

# --------------------------------------------------------------------------------------
# logSNR <-> (alpha, sigma)
# --------------------------------------------------------------------------------------


def logsnr_from_alpha_sigma(alpha: Scalar, sigma: Scalar) -> Scalar:
    """lambda = log(alpha^2 / sigma^2)."""
    if isinstance(alpha, torch.Tensor) or isinstance(sigma, torch.Tensor):
        return 2.0 * (torch.log(torch.as_tensor(alpha)) - torch.log(torch.as_tensor(sigma)))
    if sigma == 0.0:
        return math.inf
    if alpha == 0.0:
        return -math.inf
    return 2.0 * (math.log(alpha) - math.log(sigma))


def _sigmoid(x: float) -> float:
    """Overflow-free logistic function on host floats."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def vp_alpha_sigma(logsnr: Scalar) -> tuple[Scalar, Scalar]:
    """Variance-preserving marginals: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda).

    This is the only pair with alpha^2 + sigma^2 = 1 and the given lambda (DDPM, Ho et al.
    2020, eq. 4; the VP-SDE of Song et al. 2021).
    """
    if isinstance(logsnr, torch.Tensor):
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    return math.sqrt(_sigmoid(logsnr)), math.sqrt(_sigmoid(-logsnr))


def ve_alpha_sigma(logsnr: Scalar) -> tuple[Scalar, Scalar]:
    """Variance-exploding marginals: alpha = 1, sigma = exp(-lambda / 2) (NCSN, VE-SDE)."""
    if isinstance(logsnr, torch.Tensor):
        return torch.ones_like(logsnr), torch.exp(-0.5 * logsnr)
    return 1.0, math.exp(-0.5 * logsnr) if logsnr != math.inf else 0.0


def snr(logsnr: Scalar) -> Scalar:
    """alpha^2 / sigma^2 = exp(lambda)."""
    return torch.exp(logsnr) if isinstance(logsnr, torch.Tensor) else math.exp(logsnr)


# --------------------------------------------------------------------------------------
# Noise levels on the host
# --------------------------------------------------------------------------------------


@attrs.frozen
class Level:
    """One noise level as host floats: lambda, alpha and sigma (float64).

    ``sigma == 0`` (lambda = +inf) is the clean data level a sampler ends on.
    """

    logsnr: float
    alpha: float
    sigma: float
    #: the chain that made this level (set by ``Chain.level``): samplers reach the chain's
    #: own math through it (exact inner levels, categorical posteriors, manifold maps)
    chain: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def is_clean(self) -> bool:
        return self.sigma == 0.0


_VP_TOL = 1e-9  # |alpha^2 + sigma^2 - 1| below this: the level lies on a variance-preserving chain


def level_between(t: Level, s: Level, logsnr: float) -> Level:
    """A level at ``logsnr`` on the chain of the grid levels t and s (for a sampler's inner
    evaluations: midpoints, Runge-Kutta stages, adaptive steps).

    Samplers see levels, not the chain, so the chain is recognised from the neighbours: both
    with alpha^2 + sigma^2 = 1 (VP: alpha^2 = sigmoid(lambda)) or both with alpha = 1 (VE) are
    extended exactly; otherwise log alpha is interpolated linearly in lambda. In every case
    alpha / sigma = exp(lambda / 2) exactly, so a denoiser that uses the level's own alpha and
    sigma (an exact one) is exact on any chain. A level made by a chain (``level.chain`` set)
    asks that chain, which is exact for every chain.
    """
    if t.chain is not None:
        return t.chain.level(float(logsnr))
    if abs(t.alpha**2 + t.sigma**2 - 1.0) <= _VP_TOL and abs(s.alpha**2 + s.sigma**2 - 1.0) <= _VP_TOL:
        alpha, sigma = vp_alpha_sigma(float(logsnr))
        return Level(float(logsnr), alpha, sigma)
    if t.alpha == 1.0 and s.alpha == 1.0:
        return Level(float(logsnr), 1.0, math.exp(-0.5 * logsnr))
    if not (math.isfinite(t.logsnr) and math.isfinite(s.logsnr)) or t.alpha <= 0.0 or s.alpha <= 0.0:
        raise ValueError("an inner level needs two noisy neighbours with alpha > 0")
    w = (logsnr - t.logsnr) / (s.logsnr - t.logsnr)
    alpha = math.exp((1.0 - w) * math.log(t.alpha) + w * math.log(s.alpha))
    return Level(float(logsnr), alpha, alpha * math.exp(-0.5 * logsnr))


def transition(s: Level, t: Level) -> tuple[float, float]:
    """The Gaussian transition q(x_t | x_s) for s less noisy than t.

    Follows from the two marginals alone (Kingma et al. 2021, VDM, eq. 5):
    alpha_{t|s} = alpha_t / alpha_s,  sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
    Returns (alpha_{t|s}, sigma_{t|s}^2).
    """
    alpha_ts = t.alpha / s.alpha
    var_ts = t.sigma**2 - alpha_ts**2 * s.sigma**2
    # lambda_s >= lambda_t  <=>  var_ts >= 0; tiny negatives are rounding.
    return alpha_ts, max(var_ts, 0.0)


def posterior(s: Level, t: Level) -> tuple[float, float, float]:
    """The posterior q(x_s | x_t, x0) for s less noisy than t.

    mean = coef_x0 * x0 + coef_xt * x_t, variance ``var`` (VDM, eq. 7; DDPM eq. 6-7 is the
    discrete special case). Returns (coef_x0, coef_xt, var).

    Written with the SNR ratio r = exp(lambda_t - lambda_s) <= 1 so that it stays accurate
    when s and t are close (sigma_{t|s}^2 / sigma_t^2 = 1 - r, computed with expm1).
    """
    if t.sigma == 0.0:
        raise ValueError("posterior: the noisier level t must have sigma > 0")
    if s.sigma == 0.0:
        return s.alpha, 0.0, 0.0  # the clean level is x_s = alpha_s * x0, no noise left
    # one_minus_r = sigma_{t|s}^2 / sigma_t^2 with r = SNR_t / SNR_s = exp(lambda_t - lambda_s)
    one_minus_r = -math.expm1(t.logsnr - s.logsnr)
    alpha_ts = t.alpha / s.alpha
    coef_xt = alpha_ts * s.sigma**2 / t.sigma**2  # = r / alpha_{t|s}
    coef_x0 = s.alpha * one_minus_r
    var = s.sigma**2 * one_minus_r
    return coef_x0, coef_xt, var


# --------------------------------------------------------------------------------------
# Conversions between predictions (tensors; alpha and sigma broadcastable)
# --------------------------------------------------------------------------------------


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """v = alpha eps - sigma x0 (Salimans and Ho 2022, progressive distillation, sec. 4)."""
    return alpha * eps - sigma * x0


def x0_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """Invert v for any chain: from x_t = a x0 + s eps and v = a eps - s x0,
    x0 = (a x_t - s v) / (a^2 + s^2); on a VP chain the denominator is 1."""
    return (alpha * x_t - sigma * v) / (alpha * alpha + sigma * sigma)


def score_from_eps(eps: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """grad_x log p_t(x_t) = -eps / sigma (Tweedie; Song et al. 2021, eq. 5 with Gaussian q)."""
    return -eps / sigma


def eps_from_score(score: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """eps = -sigma * score."""
    return -sigma * score


def x0_from_score(score: torch.Tensor, x_t: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """Tweedie's formula: E[x0 | x_t] = (x_t + sigma^2 score) / alpha."""
    return (x_t + sigma * sigma * score) / alpha


def log_x0_mse_factor_eps(alpha: Scalar, sigma: Scalar) -> Scalar:
    """log(||eps_hat - eps||^2 / ||x0_hat - x0||^2) = lambda: eps-MSE is SNR times x0-MSE."""
    return logsnr_from_alpha_sigma(alpha, sigma)


def log_x0_mse_factor_v(alpha: Scalar, sigma: Scalar) -> Scalar:
    """log(||v_hat - v||^2 / ||x0_hat - x0||^2) = 2 log((alpha^2 + sigma^2) / sigma).

    On a VP chain this is log(SNR + 1) (Salimans and Ho 2022, eq. 9's weighting).
    """
    if isinstance(alpha, torch.Tensor) or isinstance(sigma, torch.Tensor):
        alpha = torch.as_tensor(alpha)
        sigma = torch.as_tensor(sigma)
        return 2.0 * (torch.log(alpha * alpha + sigma * sigma) - torch.log(sigma))
    return 2.0 * (math.log(alpha * alpha + sigma * sigma) - math.log(sigma))


def append_dims(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample tensor of shape (B,) to (B, 1, ..., 1) with ``ndim`` dims."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))
