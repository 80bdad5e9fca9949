"""Min-SNR-gamma weighting (Hang et al. 2023, "Efficient diffusion training via Min-SNR
weighting strategy", eq. 10 and sec. 3.4): w(lambda) = min(SNR, gamma) in x0 units, t uniform.

The paper's per-target forms follow by dividing by each target's MSE factor:
eps-MSE weight min(SNR, gamma) / SNR, x0-MSE weight min(SNR, gamma), v-MSE weight
min(SNR, gamma) / (SNR + 1) on a VP chain. The last one is the known pitfall: reusing the eps
form min(SNR, gamma) / SNR on a v-loss is a different objective. Stated in x0 units, the
trainer's division by the parameterization's MSE factor produces each form automatically.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import doc, greater_than

from ._common import uniform_t


@attrs.frozen(kw_only=True)
class MinSNR(Weighting):
    """t uniform on [t_min, 1]; w = min(SNR, gamma) on the x0-MSE."""

    gamma: float = attrs.field(default=5.0, validator=greater_than(0.0), metadata=doc("SNR at which the x0 weight is capped"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def log_x0_weight(self, logsnr, alpha, sigma):
        return torch.clamp(logsnr, max=math.log(self.gamma))


@hookimpl
def fundiff_register_weightings(register):
    register("min-snr", MinSNR)
