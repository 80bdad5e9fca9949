"""Zero terminal SNR (Lin, Liu, Li and Yang 2024, "Common diffusion noise schedules and
sample steps are flawed", sec. 3.1, Algorithm 1).

Common schedules stop short of pure noise (Stable Diffusion's ``scaled-linear`` keeps
sqrt(alpha_bar_T) = 0.068 of the signal at the last step), so training never sees
logSNR = -inf while sampling starts there. Algorithm 1 rescales sqrt(alpha_bar) linearly so
that the last step has none of the signal and the first step keeps all of it:

    s(t) = sqrt(alpha_bar_base(t)),   s'(t) = s_m (s(t) - s(1)) / (s_m - s(1)),
    lambda'(t) = log(s'^2 / (1 - s'^2)),

with s_m = s(t_min) the first step (t_min = 1/T for a T-step schedule). Hence lambda'(1) =
-inf exactly and lambda'(t_min) = lambda_base(t_min). alpha_bar is read as sigmoid(lambda),
the variance-preserving reading of any base schedule's logSNR. For t < t_min (where the
rescaling could push s' above 1) the base is used unchanged, which keeps the map strictly
decreasing on all of [0, 1].

Numerics: near t_min, 1 - s' is tiny; it is computed as (1 - s_m) - (s' - s_m) with
s' - s_m = s_m (s - s_m) / (s_m - s(1)) and s - s_m = (sigma_m^2 - sigma^2) / (s + s_m), so
no step subtracts two numbers close to 1. The inverse undoes the rescaling the same way and
calls the base's inverse.

Consequences: alpha = 0 at t = 1, so eps-prediction, whose x0 = (x_t - sigma eps) / alpha
divides by alpha, is refused by the ``eps`` parameterization's recipe check; use ``v`` (Lin
et al. sec. 3.2) or ``x0``. When the base is discrete the rescaled schedule is a
:class:`fundiff.DiscreteSchedule` too (an instance of :class:`ZeroTerminalSNRDiscrete`): its
betas come from the rescaled grid, the last one exactly 1 (alpha_bar_T = 0).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import DiscreteSchedule, Schedule, hookimpl
from fundiff.config import doc
from fundiff_plugins.schedules.scaled_linear import ScaledLinear


def _pick_class(cls: type, base: Schedule, discrete: type, continuous: type) -> type:
    if cls is continuous or cls is discrete:
        return discrete if isinstance(base, DiscreteSchedule) else continuous
    return cls


@attrs.frozen(kw_only=True)
class ZeroTerminalSNR(Schedule):
    """Any schedule rescaled so that sqrt(alpha_bar) is 0 at t = 1 and unchanged at t_min (Lin et al. 2024)."""

    base: Schedule = attrs.field(factory=ScaledLinear, metadata=doc("the schedule to rescale (a nested schedule section)"))

    def __new__(cls, *args, **kwargs):
        base = kwargs.get("base")
        target = _pick_class(cls, base if base is not None else ScaledLinear(), ZeroTerminalSNRDiscrete, ZeroTerminalSNR)
        if not issubclass(target, cls):
            return target(*args, **kwargs)
        return super().__new__(target)

    @property
    def t_min(self) -> float:
        return self.base.t_min

    def _anchors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lambda_m, s_m, sigma_m^2, s_1): the base at t_min (kept) and at t = 1 (sent to 0)."""
        ends = self.base.logsnr(torch.tensor([self.t_min, 1.0], dtype=torch.float64))
        lam_m, lam_1 = ends[0], ends[1]
        return lam_m, torch.sigmoid(lam_m).sqrt(), torch.sigmoid(-lam_m), torch.sigmoid(lam_1).sqrt()

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        lam = self.base.logsnr(t)
        lam_m, s_m, var_m, s_1 = self._anchors()
        gain = s_m / (s_m - s_1)
        s = torch.sigmoid(lam).sqrt()
        var = torch.sigmoid(-lam)
        s_new = torch.where(t >= 1.0, 0.0, gain * (s - s_1)).clamp(min=0.0)
        one_minus = var_m / (1.0 + s_m) - gain * (var_m - var) / (s + s_m)  # 1 - s'
        rescaled = 2.0 * torch.log(s_new) - torch.log(one_minus) - torch.log1p(s_new)
        return torch.where(t <= self.t_min, lam, rescaled)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        lam_m, s_m, var_m, s_1 = self._anchors()
        gain = s_m / (s_m - s_1)
        s_new = torch.sigmoid(logsnr).sqrt()
        var_new = torch.sigmoid(-logsnr)
        s = s_1 + s_new / gain
        one_minus = var_m / (1.0 + s_m) - (var_m - var_new) / ((s_new + s_m) * gain)  # 1 - s
        lam_base = 2.0 * torch.log(s) - torch.log(one_minus) - torch.log1p(s)
        t = self.base.t_from_logsnr(torch.where(logsnr >= lam_m, logsnr, lam_base))
        return torch.where(logsnr == -math.inf, 1.0, t)


@attrs.frozen(kw_only=True)
class ZeroTerminalSNRDiscrete(ZeroTerminalSNR, DiscreteSchedule):
    """Zero terminal SNR on a T-step grid: betas from the rescaled alpha_bar, beta_T = 1."""

    @property
    def num_steps(self) -> int:  # type: ignore[override]
        return self.base.num_steps

    @property
    def t_min(self) -> float:
        return self.base.t_min

    def betas(self) -> torch.Tensor:
        t = torch.arange(1, self.num_steps + 1, dtype=torch.float64) / self.num_steps
        lam = self.logsnr(t)
        log_ab = -torch.logaddexp(-lam, torch.zeros((), dtype=torch.float64))  # log sigmoid(lambda); -inf at T
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab])
        return -torch.expm1(grid[1:] - grid[:-1])

    logsnr = ZeroTerminalSNR.logsnr
    t_from_logsnr = ZeroTerminalSNR.t_from_logsnr


@hookimpl
def fundiff_register_schedules(register):
    register("zero-terminal-snr", ZeroTerminalSNR)
