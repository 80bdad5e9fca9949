"""The cosine schedule of improved DDPM (Nichol and Dhariwal 2021, eq. 17).

alpha_bar(t) = f(t) / f(0) with f(t) = cos(((t + s) / (1 + s)) * pi / 2)^2, discretised into
T betas beta_k = 1 - alpha_bar(k/T) / alpha_bar((k-1)/T), each clipped at max_beta (0.999 in
the paper) so that the last step does not reach alpha_bar = 0.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import DiscreteSchedule, hookimpl
from fundiff.config import at_least, doc, in_range


@attrs.frozen(kw_only=True)
class Cosine(DiscreteSchedule):
    """Improved DDPM's cosine schedule: alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2), normalised."""

    offset: float = attrs.field(default=0.008, validator=in_range(0.0, 1.0, high_open=True), metadata=doc("s, keeps beta small near t = 0"))
    max_beta: float = attrs.field(default=0.999, validator=in_range(0.0, 1.0, low_open=True, high_open=True), metadata=doc("clip of each beta"))
    num_steps: int = attrs.field(default=1000, validator=at_least(2), metadata=doc("T, the number of discrete steps"))

    def betas(self) -> torch.Tensor:
        t = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        # log f(t) - log f(0), in log space for accuracy near t = 1
        log_f = 2.0 * torch.log(torch.cos((t + self.offset) / (1.0 + self.offset) * (math.pi / 2)))
        log_ratio = log_f[1:] - log_f[:-1]  # log(alpha_bar_k / alpha_bar_{k-1})
        return (-torch.expm1(log_ratio)).clamp(max=self.max_beta)


@hookimpl
def fundiff_register_schedules(register):
    register("cosine", Cosine)
