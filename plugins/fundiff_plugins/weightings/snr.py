"""The plain x0-MSE: w(lambda) = 1 in x0 units, t uniform (survey sec. 4.3.2: the loss of
x0-prediction without reweighting).

In eps units the weight is 1 / SNR: the eps-MSE is SNR times the x0-MSE. Beware the naming in
the literature: Hang et al. 2023 (Min-SNR) call w = SNR in x0 units — our ``eps-mse`` — the
"SNR weighting"; here, following the registry's design, ``snr`` is the x0-MSE.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl

from ._common import uniform_t


@attrs.frozen(kw_only=True)
class X0MSE(Weighting):
    """t uniform on [t_min, 1]; loss = ||x0_hat - x0||^2."""

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def log_x0_weight(self, logsnr, alpha, sigma):
        return torch.zeros_like(logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("snr", X0MSE)
