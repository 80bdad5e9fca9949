"""Registers the schedule 'ramp' (logSNR linear in t), a name fundiff-clash-a registers too."""

import attrs
import torch

import fundiff


@attrs.frozen(kw_only=True)
class RampB(fundiff.Schedule):
    """logSNR falling linearly from `start` to `end` (fixture B)."""

    start: float = attrs.field(default=6.0, metadata={"doc": "logSNR at t = 0"})
    end: float = attrs.field(default=-8.0, metadata={"doc": "logSNR at t = 1"})

    def logsnr(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.start + (self.end - self.start) * t

    def t_from_logsnr(self, logsnr):
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        return ((self.start - logsnr) / (self.start - self.end)).clamp(0.0, 1.0)


@fundiff.hookimpl
def fundiff_register_schedules(register):
    register("ramp", RampB)
