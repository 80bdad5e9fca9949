"""Maximum-likelihood weighting: the continuous-time variational bound (VDM, Kingma et al.
2021, eq. 17; "likelihood weighting" g^2 / sigma^2 of Song et al. 2021, "Maximum likelihood
training of score-based diffusion models").

With t uniform on [t_min, 1], the diffusion term of the bound is

    L = 1/2 E_t [ -lambda'(t) ||eps - eps_hat||^2 ] = 1/2 E_t [ -lambda'(t) SNR(t) ||x0 - x0_hat||^2 ],

so the x0-MSE weight is SNR(lambda) (log: lambda) times the per-sample factor
-lambda'(t) / 2, which depends on the schedule at the drawn point and is returned by
``draw``. On a VP chain -lambda'(t) / 2 * sigma^2 is the SDE's g(t)^2, hence the name.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl

VARIATIONAL_BOUND = "variational-bound"


@attrs.frozen(kw_only=True)
class Likelihood(Weighting):
    """t uniform; loss = -lambda'(t)/2 * ||eps_hat - eps||^2, the continuous-time ELBO's diffusion term."""

    provides = frozenset({VARIATIONAL_BOUND})

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        t_min = schedule.t_min
        return schedule.logsnr(t_min + (1.0 - t_min) * u)

    def draw(self, u: torch.Tensor, schedule: Schedule):
        t_min = schedule.t_min
        logsnr, rate = schedule.logsnr_and_rate(t_min + (1.0 - t_min) * u)
        # log(-lambda'(t) / 2); lambda is strictly decreasing, so -rate > 0
        return logsnr, torch.log(-rate) - math.log(2.0)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return logsnr


@hookimpl
def fundiff_register_weightings(register):
    register("likelihood", Likelihood)
