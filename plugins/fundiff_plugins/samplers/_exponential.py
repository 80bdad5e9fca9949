"""Host-side math shared by the exponential-integrator samplers (DPM-Solver, DPM-Solver++,
UniPC, DEIS). Not a component: no entry point, nothing registered.

Notation (Lu et al. 2022, DPM-Solver, sec. 3.1): ``lam = log(alpha / sigma)``, half of the
logSNR that :class:`fundiff.Level` carries, and ``h = lam_s - lam_t > 0`` for a step from the
noisier level t to s. Everything here takes and returns Python floats (or lists of them), so
the sampling loops only multiply tensors by host scalars.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fundiff import noiselevel
from fundiff.noiselevel import Level

#: |alpha^2 + sigma^2 - 1| below this on both neighbours: they lie on a variance-preserving chain
_VP_TOL = 1e-9


def lam(level: Level) -> float:
    """Lu et al.'s lambda = log(alpha / sigma) = logSNR / 2 (+inf at the clean level)."""
    return 0.5 * level.logsnr


def level_between(t: Level, s: Level, logsnr: float) -> Level:
    """A level at ``logsnr`` on the chain of its neighbours t and s (for inner evaluations).

    Samplers see levels, not the chain, so the chain is recognised from the neighbours: both
    with alpha^2 + sigma^2 = 1 (VP: alpha^2 = sigmoid(logSNR)), both with alpha = 1 (VE);
    otherwise log alpha is interpolated linearly in logSNR between t and s. In every case
    alpha / sigma = exp(logSNR / 2) exactly, so an exact denoiser (one that uses the level's
    alpha and sigma) gives exact results on any chain; only a network trained on a third kind
    of chain may see inputs of a slightly different scale at inner points.
    """
    if abs(t.alpha**2 + t.sigma**2 - 1.0) <= _VP_TOL and abs(s.alpha**2 + s.sigma**2 - 1.0) <= _VP_TOL:
        alpha, sigma = noiselevel.vp_alpha_sigma(logsnr)
        return Level(float(logsnr), alpha, sigma)
    if t.alpha == 1.0 and s.alpha == 1.0:
        return Level(float(logsnr), 1.0, math.exp(-0.5 * logsnr))
    if not (math.isfinite(t.logsnr) and math.isfinite(s.logsnr)) or t.alpha <= 0.0 or s.alpha <= 0.0:
        raise ValueError("an inner level needs two noisy neighbours with alpha > 0")
    w = (logsnr - t.logsnr) / (s.logsnr - t.logsnr)
    alpha = math.exp((1.0 - w) * math.log(t.alpha) + w * math.log(s.alpha))
    return Level(float(logsnr), alpha, alpha * math.exp(-0.5 * logsnr))


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j + k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z).

    The exponential-integrator weights (Hochbruck and Ostermann 2010; Lu et al. 2022b,
    DPM-Solver++, eq. 3-4). For |z| < 1 the series avoids the cancellation of the recurrence
    (relative error ~ U / |z|^k there); elsewhere the recurrence from expm1 is accurate.
    """
    if z == -math.inf:  # the limit of a step onto the clean level: every phi_k(-inf) = 0
        return 0.0
    if abs(z) < 1.0:
        total, term, j = 0.0, 1.0 / math.factorial(k), 0
        while True:
            total += term
            j += 1
            term *= z / (j + k)
            if abs(term) <= 1e-18 * abs(total):
                return total
    value = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value if k >= 1 else math.exp(z)


def lincomb(terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_i c_i * T_i with host-float c_i: one multiply, then fused multiply-adds in place."""
    (c0, t0), rest = terms[0], terms[1:]
    out = t0 * c0
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve a small dense linear system on the host (Gaussian elimination, partial pivoting)."""
    n = len(rhs)
    a = [list(row) + [b] for row, b in zip(matrix, rhs)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out


def zero_snr_start(denoise, x: torch.Tensor, levels, callback):
    """Take the first step as DDIM when the first level has alpha = 0 (logSNR = -inf).

    At a zero-terminal-SNR level (Lin et al. 2024) lam = -inf: noise-prediction forms divide
    by alpha and multistep weights see an infinite step, but the exact solution's limit is
    the DDIM step x_s = alpha_s D + (sigma_s / sigma_t) x (eps = x / sigma_t there). Returns
    (x, levels, offset): the state after that step, the remaining levels and the callback
    index offset (0 and the input unchanged when alpha > 0).
    """
    t = levels[0]
    if t.alpha > 0.0 or len(levels) < 2:
        return x, levels, 0
    s = levels[1]
    x0 = denoise(x, t)
    x = x0 * s.alpha if s.is_clean else lincomb(((s.alpha, x0), (s.sigma / t.sigma, x)))
    if callback is not None:
        callback(0, x, x0)
    return x, levels[1:], 1
