"""Shared helpers of the probability-flow ODE samplers (not a design: no entry point).

For any Gaussian chain x_t = alpha x0 + sigma eps, the scaled state x~ = x / alpha and the
scaled noise level s~ = sigma / alpha = exp(-lambda / 2) turn the probability-flow ODE into
the chain-free form of Karras et al. 2022 (EDM, eq. 4 with s(t) = 1):

    dx~ / ds~ = (x~ - D(x~; s~)) / s~ = eps_hat,

where D is the x0 estimate and eps_hat = (x - alpha D) / sigma the matching noise estimate.
Methods written in (x~, s~) therefore need only the host floats (alpha, sigma) of each level.

A method that evaluates the denoiser *between* the grid's levels (Heun's churn, DPM-2's
midpoint, Restart's inner grid, an adaptive solver's stages) needs a :class:`fundiff.Level`
at a logSNR that is not on the grid. Levels made by a chain carry it (``Level.chain``), and
:func:`level_maker` then asks the chain, exact for every chain. For bare levels (built by
hand, without a chain) it recovers the chain's (alpha, sigma) from the grid: variance-preserving
grids (alpha^2 + sigma^2 = 1 at every level) and variance-exploding ones (alpha = 1) are
recognised and extended exactly; for any other chain log alpha is interpolated linearly in
lambda between neighbouring grid levels (extrapolated from the end segments), which keeps
log(alpha^2 / sigma^2) = lambda exact and alpha exact on the grid.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import torch

from fundiff import Level, noiselevel

#: relative tolerance for recognising VP (alpha^2 + sigma^2 = 1) and VE (alpha = 1) grids
_FAMILY_RTOL = 1e-12


def sigma_tilde(level: Level) -> float:
    """s~ = sigma / alpha (EDM's sigma); 0 at the clean level, inf where alpha = 0."""
    if level.sigma == 0.0:
        return 0.0
    if level.alpha == 0.0:
        return math.inf
    return level.sigma / level.alpha


def logsnr_from_sigma_tilde(s: float) -> float:
    """lambda = -2 log s~ (inf at s~ = 0)."""
    return math.inf if s == 0.0 else -2.0 * math.log(s)


def level_maker(levels: Sequence[Level]) -> Callable[[float], Level]:
    """A function ``logsnr -> Level`` on the chain the grid ``levels`` comes from (see module doc):
    the chain itself when the levels carry it (exact on every chain), otherwise recognised from
    the grid."""
    chain = levels[0].chain if levels else None
    if chain is not None:
        return chain.level
    noisy = [lv for lv in levels if lv.sigma > 0.0 and lv.alpha > 0.0 and math.isfinite(lv.logsnr)]
    if not noisy or all(abs(lv.alpha * lv.alpha + lv.sigma * lv.sigma - 1.0) <= _FAMILY_RTOL for lv in noisy):
        return _vp_level
    if all(lv.alpha == 1.0 for lv in noisy):
        return _ve_level
    grid = sorted({lv.logsnr: math.log(lv.alpha) for lv in noisy}.items())
    lams = [g[0] for g in grid]
    log_alphas = [g[1] for g in grid]

    def make(logsnr: float) -> Level:
        if logsnr == math.inf:
            clean = levels[-1]
            return clean if clean.sigma == 0.0 else Level(math.inf, 1.0, 0.0)
        if len(lams) == 1:
            log_alpha = log_alphas[0]
        else:
            k = min(max(bisect.bisect_left(lams, logsnr), 1), len(lams) - 1)
            w = (logsnr - lams[k - 1]) / (lams[k] - lams[k - 1])
            log_alpha = log_alphas[k - 1] + w * (log_alphas[k] - log_alphas[k - 1])
        return Level(float(logsnr), math.exp(log_alpha), math.exp(log_alpha - 0.5 * logsnr))

    return make


def _vp_level(logsnr: float) -> Level:
    alpha, sigma = noiselevel.vp_alpha_sigma(float(logsnr))
    return Level(float(logsnr), alpha, 0.0 if logsnr == math.inf else sigma)


def _ve_level(logsnr: float) -> Level:
    alpha, sigma = noiselevel.ve_alpha_sigma(float(logsnr))
    return Level(float(logsnr), alpha, sigma)


def karras_sigma_tildes(s_max: float, s_min: float, n: int, rho: float = 7.0) -> list[float]:
    """``n + 1`` values from s_max down to s_min, evenly spaced in s~^(1/rho) (EDM, eq. 5)."""
    a, b = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
    return [(a + (b - a) * i / n) ** rho for i in range(n + 1)]


# --------------------------------------------------------------------------------------
# Dormand-Prince 5(4) with error control (Dormand and Prince 1980; Hairer, Norsett and
# Wanner, "Solving ODEs I", sec. II.4-5: the tableau, the error norm and the controller)
# --------------------------------------------------------------------------------------

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
#: fifth-order weights (also the last stage's row: first same as last)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
#: fifth- minus fourth-order weights, for the 7 stages (the 7th is f at the new point)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

State = tuple  # a tuple of tensors integrated together


def _combine(y: State, h: float, coefs: Sequence[float], ks: Sequence[State]) -> State:
    out = []
    for j, yj in enumerate(y):
        acc = yj
        for c, k in zip(coefs, ks):
            if c != 0.0:
                acc = acc + (h * c) * k[j]
        out.append(acc)
    return tuple(out)


def _error_ratio(y: State, y_new: State, err: State, rtol: float, atol: float) -> float:
    """RMS over every element of err / (atol + rtol max(|y|, |y_new|)) (Hairer et al. II.4.11)."""
    total, count = 0.0, 0
    for a, b, e in zip(y, y_new, err):
        scale = atol + rtol * torch.maximum(a.abs(), b.abs())
        total += float(((e / scale) ** 2).sum())
        count += e.numel()
    return math.sqrt(total / max(count, 1))


def dopri5(
    f: Callable[[State, float], State],
    y: State,
    t0: float,
    t1: float,
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    first_step: float | None = None,
    on_step: Callable[[int, float, State, State], None] | None = None,
) -> tuple[State, dict]:
    """Integrate dy/dt = f(y, t) from t0 to t1 (either direction) with Dormand-Prince 5(4).

    Local extrapolation (the fifth-order solution is kept), first-same-as-last, the
    standard controller h_new = h * clip(0.9 err^(-1/5), 0.2, 10) (0.2 .. 1 right after a
    rejection), and Hairer's starting step when ``first_step`` is not given. ``on_step(n,
    t, y, f(y, t))`` is called after each accepted step. The error estimate is reduced over
    the whole state on the host (one device synchronisation per step: adaptive step control
    needs the number). Returns the state at t1 and counts: accepted, rejected, evaluations.
    """
    span = t1 - t0
    if span == 0.0:
        return y, {"accepted": 0, "rejected": 0, "evaluations": 0}
    direction = 1.0 if span > 0 else -1.0
    k1 = f(y, t0)
    evaluations = 1
    if first_step is None:
        # Hairer et al. II.4: h0 from the sizes of y and f, refined with one Euler probe
        d0 = _rms_scaled(y, y, rtol, atol)
        d1 = _rms_scaled(k1, y, rtol, atol)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, abs(span))
        y_probe = _combine(y, direction * h0, (1.0,), (k1,))
        k_probe = f(y_probe, t0 + direction * h0)
        evaluations += 1
        d2 = _rms_scaled(tuple(a - b for a, b in zip(k_probe, k1)), y, rtol, atol) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
        h = min(100 * h0, h1, abs(span))
    else:
        h = min(abs(first_step), abs(span))
    t = t0
    accepted = rejected = 0
    just_rejected = False
    while direction * (t1 - t) > 0:
        if accepted + rejected >= max_steps:
            raise RuntimeError(
                f"the adaptive ODE solver took {max_steps} steps before reaching the end (at t = {t:.6g} of "
                f"[{t0:.6g}, {t1:.6g}]); loosen rtol/atol or raise max_steps"
            )
        last = abs(t1 - t) <= h * (1 + 1e-12)
        step = (t1 - t) if last else direction * h
        ks = [k1]
        for i in range(1, 6):
            ks.append(f(_combine(y, step, _A[i], ks), t + _C[i] * step))
        y_new = _combine(y, step, _B, ks)
        t_new = t1 if last else t + step
        k7 = f(y_new, t_new)
        evaluations += 6
        err = tuple(sum((step * e) * k[j] for e, k in zip(_E, ks + [k7]) if e != 0.0) for j in range(len(y)))
        ratio = _error_ratio(y, y_new, err, rtol, atol)
        if not math.isfinite(ratio):
            ratio = math.inf
        if ratio <= 1.0:
            t, y, k1 = t_new, y_new, k7
            accepted += 1
            if on_step is not None:
                on_step(accepted - 1, t, y, k1)
            factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio ** -0.2))
            if just_rejected:
                factor = min(factor, 1.0)
            just_rejected = False
            h = abs(step) * factor
        else:
            rejected += 1
            just_rejected = True
            h = abs(step) * (0.2 if not math.isfinite(ratio) else max(0.2, 0.9 * ratio ** -0.2))
            if h <= 4 * math.ulp(abs(t) + abs(span)):
                raise RuntimeError(f"the adaptive ODE solver's step size underflowed at t = {t:.6g}; the problem may be stiff or non-finite")
    return y, {"accepted": accepted, "rejected": rejected, "evaluations": evaluations}


