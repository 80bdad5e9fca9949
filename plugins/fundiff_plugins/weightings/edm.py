"""EDM's training weighting (Karras et al. 2022, "Elucidating the design space of
diffusion-based generative models", sec. 5 and Table 1): log sigma~ ~ N(P_mean, P_std^2) and
lambda(sigma~) = (sigma~^2 + sd^2) / (sigma~ sd)^2 on the x0-MSE.

sigma~ = sigma / alpha = exp(-logSNR / 2) on any Gaussian chain (EDM's sigma after dividing by
the scale s(t)). sample_logsnr draws z = Phi^-1(u), sigma~ = exp(P_mean + P_std z) and returns
logSNR = -2 log sigma~; the normal is *truncated* to the schedule's logSNR range (renormalised,
so the ends get no point mass, unlike clipping). With EDM's own range sigma in [0.002, 80] the
truncation removes about 2e-5 of the mass.

In log form: log w = log(sigma~^2 + sd^2) - 2 log sigma~ - 2 log sd = log(1 + sd^2 SNR) - 2 log sd,
computed as softplus(lambda + 2 log sd) - 2 log sd without overflow. Combined with the ``edm``
parameterization (the same sigma_data), the weight on the F-MSE is lambda c_out^2 = 1: EDM's
"unit loss weight" (sec. 5).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import doc, greater_than

from ._common import normal_logsnr


@attrs.frozen(kw_only=True)
class EDMWeighting(Weighting):
    """Log-normal sigma~ density (truncated to the schedule); w = (sigma~^2 + sd^2) / (sigma~ sd)^2."""

    p_mean: float = attrs.field(default=-1.2, metadata=doc("mean of log sigma~ (P_mean)"))
    p_std: float = attrs.field(default=1.2, validator=greater_than(0.0), metadata=doc("standard deviation of log sigma~ (P_std)"))
    sigma_data: float = attrs.field(default=0.5, validator=greater_than(0.0), metadata=doc("standard deviation of the data, sigma_data"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return normal_logsnr(u, schedule, self.p_mean, self.p_std)

    def log_x0_weight(self, logsnr, alpha, sigma):
        two_log_sd = 2.0 * math.log(self.sigma_data)
        shifted = logsnr + two_log_sd
        return torch.logaddexp(shifted, torch.zeros_like(shifted)) - two_log_sd


@hookimpl
def fundiff_register_weightings(register):
    register("edm", EDMWeighting)
