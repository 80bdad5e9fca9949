"""Posterior-mean prediction: DDPM's "mu" option (Ho et al. 2020, sec. 3.2 and eq. 7, the
parameterization that predicts mu~_t(x_t, x0) directly; survey sec. 4.2.4) for a
continuous-time chain.

A continuous chain has no "previous step", so the step is a parameter: s is the level whose
logSNR is ``delta`` above t's (lambda_s = lambda_t + delta, SNR ratio r = exp(-delta)), a
step of fixed size in logSNR. It cannot be a fixed step in t: a parameterization sees
(alpha, sigma) only, not the schedule. By the posterior q(x_s | x_t, x0) of
``fundiff.noiselevel.posterior`` (VDM eq. 7),

    E[x_s | x_t, x0] / alpha_s = (1 - r) x0 + r x_t / alpha_t,

and the network predicts that mean at x_t's scale,

    mu = alpha_t E[x_s / alpha_s | x_t, x0] = alpha_t (1 - r) x0 + r x_t,

so x0 = (mu - r x_t) / (alpha_t (1 - r)) and the mu-MSE is alpha_t^2 (1 - r)^2 times the x0-MSE.

Why alpha_t and not alpha_s: alpha_s is the chain's, and a parameterization cannot know the
chain from (alpha_t, sigma_t) alone (a VP and a VE chain at the same logSNR need different
alpha_s). On a chain with constant alpha (VE) mu is exactly the posterior mean of x_s; on a
VP chain it is DDPM's mu~ times alpha_t / alpha_s in [exp(-delta / 2), 1] — a per-level
constant, so the same information and, since weightings are stated in x0 units, the same
training objective. DDPM's discrete chain has steps of varying logSNR size; pick ``delta``
near the typical step (a 1000-step linear schedule moves ~0.02 per step mid-way).

x0 divides by alpha_t (1 - r): zero-terminal-SNR schedules are refused, and small ``delta``
amplifies rounding by 1 / (1 - r) ~ 1 / delta (why DDPM found this option hard to train).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Parameterization, hookimpl
from fundiff.config import doc, greater_than

from ._common import as_tensor, refuse_zero_terminal_snr


@attrs.frozen(kw_only=True)
class MeanPrediction(Parameterization):
    """The network predicts the posterior mean of the level delta higher in logSNR, at x_t's scale."""

    delta: float = attrs.field(
        default=0.1, validator=greater_than(0.0), metadata=doc("logSNR step to the predicted level s: lambda_s = lambda_t + delta")
    )

    def check_recipe(self, components):
        """x0 = (mu - r x_t) / (alpha (1 - r)): refused with zero-terminal-SNR schedules."""
        return refuse_zero_terminal_snr("mean-prediction", components)

    @property
    def _r(self) -> float:
        return math.exp(-self.delta)  # SNR_t / SNR_s

    @property
    def _one_minus_r(self) -> float:
        return -math.expm1(-self.delta)

    def target(self, x0, eps, x_t, alpha, sigma):
        return self.from_x0(x0, x_t, alpha, sigma)

    def to_x0(self, out, x_t, alpha, sigma):
        return (out - self._r * x_t) / (alpha * self._one_minus_r)

    def from_x0(self, x0, x_t, alpha, sigma):
        return (alpha * self._one_minus_r) * x0 + self._r * x_t

    def log_x0_mse_factor(self, alpha, sigma):
        return 2.0 * (torch.log(as_tensor(alpha)) + math.log(self._one_minus_r))


@hookimpl
def fundiff_register_parameterizations(register):
    register("mean", MeanPrediction)