def _rms_scaled(v: State, y: State, rtol: float, atol: float) -> float:
    total, count = 0.0, 0
    for a, b in zip(v, y):
        total += float(((a / (atol + rtol * b.abs())) ** 2).sum())
        count += a.numel()
    return math.sqrt(total / max(count, 1))


# --------------------------------------------------------------------------------------
# Steps in x space written with host-float coefficients
# --------------------------------------------------------------------------------------


def eps_hat(denoise, x: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx~/ds~ = (x - alpha D) / sigma, D) at a noisy level."""
    x0 = denoise(x, level)
    return torch.add(x, x0, alpha=-level.alpha) * (1.0 / level.sigma), x0


def transfer(x: torch.Tensor, e: torch.Tensor, t: Level, s: Level) -> torch.Tensor:
    """x~_s = x~_t + (s~_s - s~_t) e in x space: DDIM's step for the noise estimate e
    (PNDM's transfer phi, Liu et al. 2022, eq. 9)."""
    return torch.add((s.alpha / t.alpha) * x, e, alpha=s.alpha * (sigma_tilde(s) - sigma_tilde(t)))


def rk4_slope(denoise, x: torch.Tensor, t: Level, s: Level, e1: torch.Tensor, make: Callable[[float], Level]) -> torch.Tensor:
    """The classical Runge-Kutta slope (e1 + 2 e2 + 2 e3 + e4) / 6 of dx~/ds~ over [s~_t, s~_s],
    midpoint in s~ (PNDM's pseudo Runge-Kutta, Liu et al. 2022, eq. 13), given e1 at t.
    Onto the clean level, where the denoiser cannot be evaluated (sigma = 0), it returns
    the midpoint slope e2 (second order)."""
    mid = make(logsnr_from_sigma_tilde(0.5 * (sigma_tilde(t) + sigma_tilde(s))))
    e2, _ = eps_hat(denoise, transfer(x, e1, t, mid), mid)
    if s.sigma == 0.0:
        return e2
    e3, _ = eps_hat(denoise, transfer(x, e2, t, mid), mid)
    e4, _ = eps_hat(denoise, transfer(x, e3, t, s), s)
    return (e1 + 2.0 * e2 + 2.0 * e3 + e4) * (1.0 / 6.0)
