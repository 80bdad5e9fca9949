"""The geometric noise levels of NCSN (Song and Ermon 2019, sec. 4.2; the survey's
Table III, ref. [18]), as a continuous schedule: the VE-SDE's sigma(t) (Song et al. 2021,
eq. 31 with t in [0, 1]).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t,    logSNR(t) = -2 log sigma(t)
             = -2 (log sigma_min + t log(sigma_max / sigma_min)),

so logSNR falls linearly in t and the inverse is closed form. logSNR = -2 log sigma is the
variance-exploding reading (alpha = 1); on any other chain the same logSNR values are used
("lambda is the currency"), e.g. on VP the defaults span logSNR in [-7.8, 9.2].
Defaults 0.01 and 50 are the VE-SDE's for CIFAR-10 (Song et al. 2021, appendix C).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, hookimpl
from fundiff.config import doc, greater_than


@attrs.frozen(kw_only=True)
class Exponential(Schedule):
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t: geometric noise levels (NCSN, VE-SDE)."""

    sigma_min: float = attrs.field(default=0.01, validator=greater_than(0.0), metadata=doc("sigma(0), lambda(0) = -2 log sigma_min"))
    sigma_max: float = attrs.field(default=50.0, validator=greater_than(0.0), metadata=doc("sigma(1), lambda(1) = -2 log sigma_max"))

    def __attrs_post_init__(self) -> None:
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must be > sigma_min ({self.sigma_min})")

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        # (1 - t) log sigma_min + t log sigma_max: exact at both ends
        return -2.0 * ((1.0 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max))

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        log_min = math.log(self.sigma_min)
        return (-0.5 * logsnr - log_min) / (math.log(self.sigma_max) - log_min)


@hookimpl
def fundiff_register_schedules(register):
    register("exponential", Exponential)
