"""The sigmoid schedule of Jabri, Fleet and Chen 2022 ("Scalable adaptive computation for
iterative generation", RIN) and Chen 2023 ("On the importance of noise scheduling for
diffusion models", Algorithm 1, ``sigmoid_schedule``); the survey's Table III, ref. [60].

With z(t) = (start + t (end - start)) / tau the signal variance is a normalised piece of
the logistic curve,

    gamma(t) = (sigmoid(end / tau) - sigmoid(z(t))) / (sigmoid(end / tau) - sigmoid(start / tau)),

which falls from 1 at t = 0 to 0 at t = 1 (Chen's defaults: start = -3, end = 3, tau = 1).
As in ``simple-linear``, gamma is squeezed into [c, 1 - c] (Chen clips it at 1e-9) so that
logSNR is finite and strictly decreasing on all of [0, 1]:
alpha_bar(t) = c + (1 - 2c) gamma(t). When end / tau (or -start / tau) is much larger than
log(1 / c) the logistic curve saturates at the clip, and logSNR flattens there below float64
resolution; keep them below about 20.

Differences of logistic values are computed without cancellation from
sigmoid(a) - sigmoid(b) = sinh((a - b) / 2) / (2 cosh(a / 2) cosh(b / 2)), in log space so
that small tau cannot overflow; the inverse is closed form (a logit).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Schedule, hookimpl
from fundiff.config import doc, greater_than, in_range

_LOG2 = math.log(2.0)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return x + torch.log1p(torch.exp(-2.0 * x)) - _LOG2


def _log_sigmoid_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b, accurate when a and b are close."""
    half = 0.5 * (a - b)
    log_sinh = half + torch.log(-torch.expm1(-2.0 * half)) - _LOG2
    return log_sinh - _LOG2 - _log_cosh(0.5 * a) - _log_cosh(0.5 * b)


@attrs.frozen(kw_only=True)
class Sigmoid(Schedule):
    """alpha_bar(t) follows a normalised logistic curve between start and end (Jabri et al.; Chen 2023)."""

    start: float = attrs.field(default=-3.0, metadata=doc("z at t = 0, before division by tau"))
    end: float = attrs.field(default=3.0, metadata=doc("z at t = 1, before division by tau (> start)"))
    tau: float = attrs.field(default=1.0, validator=greater_than(0.0), metadata=doc("temperature: smaller is steeper in the middle"))
    clip: float = attrs.field(
        default=1e-9,
        validator=in_range(0.0, 0.5, low_open=True, high_open=True),
        metadata=doc("c: alpha_bar is squeezed into [c, 1 - c], so |logSNR| <= log((1 - c) / c)"),
    )

    def __attrs_post_init__(self) -> None:
        if not self.end > self.start:
            raise ValueError(f"end ({self.end}) must be > start ({self.start})")

    def _z(self, t: torch.Tensor) -> torch.Tensor:
        return (self.start * (1.0 - t) + self.end * t) / self.tau

    def _log_range(self) -> torch.Tensor:
        z0 = torch.tensor(self.start / self.tau, dtype=torch.float64)
        z1 = torch.tensor(self.end / self.tau, dtype=torch.float64)
        return _log_sigmoid_diff(z1, z0)  # log(sigmoid(end/tau) - sigmoid(start/tau))

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        z = self._z(t)
        z0 = torch.full_like(z, self.start / self.tau)
        z1 = torch.full_like(z, self.end / self.tau)
        log_range = self._log_range()
        # log gamma and log(1 - gamma); at the ends the difference is log(0) = -inf, as it should be
        log_gamma = torch.where(t >= 1.0, -math.inf, _log_sigmoid_diff(z1, torch.minimum(z, z1)) - log_range)
        log_one_minus = torch.where(t <= 0.0, -math.inf, _log_sigmoid_diff(torch.maximum(z, z0), z0) - log_range)
        log_c, log_w = math.log(self.clip), math.log1p(-2.0 * self.clip)
        log_ab = torch.logaddexp(torch.full_like(t, log_c), log_w + log_gamma)
        log_one_minus_ab = torch.logaddexp(torch.full_like(t, log_c), log_w + log_one_minus)
        return log_ab - log_one_minus_ab

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64)
        w = 1.0 - 2.0 * self.clip
        gamma = ((torch.sigmoid(logsnr) - self.clip) / w).clamp(0.0, 1.0)
        one_minus = ((torch.sigmoid(-logsnr) - self.clip) / w).clamp(0.0, 1.0)
        z0, z1 = self.start / self.tau, self.end / self.tau
        span = torch.exp(self._log_range())
        # sigmoid(z) = sigmoid(z0) + d0 = sigmoid(z1) - d1 with d0 = (1 - gamma) span, d1 = gamma span.
        # Solve for z - z0 (from the t = 0 end) or z1 - z (from the t = 1 end) with log1p, so
        # that t keeps its relative precision near either end; each form is used where its
        # log1p arguments stay in [-1/2, 1/2] (d0 <= span / 2 <= sigmoid(-z0) / 2, likewise d1).
        d0, d1 = one_minus * span, gamma * span
        from_start = torch.log1p(d0 / _sigmoid(z0)) - torch.log1p(-d0 / _sigmoid(-z0))  # z - z0
        from_end = torch.log1p(d1 / _sigmoid(-z1)) - torch.log1p(-d1 / _sigmoid(z1))  # z1 - z
        scale = self.tau / (self.end - self.start)
        t = torch.where(one_minus <= 0.5, from_start * scale, 1.0 - from_end * scale)
        return t.clamp(0.0, 1.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@hookimpl
def fundiff_register_schedules(register):
    register("sigmoid", Sigmoid)
