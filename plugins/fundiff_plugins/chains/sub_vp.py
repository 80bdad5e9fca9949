"""The sub-variance-preserving chain (sub-VP SDE, Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", eq. 12; survey sec. 3.2).

The sub-VP SDE  dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dW  has the
perturbation kernel N(alpha x0, sigma^2 I) with the VP-SDE's mean coefficient
alpha = exp(-1/2 int_0^t beta) but standard deviation sigma = 1 - alpha^2 (their eq. 29), so
its variance (1 - alpha^2)^2 stays below the VP chain's 1 - alpha^2 at every alpha in (0, 1).

In the logSNR currency: lambda = log(alpha^2 / sigma^2) = log(alpha^2 / (1 - alpha^2)^2).
Solving for alpha: with alpha / sigma = e^{lambda / 2} and sigma = 1 - alpha^2,
alpha^2 + e^{-lambda / 2} alpha - 1 = 0, whose positive root is

    alpha = 2 / (u + sqrt(u^2 + 4)),      sigma = u alpha,      u = e^{-lambda / 2},

and, multiplying through by v = 1 / u = e^{lambda / 2},

    alpha = 2 v / (1 + sqrt(1 + 4 v^2)),  sigma = 2 / (1 + sqrt(1 + 4 v^2)).

Both forms add positive terms only (no cancellation); the first is used for lambda >= 0
(u <= 1) and the second for lambda < 0 (v < 1), so nothing overflows and alpha, sigma carry a
few roundings of relative error at every lambda, including lambda = +-inf. Differentiating
log alpha = log 2 + lambda / 2 - log(1 + sqrt(1 + 4 e^lambda)) gives the closed form

    d log alpha / d lambda = 1 / (2 sqrt(1 + 4 e^lambda)) = sigma / (2 (1 + alpha^2))

(VP: sigma^2 / 2). The prior at the terminal level is N(0, sigma_T^2 I).

The chain fixes the curve of marginals; the recipe's schedule fixes how t walks along it.
With ``vp-continuous`` the chain is at the VP chain's logSNR at time t, not at Song et al.'s
sub-VP alpha(t): the same marginals visited at a different pace.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Chain, Level, hookimpl
from fundiff.components import GAUSSIAN_MARGINALS


def sub_vp_alpha_sigma(logsnr: float) -> tuple[float, float]:
    """(alpha, sigma) of the sub-VP chain at one logSNR, as host floats (see the module doc)."""
    logsnr = float(logsnr)
    if math.isnan(logsnr):
        raise ValueError("sub-vp: logsnr is NaN")
    if logsnr >= 0.0:
        u = math.exp(-0.5 * logsnr)  # sigma / alpha, in [0, 1]
        denominator = u + math.hypot(u, 2.0)
        return 2.0 / denominator, 2.0 * u / denominator
    v = math.exp(0.5 * logsnr)  # alpha / sigma, in [0, 1)
    denominator = 1.0 + math.hypot(1.0, 2.0 * v)
    return 2.0 * v / denominator, 2.0 / denominator


def sub_vp_alpha_sigma_tensor(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same on tensors (any dtype and device); both branches are finite everywhere, since
    w = exp(-|lambda| / 2) is in [0, 1]."""
    w = torch.exp(-0.5 * logsnr.abs())
    two = torch.full_like(w, 2.0)
    one = torch.ones_like(w)
    high = w + torch.hypot(w, two)  # lambda >= 0: u = w
    low = 1.0 + torch.hypot(one, 2.0 * w)  # lambda < 0: v = w
    positive = logsnr >= 0
    alpha = torch.where(positive, 2.0 / high, 2.0 * w / low)
    sigma = torch.where(positive, 2.0 * w / high, 2.0 / low)
    return alpha, sigma


@attrs.frozen(kw_only=True)
class SubVariancePreserving(Chain):
    """Sub-VP Gaussian chain: x_t = alpha x0 + sigma eps with sigma = 1 - alpha^2 (Song et al. 2021, eq. 12)."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sub_vp_alpha_sigma_tensor(logsnr)

    def level(self, logsnr: float) -> Level:
        alpha, sigma = sub_vp_alpha_sigma(logsnr)
        return Level(logsnr=float(logsnr), alpha=alpha, sigma=sigma)

    def dlog_alpha_dlogsnr(self, logsnr: float) -> float:
        # 1 / (2 sqrt(1 + 4 e^lambda)) = sigma / (2 (1 + alpha^2)): finite and exact at any lambda
        alpha, sigma = sub_vp_alpha_sigma(logsnr)
        return sigma / (2.0 * (1.0 + alpha * alpha))

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        # N(0, sigma_T^2 I): the marginal N(alpha_T x0, sigma_T^2 I) with alpha_T x0 neglected
        return level.sigma * noise


@hookimpl
def fundiff_register_chains(register):
    register("sub-vp", SubVariancePreserving)
