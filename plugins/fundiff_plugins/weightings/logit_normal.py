"""Logit-normal timestep density (Esser et al. 2024, "Scaling rectified flow transformers",
SD3, sec. 3.1: t = sigmoid(m + s z), z ~ N(0, 1)) with an unweighted loss (``loss``: eps by
default, x0 or v).

t is the recipe schedule's t, truncated to [t_min, 1] (renormalised, no point mass), and the
logSNR is the schedule's lambda(t). On the rectified-flow schedule of SD3 (alpha = 1 - t,
sigma = t, so lambda = -2 logit(t)) this is a normal in logSNR and draws the same levels as
``log-normal`` with p_mean = m, p_std = s (sigma~ = t / (1 - t)); on other schedules it puts
the mass in the middle of the schedule's t. SD3's default is m = 0, s = 1. A density
weighting: see ``uniform-t``.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import doc, greater_than, one_of

from ._common import LOSS_UNITS, log_unit_weight, logit, truncated_standard_normal


@attrs.frozen(kw_only=True)
class LogitNormal(Weighting):
    """logit(t) ~ N(m, s^2) truncated to [t_min, 1]; the unweighted ``loss`` MSE."""

    m: float = attrs.field(default=0.0, metadata=doc("mean of logit(t)"))
    s: float = attrs.field(default=1.0, validator=greater_than(0.0), metadata=doc("standard deviation of logit(t)"))
    loss: str = attrs.field(default="eps", validator=one_of(*LOSS_UNITS), metadata=doc("which MSE is left unweighted: eps, x0 or v"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        t_min = schedule.t_min
        z = truncated_standard_normal(u, (logit(t_min) - self.m) / self.s, float("inf"))
        t = torch.sigmoid(self.m + self.s * z).clamp(min=t_min, max=1.0)
        return schedule.logsnr(t)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return log_unit_weight(self.loss, logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("logit-normal", LogitNormal)
