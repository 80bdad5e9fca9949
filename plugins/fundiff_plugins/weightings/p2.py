"""Perception-prioritized weighting (Choi et al. 2022, "Perception prioritized training of
diffusion models", eq. 8): the eps-MSE weighted by 1 / (k + SNR)^gamma, t uniform.

In x0 units w(lambda) = SNR / (k + SNR)^gamma; log w = lambda - gamma log(k + e^lambda), with
the log-sum computed without overflow. gamma = 0 is the eps-MSE; k = 1, gamma = 1 is
SNR / (1 + SNR) = alpha^2 on a VP chain.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import at_least, doc

from ._common import uniform_t


@attrs.frozen(kw_only=True)
class P2(Weighting):
    """t uniform on [t_min, 1]; eps-MSE weight 1 / (k + SNR)^gamma."""

    k: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("offset k in 1 / (k + SNR)^gamma (keeps the weight finite at SNR -> 0)"))
    gamma: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("exponent gamma; 0 gives the eps-MSE"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def log_x0_weight(self, logsnr, alpha, sigma):
        log_k = torch.full_like(logsnr, math.log(self.k) if self.k > 0 else -math.inf)
        return logsnr - self.gamma * torch.logaddexp(log_k, logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("p2", P2)
