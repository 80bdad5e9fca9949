"""A learned noise schedule (VDM: Kingma et al. 2021, "Variational diffusion models", sec. 5
and appendix B "monotonic neural net").

gamma(t) = -lambda(t) is a monotone network: gamma_tilde(t) = l1(t) + l3(sigmoid(l2(l1(t))))
with every weight kept positive (softplus), so gamma_tilde is increasing in t; it is then
normalised to the configured endpoints,

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) (gamma_tilde(t) - gamma_tilde(0)) / (gamma_tilde(1) - gamma_tilde(0)),

so lambda(0) = logsnr_max and lambda(1) = logsnr_min exactly. Trained jointly with the
denoiser through the variational bound (it requires the ``likelihood`` weighting): the
expected bound depends on the schedule only through its endpoints (VDM eq. 18), so the
pipeline trains the interior to minimise the variance of the loss estimate (sec. 5.2).

The endpoints are configured, not learned: for continuous data without a discretised
decoder the bound decreases without limit as logsnr_max grows, so there is nothing to
learn them against (VDM learns them through the decoder of 8-bit data).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from fundiff import Schedule, hookimpl
from fundiff.config import at_least, doc

VARIATIONAL_BOUND = "variational-bound"


class PositiveLinear(nn.Linear):
    """A linear layer whose weights are softplus(raw) > 0: monotone increasing in its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, F.softplus(self.weight).to(x.dtype), bias)


class MonotoneLogSNR(nn.Module):
    """The learned schedule as a module: lambda(t), its inverse and t_min."""

    t_min = 0.0

    def __init__(self, logsnr_max: float, logsnr_min: float, hidden: int, seed: int):
        super().__init__()
        self.logsnr_max = logsnr_max
        self.logsnr_min = logsnr_min
        generator = torch.Generator().manual_seed(seed)
        self.l1 = PositiveLinear(1, 1)
        self.l2 = PositiveLinear(1, hidden)
        self.l3 = PositiveLinear(hidden, 1, bias=False)
        with torch.no_grad():  # deterministic initialisation, independent of the global seed
            for layer in (self.l1, self.l2, self.l3):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5 - 1.0)
                if layer.bias is not None:
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.5)

    def gamma_tilde(self, t: torch.Tensor) -> torch.Tensor:
        h = self.l1(t[..., None])
        return (h + self.l3(torch.sigmoid(self.l2(h))))[..., 0]

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=self.l1.weight.device) if not torch.is_tensor(t) else t
        ends = self.gamma_tilde(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        fraction = (self.gamma_tilde(t) - ends[0]) / (ends[1] - ends[0])
        return self.logsnr_max + (self.logsnr_min - self.logsnr_max) * fraction

    @torch.no_grad()
    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Bisection on the monotone map (60 halvings: exact to float64 resolution)."""
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        low = torch.zeros_like(logsnr)
        high = torch.ones_like(logsnr)
        for _ in range(60):
            mid = 0.5 * (low + high)
            above = self.logsnr(mid) > logsnr  # lambda decreases: the answer lies to the right
            low = torch.where(above, mid, low)
            high = torch.where(above, high, mid)
        return 0.5 * (low + high)

    def logsnr_at(self, t: float) -> float:
        return float(self.logsnr(torch.tensor(t, dtype=torch.float64)))

    def logsnr_and_rate(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return Schedule.logsnr_and_rate(self, t)


@attrs.frozen(kw_only=True)
class Learned(Schedule):
    """VDM's learned schedule: a monotone network for logSNR(t) with fixed endpoints, trained through the bound."""

    requires = frozenset({VARIATIONAL_BOUND})

    logsnr_max: float = attrs.field(default=10.0, metadata=doc("logSNR at t = 0 (VDM: 13.3)"))
    logsnr_min: float = attrs.field(default=-10.0, metadata=doc("logSNR at t = 1 (VDM: -5)"))
    hidden: int = attrs.field(default=256, validator=at_least(1), metadata=doc("width of the monotone network (VDM: 1024)"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the network's initialisation"))

    def __attrs_post_init__(self) -> None:
        if not self.logsnr_max > self.logsnr_min:
            raise ValueError(f"logsnr_max ({self.logsnr_max}) must be > logsnr_min ({self.logsnr_min})")

    def build_module(self) -> MonotoneLogSNR:
        return MonotoneLogSNR(self.logsnr_max, self.logsnr_min, self.hidden, self.seed)

    # On its own (plots, checks) the component is its untrained network.
    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.build_module().logsnr(t)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        return self.build_module().t_from_logsnr(logsnr)


@hookimpl
def fundiff_register_schedules(register):
    register("learned", Learned)
