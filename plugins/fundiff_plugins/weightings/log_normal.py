"""Log-normal noise-level density (Karras et al. 2022, EDM sec. 5: ln sigma~ ~ N(P_mean,
P_std^2)) with an unweighted loss (``loss``: eps by default, x0 or v).

sigma~ = sigma / alpha = exp(-logSNR / 2), so the density is a normal in logSNR,
lambda ~ N(-2 P_mean, 4 P_std^2), truncated to the schedule's logSNR range (no point masses).
``edm`` is this density with EDM's loss weight instead of an unweighted MSE. A density
weighting: see ``uniform-t``.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import doc, greater_than, one_of

from ._common import LOSS_UNITS, log_unit_weight, normal_logsnr


@attrs.frozen(kw_only=True)
class LogNormal(Weighting):
    """ln sigma~ ~ N(p_mean, p_std^2) truncated to the schedule; the unweighted ``loss`` MSE."""

    p_mean: float = attrs.field(default=-1.2, metadata=doc("mean of ln sigma~"))
    p_std: float = attrs.field(default=1.2, validator=greater_than(0.0), metadata=doc("standard deviation of ln sigma~"))
    loss: str = attrs.field(default="eps", validator=one_of(*LOSS_UNITS), metadata=doc("which MSE is left unweighted: eps, x0 or v"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return normal_logsnr(u, schedule, self.p_mean, self.p_std)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return log_unit_weight(self.loss, logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("log-normal", LogNormal)
