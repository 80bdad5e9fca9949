"""DDPM's "simple" loss: the unweighted eps-MSE with t uniform (Ho et al. 2020, eq. 14).

In x0 units the eps-MSE is SNR(lambda) times the x0-MSE, so log w(lambda) = lambda.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl


@attrs.frozen(kw_only=True)
class EpsMSE(Weighting):
    """t uniform on [t_min, 1]; loss = ||eps_hat - eps||^2 (= SNR * ||x0_hat - x0||^2)."""

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        t_min = schedule.t_min
        return schedule.logsnr(t_min + (1.0 - t_min) * u)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return logsnr


@hookimpl
def fundiff_register_weightings(register):
    register("eps-mse", EpsMSE)
