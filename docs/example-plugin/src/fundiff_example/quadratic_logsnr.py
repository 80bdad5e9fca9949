"""The ``quadratic-logsnr`` schedule: logSNR falls from ``start`` to ``end`` along a quadratic in t.

    lambda(t) = start + (end - start) * q(t),    q(t) = (1 - c) t + c t^2

with ``c`` the ``curvature`` in [-1, 1]. q rises from q(0) = 0 to q(1) = 1 and its slope
q'(t) = (1 - c) + 2 c t is positive on (0, 1) for every such c, so lambda is strictly
decreasing. c = 0 is the straight line; c > 0 changes lambda slowly near t = 0, which puts
more of an evenly spaced sampling grid at low noise; c < 0 does the opposite.

The inverse is the root of c t^2 + (1 - c) t - u = 0 in [0, 1], u = (start - lambda) /
(start - end), written without the cancellation of the textbook formula:

    t = 2 u / ((1 - c) + sqrt((1 - c)^2 + 4 c u))
"""

from __future__ import annotations

import attrs
import torch

import fundiff
from fundiff.config import in_range


@attrs.frozen(kw_only=True)
class QuadraticLogSNR(fundiff.Schedule):
    """logSNR falling from `start` to `end` along a quadratic in t (closed-form inverse)."""

    start: float = attrs.field(default=10.0, metadata={"doc": "logSNR at t = 0 (least noise)"})
    end: float = attrs.field(default=-10.0, metadata={"doc": "logSNR at t = 1 (most noise); below start"})
    curvature: float = attrs.field(
        default=0.5,
        validator=in_range(-1.0, 1.0),
        metadata={"doc": "c in q(t) = (1 - c) t + c t^2; 0 is linear in logSNR, > 0 spends more of t at low noise"},
    )

    def __attrs_post_init__(self) -> None:
        if not self.end < self.start:
            raise ValueError(f"end ({self.end}) must be below start ({self.start}): logSNR must fall with t")

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        c = self.curvature
        q = (1.0 - c) * t + c * t * t
        return self.start + (self.end - self.start) * q

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        c = self.curvature
        # u in [0, 1]: logSNR values outside [end, start] map to the nearest end of [0, 1]
        u = ((self.start - logsnr) / (self.start - self.end)).clamp(0.0, 1.0)
        denominator = (1.0 - c) + torch.sqrt(((1.0 - c) ** 2 + 4.0 * c * u).clamp(min=0.0))
        # the denominator is 0 only for c = 1 and u = 0, where t = 0
        return torch.where(denominator > 0, 2.0 * u / denominator.clamp(min=1e-300), torch.zeros_like(u))


@fundiff.hookimpl
def fundiff_register_schedules(register):
    register("quadratic-logsnr", QuadraticLogSNR)
