"""Step selection uniform in logSNR (DPM-Solver, Lu et al. 2022, sec. 3.3 and appendix D:
the "logSNR" time steps; the natural grid of exponential integrators, where a step's
error depends on the logSNR increment h).

    lambda_i = lambda_max_noise + i / (N - 1) (lambda_min_noise - lambda_max_noise),
    i = 0, ..., N - 1,   then the clean level,

with N = steps noisy levels between the schedule's ends, lambda(1) and lambda(t_min), unless
``logsnr_min`` / ``logsnr_max`` are given. DPM-Solver's last point is t = eps itself (its N
steps join N + 1 points); here the step from lambda(t_min) to the clean level returns the x0
estimate, like every fundiff spacing. A zero-terminal-SNR schedule (lambda(1) = -inf) needs
an explicit ``logsnr_min``.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs

from fundiff import Spacing, hookimpl
from fundiff.config import doc

from ._grid import check_steps, levels_at_logsnr, logsnr_range


@attrs.frozen(kw_only=True)
class LogSNRUniform(Spacing):
    """Noisy levels evenly spaced in lambda = log(alpha^2 / sigma^2)."""

    logsnr_min: Optional[float] = attrs.field(default=None, metadata=doc("logSNR of the noisiest level (default: the schedule's at t = 1)"))
    logsnr_max: Optional[float] = attrs.field(default=None, metadata=doc("logSNR of the least noisy level (default: the schedule's at t_min)"))

    def __attrs_post_init__(self) -> None:
        if self.logsnr_min is not None and self.logsnr_max is not None and not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"logsnr_min ({self.logsnr_min}) must be < logsnr_max ({self.logsnr_max})")

    def check_recipe(self, components):
        schedule = components.get("schedule")
        if schedule is not None and self.logsnr_min is None and schedule.reaches_zero_snr():
            return [
                "spacing 'logsnr-uniform' cannot space steps evenly down to logSNR -inf (the schedule has zero "
                "terminal SNR); set spacing.logsnr_min"
            ]
        return []

    def levels(self, schedule, chain, steps):
        check_steps("logsnr-uniform", steps, 10**9, "")
        lo, hi = logsnr_range(schedule)
        first = self.logsnr_min if self.logsnr_min is not None else lo
        last = self.logsnr_max if self.logsnr_max is not None else hi
        if not (math.isfinite(first) and math.isfinite(last)):
            raise ValueError(f"spacing 'logsnr-uniform': needs a finite logSNR range, got [{first}, {last}]; set logsnr_min / logsnr_max")
        if not first < last:
            raise ValueError(f"spacing 'logsnr-uniform': logsnr_min ({first}) must be < logsnr_max ({last})")
        if steps == 1:
            return levels_at_logsnr(chain, [first])
        inner = [first + i / (steps - 1) * (last - first) for i in range(1, steps - 1)]
        return levels_at_logsnr(chain, [first, *inner, last])


@hookimpl
def fundiff_register_spacings(register):
    register("logsnr-uniform", LogSNRUniform)
