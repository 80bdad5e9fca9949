"""Resolution-shifted schedules of "simple diffusion" (Hoogeboom, Heek and Salimans 2023,
sec. 3.1, the shifted cosine schedule, eq. 4 generalised to any base schedule).

Averaging a d x d image down to (d / k) x (d / k) pixels multiplies the SNR of the noisy
image by k^2, so a schedule tuned at ``base_resolution`` is carried to ``resolution`` by
keeping the SNR of the low-resolution view fixed:

    lambda_shifted(t) = lambda_base(t) + 2 log(base_resolution / resolution),

a constant shift (negative for resolution > base_resolution: more noise at every t). The
inverse is the base's inverse at lambda - shift; t_min is the base's.

When the base is a :class:`fundiff.DiscreteSchedule` the shifted schedule is one too: its
T-step grid is alpha_bar_k' = sigmoid(lambda_k + shift), its betas are derived from that grid
(beta_k = 1 - alpha_bar_k' / alpha_bar_{k-1}'), and ``Shifted(base=...)`` returns an instance
of :class:`ShiftedDiscrete`. The continuous map is the base's map plus the shift at every t,
so it equals the shifted grid at grid points.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import DiscreteSchedule, Schedule, hookimpl
from fundiff.config import doc, greater_than
from fundiff_plugins.schedules.cosine import Cosine


def _pick_class(cls: type, base: Schedule, discrete: type, continuous: type) -> type:
    """The concrete class for a wrapper of ``base``: the discrete variant iff the base is discrete."""
    if cls is continuous or cls is discrete:
        return discrete if isinstance(base, DiscreteSchedule) else continuous
    return cls  # a user's subclass decides for itself


@attrs.frozen(kw_only=True)
class Shifted(Schedule):
    """Any schedule with logSNR shifted by 2 log(base_resolution / resolution) (simple diffusion)."""

    base: Schedule = attrs.field(factory=Cosine, metadata=doc("the schedule to shift (a nested schedule section)"))
    base_resolution: float = attrs.field(default=64.0, validator=greater_than(0.0), metadata=doc("resolution the base schedule was tuned for"))
    resolution: float = attrs.field(default=256.0, validator=greater_than(0.0), metadata=doc("resolution of the data it is used at"))

    def __new__(cls, *args, **kwargs):
        base = kwargs.get("base")
        target = _pick_class(cls, base if base is not None else Cosine(), ShiftedDiscrete, Shifted)
        if not issubclass(target, cls):  # e.g. evolve() of a discrete one onto a continuous base
            return target(*args, **kwargs)
        return super().__new__(target)

    @property
    def shift(self) -> float:
        """2 log(base_resolution / resolution), added to the base's logSNR."""
        return 2.0 * (math.log(self.base_resolution) - math.log(self.resolution))

    @property
    def t_min(self) -> float:
        return self.base.t_min

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.logsnr(torch.as_tensor(t, dtype=torch.float64)) + self.shift

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        return self.base.t_from_logsnr(torch.as_tensor(logsnr, dtype=torch.float64) - self.shift)


@attrs.frozen(kw_only=True)
class ShiftedDiscrete(Shifted, DiscreteSchedule):
    """A shifted discrete schedule: the base's T-step grid with every logSNR shifted."""

    @property
    def num_steps(self) -> int:  # type: ignore[override]
        return self.base.num_steps

    @property
    def t_min(self) -> float:
        return self.base.t_min

    def betas(self) -> torch.Tensor:
        log_ab = self.base.log_alpha_bar_grid()[1:]
        lam = log_ab - torch.log(-torch.expm1(log_ab)) + self.shift
        # log alpha_bar' = -log(1 + exp(-lambda')), with alpha_bar_0' = 1 in front
        log_ab_shifted = -torch.logaddexp(-lam, torch.zeros((), dtype=torch.float64))
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab_shifted])
        return -torch.expm1(grid[1:] - grid[:-1])

    logsnr = Shifted.logsnr
    t_from_logsnr = Shifted.t_from_logsnr


@hookimpl
def fundiff_register_schedules(register):
    register("shifted", Shifted)
