"""Importance sampling of the noise level by the loss's second moment (Nichol and Dhariwal 2021,
"Improved denoising diffusion probabilistic models", sec. 3.3, eq. 17).

t in [t_min, 1] is split into ``bins`` equal bins; each keeps the last ``history`` per-example
losses that fell in it (the loss *before* the importance weight, i.e. the integrand of the
objective). Until every bin has ``history`` values the density is uniform; afterwards bin k
is drawn with probability p_k proportional to sqrt(E[L_k^2]), mixed with ``uniform_mix`` of the
uniform density (improved-diffusion mixes 0.001, so no bin's probability reaches zero), and t
is uniform inside the bin — one inverse-CDF evaluation of the piecewise-constant density per
uniform u.

Unbiased: each example carries the log weight -log(bins p_k) from ``draw`` (the uniform density
over its density), so the expected loss is the uniform-t objective of the chosen ``loss``
whatever the history holds; only its variance changes. ``loss: likelihood`` (the default) is the
continuous-time ELBO of ``likelihood`` (-lambda'(t) / 2 times the eps-MSE), the objective the
paper importance-samples; eps, x0 and v leave that MSE unweighted.

The statistics live in the module from ``build_module()``: the trainer calls ``update(logsnr,
losses)`` after each optimizer step with the batch's per-example (importance-weighted) losses,
the module divides the weight back out, maps each logSNR to its t bin with the schedule it
last drew with, and its buffers (history, counts) are stored in checkpoints.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import at_least, doc, in_range, one_of

from ._common import LOSS_UNITS, log_unit_weight, uniform_t

LOSSES = ("likelihood",) + LOSS_UNITS


@attrs.frozen(kw_only=True)
class Importance(Weighting):
    """t by importance sampling on the loss history (uniform until every bin is full)."""

    bins: int = attrs.field(default=50, validator=at_least(2), metadata=doc("number of equal bins of t in [t_min, 1]"))
    history: int = attrs.field(default=10, validator=at_least(1), metadata=doc("losses remembered per bin"))
    uniform_mix: float = attrs.field(
        default=0.001, validator=in_range(0.0, 1.0, low_open=True), metadata=doc("weight of the uniform density in the mixture (> 0 keeps weights bounded)")
    )
    loss: str = attrs.field(default="likelihood", validator=one_of(*LOSSES), metadata=doc("objective: likelihood (the ELBO) or the unweighted eps, x0 or v MSE"))

    # The stateless component: the uniform density (what the module does before warm-up).
    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def draw(self, u: torch.Tensor, schedule: Schedule):
        return _draw_t(self, uniform_t(u, schedule), None, schedule)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return log_unit_weight("eps" if self.loss == "likelihood" else self.loss, logsnr)

    def build_module(self) -> torch.nn.Module:
        return ImportanceState(self)


def _draw_t(config: Importance, t: torch.Tensor, log_weight: Optional[torch.Tensor], schedule: Schedule):
    """logSNR at t and the per-sample log weight (importance and, for the ELBO, -lambda'(t) / 2)."""
    if config.loss == "likelihood":
        logsnr, rate = schedule.logsnr_and_rate(t)
        extra = torch.log(-rate) - math.log(2.0)
        return logsnr, extra if log_weight is None else extra + log_weight
    return schedule.logsnr(t), log_weight


class ImportanceState(torch.nn.Module):
    """The importance sampler's state: loss history per t bin, as checkpointed buffers."""

    def __init__(self, config: Importance):
        super().__init__()
        self.config = config
        self.register_buffer("losses", torch.zeros(config.bins, config.history, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(config.bins, dtype=torch.int64))
        # the schedule of the last draw (a plain attribute: a learned schedule is a Module and
        # must not become a submodule here, or its parameters would be stored twice)
        self.__dict__["_schedule"] = None

    # ------------------------------------------------------------ the density
    def probabilities(self) -> torch.Tensor:
        """p_k, the probability of bin k: uniform until every bin is full, then
        proportional to sqrt(mean(L^2)) mixed with ``uniform_mix`` of the uniform."""
        bins = self.config.bins
        uniform = torch.full((bins,), 1.0 / bins, dtype=torch.float64, device=self.losses.device)
        if not bool((self.counts >= self.config.history).all()):
            return uniform
        rms = (self.losses**2).mean(1).sqrt()
        total = rms.sum()
        if not bool(torch.isfinite(total)) or not bool(total > 0):
            return uniform
        return (1.0 - self.config.uniform_mix) * rms / total + self.config.uniform_mix * uniform

    def _bin_of_t(self, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        t_min = schedule.t_min
        pos = (t.to(torch.float64) - t_min) / (1.0 - t_min) * self.config.bins
        return pos.floor().clamp(0, self.config.bins - 1).long()

    def draw(self, u: torch.Tensor, schedule: Schedule):
        self.__dict__["_schedule"] = schedule
        bins, t_min = self.config.bins, schedule.t_min
        p = self.probabilities().to(u.device)
        cdf = torch.cumsum(p, 0)
        u = u.to(torch.float64)
        k = torch.searchsorted(cdf, u, right=True).clamp(max=bins - 1)
        lower = cdf[k] - p[k]
        frac = ((u - lower) / p[k]).clamp(0.0, 1.0)
        t = (t_min + (1.0 - t_min) * (k.to(torch.float64) + frac) / bins).clamp(t_min, 1.0)
        log_weight = -torch.log(bins * p[k])  # uniform density / drawn density
        return _draw_t(self.config, t, log_weight, schedule)

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return self.draw(u, schedule)[0]

    def log_x0_weight(self, logsnr, alpha, sigma):
        return self.config.log_x0_weight(logsnr, alpha, sigma)

    # ------------------------------------------------------------ learning
    @torch.no_grad()
    def update(self, logsnr: torch.Tensor, losses: torch.Tensor) -> None:
        """Record a batch's per-example losses (importance-weighted, as the trainer computes
        them) in their bins, in batch order; the oldest value of a full bin is dropped."""
        schedule = self.__dict__["_schedule"]
        if schedule is None:
            raise RuntimeError("ImportanceState.update: call draw() first (the bins are bins of the schedule's t)")
        t = schedule.t_from_logsnr(logsnr.detach().to(torch.float64))
        k = self._bin_of_t(t, schedule).to(self.losses.device)
        p = self.probabilities()
        raw = losses.detach().to(torch.float64).to(self.losses.device) * (self.config.bins * p[k])
        h = self.config.history
        for kk, value in zip(k.tolist(), raw.tolist()):
            if not math.isfinite(value):
                continue
            n = int(self.counts[kk])
            if n < h:
                self.losses[kk, n] = value
            else:
                self.losses[kk] = torch.roll(self.losses[kk], -1)
                self.losses[kk, h - 1] = value
            self.counts[kk] = min(n + 1, h)


@hookimpl
def fundiff_register_weightings(register):
    register("importance", Importance)
