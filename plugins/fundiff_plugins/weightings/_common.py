"""Shared helpers of the built-in weightings (not a plugin: no entry point).

* training densities over the noise level, as inverse CDFs of uniforms u in (0, 1):
  t uniform on [t_min, 1]; a normal in logSNR (EDM's log-normal sigma); a logit-normal t;
* the loss units the density weightings offer, stated in x0 units:
  eps-MSE: w = SNR, x0-MSE: w = 1, v-MSE: w = SNR + 1 (the v-MSE of a VP chain).
"""

from __future__ import annotations

import math

import torch

from fundiff import Schedule

#: the loss units a density weighting may name (``loss`` field)
LOSS_UNITS = ("eps", "x0", "v")


def log_unit_weight(loss: str, logsnr: torch.Tensor) -> torch.Tensor:
    """log w(lambda) in x0 units of the unweighted ``loss`` MSE."""
    if loss == "eps":
        return logsnr
    if loss == "x0":
        return torch.zeros_like(logsnr)
    if loss == "v":  # log(SNR + 1), overflow-free
        return torch.logaddexp(logsnr, torch.zeros_like(logsnr))
    raise ValueError(f"unknown loss unit {loss!r}; choose one of {', '.join(LOSS_UNITS)}")


def uniform_t(u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """t uniform on [t_min, 1] (DDPM's uniform timestep density)."""
    t_min = schedule.t_min
    return t_min + (1.0 - t_min) * u


def logsnr_range(schedule: Schedule) -> tuple[float, float]:
    """(lambda(1), lambda(t_min)): the logSNRs a schedule trains on."""
    return schedule.logsnr_at(1.0), schedule.logsnr_at(schedule.t_min)


def truncated_standard_normal(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Inverse CDF of N(0, 1) truncated to [lo, hi] (either may be infinite), at u.

    Truncation (renormalising the density on the interval) rather than clipping, so the
    ends get no point mass. The computation runs in the tail nearer to the interval, so an
    interval far out in the upper tail keeps its precision (1 - Phi would round to 0).
    """
    u = u.to(torch.float64)
    lo_t = torch.tensor(lo, dtype=torch.float64, device=u.device)
    hi_t = torch.tensor(hi, dtype=torch.float64, device=u.device)
    if lo > 0:  # mirror: work with upper-tail probabilities Q(z) = Phi(-z)
        q_lo, q_hi = torch.special.ndtr(-lo_t), torch.special.ndtr(-hi_t)
        z = -torch.special.ndtri(q_lo - u * (q_lo - q_hi))
    else:
        p_lo, p_hi = torch.special.ndtr(lo_t), torch.special.ndtr(hi_t)
        z = torch.special.ndtri(p_lo + u * (p_hi - p_lo))
    return torch.minimum(torch.maximum(z, lo_t), hi_t)


def normal_logsnr(u: torch.Tensor, schedule: Schedule, mean: float, std: float) -> torch.Tensor:
    """logSNR = -2 log sigma~ with log sigma~ ~ N(mean, std^2) (EDM's log-normal sigma,
    Karras et al. 2022 sec. 5), truncated to the schedule's logSNR range.

    sigma~ = sigma / alpha = exp(-lambda / 2) on any chain; larger u gives larger sigma~."""
    lam_lo, lam_hi = logsnr_range(schedule)
    z_lo = (-0.5 * lam_hi - mean) / std
    z_hi = (-0.5 * lam_lo - mean) / std
    z = truncated_standard_normal(u, z_lo, z_hi)
    lam = -2.0 * (mean + std * z)
    return lam.clamp(min=lam_lo, max=lam_hi)


def logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)
