"""The Laplace schedule of Hang et al. 2024, "Improved noise schedule for diffusion
training": logSNR is Laplace(mu, b) distributed when t is uniform, so training time
concentrates around logSNR = mu.

The paper's map is the Laplace quantile function read backwards in t,

    lambda(t) = mu - b sign(0.5 - t) log(1 - 2 |t - 0.5|)      (mu = 0, b = 0.5),

which is +inf at t = 0 and -inf at t = 1. This module truncates it to
[logsnr_min, logsnr_max] by mapping t affinely onto the quantile levels of those two values:
with u = S(lambda) the Laplace survival function,
u(t) = S(logsnr_max) + t (S(logsnr_min) - S(logsnr_max)) and lambda(t) = S^-1(u(t)). It stays
the same curve (a truncated Laplace in lambda), strictly decreasing, with exact finite ends
lambda(0) = logsnr_max and lambda(1) = logsnr_min. With the defaults +-20 the truncated
tails hold 2e-18 of the t range; alpha or sigma there is below e^-10.

u and 1 - u are both carried explicitly (u = u_0 + t w, 1 - u = v_1 + (1 - t) w), so the two
logarithmic branches, mu - b log(2u) for u < 1/2 and mu + b log(2(1 - u)) above, lose no
precision near either end; the inverse is closed form.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, hookimpl
from fundiff.config import doc, greater_than


@attrs.frozen(kw_only=True)
class Laplace(Schedule):
    """logSNR(t) is the Laplace(mu, b) quantile of 1 - t, truncated to [logsnr_min, logsnr_max] (Hang et al. 2024)."""

    mu: float = attrs.field(default=0.0, metadata=doc("location: the logSNR that training visits most"))
    b: float = attrs.field(default=0.5, validator=greater_than(0.0), metadata=doc("scale of the Laplace distribution"))
    logsnr_min: float = attrs.field(default=-20.0, metadata=doc("lambda(1), truncation of the lower tail (< mu)"))
    logsnr_max: float = attrs.field(default=20.0, metadata=doc("lambda(0), truncation of the upper tail (> mu)"))

    def __attrs_post_init__(self) -> None:
        if not self.logsnr_min < self.mu < self.logsnr_max:
            raise ValueError(f"need logsnr_min < mu < logsnr_max, got {self.logsnr_min}, {self.mu}, {self.logsnr_max}")

    def _tails(self) -> tuple[float, float, float]:
        """(u_0, v_1, w): S(logsnr_max), F(logsnr_min) and the probability between them."""
        u0 = 0.5 * math.exp(-(self.logsnr_max - self.mu) / self.b)
        v1 = 0.5 * math.exp((self.logsnr_min - self.mu) / self.b)
        return u0, v1, (1.0 - u0) - v1

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        u0, v1, w = self._tails()
        u = u0 + t * w  # upper-tail probability of lambda(t)
        v = v1 + (1.0 - t) * w  # 1 - u, computed without cancellation
        upper = self.mu - self.b * torch.log(2.0 * u)
        lower = self.mu + self.b * torch.log(2.0 * v)
        return torch.where(u < 0.5, upper, lower)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        u0, v1, w = self._tails()
        from_upper = (0.5 * torch.exp(-(logsnr - self.mu) / self.b) - u0) / w
        from_lower = 1.0 - (0.5 * torch.exp((logsnr - self.mu) / self.b) - v1) / w
        return torch.where(logsnr >= self.mu, from_upper, from_lower)


@hookimpl
def fundiff_register_schedules(register):
    register("laplace", Laplace)
