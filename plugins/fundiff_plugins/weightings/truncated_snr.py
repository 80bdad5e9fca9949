"""Truncated SNR weighting (Salimans and Ho 2022, "Progressive distillation", sec. 4, eq. 9's
max(||x0_hat - x0||^2, ||eps_hat - eps||^2)): w(lambda) = max(SNR, 1) in x0 units, t uniform.

The x0-MSE at high noise and the eps-MSE at low noise, switching at SNR = 1 (logSNR 0).
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl

from ._common import uniform_t


@attrs.frozen(kw_only=True)
class TruncatedSNR(Weighting):
    """t uniform on [t_min, 1]; w = max(SNR, 1) on the x0-MSE."""

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def log_x0_weight(self, logsnr, alpha, sigma):
        return torch.clamp(logsnr, min=0.0)


@hookimpl
def fundiff_register_weightings(register):
    register("truncated-snr", TruncatedSNR)
