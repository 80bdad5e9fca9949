"""Karras step selection (EDM, Karras et al. 2022, eq. 5).

With sigma~ = sigma / alpha = exp(-lambda / 2) (the noise level of the scaled state x / alpha,
EDM's sigma) and N = steps noisy levels,

    sigma~_i = (sigma~_max^(1/rho) + i / (N - 1) (sigma~_min^(1/rho) - sigma~_max^(1/rho)))^rho,
    i = 0, ..., N - 1,   then sigma~_N = 0 (the clean level),

converted to lambda_i = -2 log sigma~_i and to (alpha, sigma) by the chain. rho = 7 is EDM's
choice (steps shorten near the data); rho = 1 is uniform in sigma~ and rho -> inf tends to
uniform in log sigma~ (``logsnr-uniform``). By default sigma~_max and sigma~_min are the
schedule's ends, sigma~ at t = 1 and at t = t_min, and the first and last noisy levels
are exactly the schedule's (no rounding through the power). A schedule with zero terminal
SNR (sigma~_max = inf) needs an explicit ``sigma_max``. Computed in the log domain:
lambda_i = -2 rho log(a + i / (N - 1) (b - a)), a = exp(-lambda_max_noise / (2 rho)).
"""

from __future__ import annotations

import math
from typing import Optional

import attrs

from fundiff import Spacing, hookimpl
from fundiff.config import doc, greater_than

from ._grid import check_steps, levels_at_logsnr, logsnr_range


@attrs.frozen(kw_only=True)
class Karras(Spacing):
    """sigma~ = sigma / alpha spaced as i -> (a + i (b - a) / (N - 1))^rho (EDM eq. 5)."""

    rho: float = attrs.field(default=7.0, validator=greater_than(0.0), metadata=doc("EDM's rho: larger spends more steps near the data"))
    sigma_min: Optional[float] = attrs.field(
        default=None, validator=greater_than(0.0), metadata=doc("smallest sigma / alpha (default: the schedule's at t_min)")
    )
    sigma_max: Optional[float] = attrs.field(
        default=None, validator=greater_than(0.0), metadata=doc("largest sigma / alpha (default: the schedule's at t = 1)")
    )

    def __attrs_post_init__(self) -> None:
        if self.sigma_min is not None and self.sigma_max is not None and not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")

    def check_recipe(self, components):
        schedule = components.get("schedule")
        if schedule is not None and self.sigma_max is None and schedule.reaches_zero_snr():
            return [
                "spacing 'karras' needs a finite largest noise level, but the schedule has zero terminal SNR "
                "(sigma / alpha = inf at t = 1); set spacing.sigma_max (EDM uses 80)"
            ]
        return []

    def endpoints(self, schedule) -> tuple[float, float]:
        """(lambda of the noisiest level, lambda of the least noisy one)."""
        lo, hi = logsnr_range(schedule)
        first = -2.0 * math.log(self.sigma_max) if self.sigma_max is not None else lo
        last = -2.0 * math.log(self.sigma_min) if self.sigma_min is not None else hi
        if not math.isfinite(first):
            raise ValueError("spacing 'karras': the schedule has zero terminal SNR (sigma / alpha = inf at t = 1); set sigma_max")
        if not first < last:
            raise ValueError(f"spacing 'karras': sigma_max must exceed sigma_min, got logSNR range [{first}, {last}]")
        return first, last

    def levels(self, schedule, chain, steps):
        check_steps("karras", steps, 10**9, "")
        first, last = self.endpoints(schedule)
        if steps == 1:
            return levels_at_logsnr(chain, [first])
        a = math.exp(-first / (2.0 * self.rho))  # sigma_max^(1/rho)
        b = math.exp(-last / (2.0 * self.rho))  # sigma_min^(1/rho)
        inner = [-2.0 * self.rho * math.log(a + i / (steps - 1) * (b - a)) for i in range(1, steps - 1)]
        return levels_at_logsnr(chain, [first, *inner, last])


@hookimpl
def fundiff_register_spacings(register):
    register("karras", Karras)
