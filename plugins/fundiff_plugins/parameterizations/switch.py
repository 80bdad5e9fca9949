"""Switched prediction (survey sec. 4.2.4, combinations of targets): x0-prediction at high
noise, eps-prediction at low noise, switched at a crossover logSNR.

eps-prediction recovers x0 as (x_t - sigma eps) / alpha, which amplifies the network's error by
sigma / alpha (large at high noise); x0-prediction has no amplification but its x0-MSE is the
eps-MSE divided by SNR, so at low noise its errors are weighted up in eps units. Predicting x0
where logSNR < ``crossover`` and eps where logSNR >= ``crossover`` keeps the error
amplification of the recovered x0 below max(1, exp(-crossover / 2)) everywhere.

The switch is hard, per sample: the output space jumps at the crossover. A *smooth* blend
c1 x0 + c2 eps with c1, c2 > 0 is singular wherever c1 - c2 alpha / sigma = 0 (x0 cannot be
recovered), so the smooth versions of this idea are v-prediction and ``edm``'s
preconditioning, whose ideal outputs (x0 / sd at high noise, -eps at low noise) blend x0
and -eps with opposite signs.

to_x0, from_x0, target and the MSE factor (0 for x0, lambda for eps) are chosen element-wise
from logSNR = log(alpha^2 / sigma^2); the division by alpha only happens where eps is
predicted, so zero-terminal-SNR schedules (alpha = 0, logSNR = -inf) work.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Parameterization, hookimpl, noiselevel
from fundiff.config import doc

from ._common import as_tensor


@attrs.frozen(kw_only=True)
class SwitchPrediction(Parameterization):
    """x0-prediction below the crossover logSNR, eps-prediction at and above it."""

    crossover: float = attrs.field(default=0.0, metadata=doc("logSNR at and above which the network predicts eps (x0 below it)"))

    def _predicts_eps(self, alpha, sigma):
        alpha, sigma = as_tensor(alpha), as_tensor(sigma)
        return noiselevel.logsnr_from_alpha_sigma(alpha, sigma) >= self.crossover

    def target(self, x0, eps, x_t, alpha, sigma):
        return torch.where(self._predicts_eps(alpha, sigma), eps, x0)

    def to_x0(self, out, x_t, alpha, sigma):
        use_eps = self._predicts_eps(alpha, sigma)
        safe_alpha = torch.where(use_eps, as_tensor(alpha), torch.ones_like(as_tensor(alpha)))
        return torch.where(use_eps, noiselevel.x0_from_eps(out, x_t, safe_alpha, sigma), out)

    def from_x0(self, x0, x_t, alpha, sigma):
        use_eps = self._predicts_eps(alpha, sigma)
        safe_sigma = torch.where(use_eps, as_tensor(sigma), torch.ones_like(as_tensor(sigma)))
        return torch.where(use_eps, noiselevel.eps_from_x0(x0, x_t, alpha, safe_sigma), x0)

    def log_x0_mse_factor(self, alpha, sigma):
        alpha, sigma = as_tensor(alpha), as_tensor(sigma)
        logsnr = noiselevel.logsnr_from_alpha_sigma(alpha, sigma)
        return torch.where(logsnr >= self.crossover, logsnr, torch.zeros_like(logsnr))


@hookimpl
def fundiff_register_parameterizations(register):
    register("switch", SwitchPrediction)
