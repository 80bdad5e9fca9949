"""SNR + 1 weighting: the v-MSE (Salimans and Ho 2022, "Progressive distillation", sec. 4:
||v_hat - v||^2 = (1 + SNR) ||x0_hat - x0||^2 on a variance-preserving chain), t uniform.

Definition on every chain: w(lambda) = SNR + 1 in x0 units, a function of logSNR alone. On a
VP chain that is the unweighted v-MSE. On a chain with alpha^2 + sigma^2 = c != 1 the v-MSE
is c^2 / sigma^2 = c (SNR + 1) times the x0-MSE, so this weighting is the v-MSE divided by
alpha^2 + sigma^2 — the v-MSE of the VP chain with the same logSNR, which keeps the objective a
function of the noise level rather than of the chain's scale.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl

from ._common import log_unit_weight, uniform_t


@attrs.frozen(kw_only=True)
class SNRPlusOne(Weighting):
    """t uniform on [t_min, 1]; w = SNR + 1 (the v-MSE on VP chains)."""

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def log_x0_weight(self, logsnr, alpha, sigma):
        return log_unit_weight("v", logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("snr-plus-one", SNRPlusOne)
