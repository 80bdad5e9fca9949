"""The continuous VP schedule of score-based SDEs (Song et al. 2021, eq. 11 and 33): the
integral of a linear beta(t) = beta_min + t (beta_max - beta_min) over t in [0, 1].

The VP-SDE's perturbation kernel has mean coefficient
alpha(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min), so

    log alpha_bar(t) = 2 log alpha(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2),
    logSNR(t) = log alpha_bar - log(1 - alpha_bar),

the continuous limit of DDPM's linear betas (beta_min = T beta_1, beta_max = T beta_T with
T = 1000 gives 0.1 and 20). logSNR(0) = +inf, so t_min = eps = 1e-3 (score_sde's sampling
eps for VP models; logSNR(1e-3) ~ 9.2). The inverse solves the quadratic for t in the
cancellation-free form t = 2L / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) L))
with L = -log alpha_bar = softplus(-lambda).
"""

from __future__ import annotations


import attrs
import torch

from fundiff import Schedule, hookimpl
from fundiff.config import at_least, doc, greater_than, in_range


@attrs.frozen(kw_only=True)
class VPContinuous(Schedule):
    """The VP-SDE's schedule: log alpha_bar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2)."""

    beta_min: float = attrs.field(default=0.1, validator=at_least(0.0), metadata=doc("beta(0)"))
    beta_max: float = attrs.field(default=20.0, validator=greater_than(0.0), metadata=doc("beta(1)"))
    eps: float = attrs.field(
        default=1e-3, validator=in_range(0.0, 1.0, low_open=True, high_open=True), metadata=doc("t_min: logSNR(0) is +inf")
    )

    def __attrs_post_init__(self) -> None:
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max ({self.beta_max}) must be >= beta_min ({self.beta_min})")

    @property
    def t_min(self) -> float:
        return self.eps

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        log_ab = -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)
        # log(1 - alpha_bar) = log(-expm1(log alpha_bar)): exact for small t
        return log_ab - torch.log(-torch.expm1(log_ab))

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        # L = -log alpha_bar = log(1 + exp(-lambda)); logaddexp keeps it exact for large |lambda|
        big_l = torch.logaddexp(-logsnr, torch.zeros((), dtype=torch.float64))
        root = torch.sqrt(self.beta_min**2 + 2.0 * (self.beta_max - self.beta_min) * big_l)
        return 2.0 * big_l / (self.beta_min + root)


@hookimpl
def fundiff_register_schedules(register):
    register("vp-continuous", VPContinuous)
