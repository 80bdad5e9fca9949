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

from fundiff import fused, noiselevel
from fundiff.noiselevel import Level


def lam(level: Level) -> float:
    """Lu et al.'s lambda = log(alpha / sigma) = logSNR / 2 (+inf at the clean level)."""
    return 0.5 * level.logsnr


#: inner levels on the grid's chain (shared with the other sampler families)
level_between = noiselevel.level_between


_SERIES_TERMS = 20
_INVERSE_FACTORIALS = tuple(1.0 / math.factorial(n) for n in range(_SERIES_TERMS + 44))  # k up to 44


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j + k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z).

    The exponential-integrator weights (Hochbruck and Ostermann 2010; Lu et al. 2022b,
    DPM-Solver++, eq. 3-4). For |z| < 1 the series avoids the cancellation of the recurrence
    (relative error ~ U / |z|^k there); elsewhere the recurrence from expm1 is accurate.
    """
    if z == -math.inf:  # the limit of a step onto the clean level: every phi_k(-inf) = 0
        return 0.0
    if abs(z) < 1.0:
        # Horner on the first _SERIES_TERMS terms: the rest is below sum_{j >= 20} 1/(j + k)!
        # < 1e-18, while phi_k(z) > phi_k(-1) >= e^-1 / k!, so it is below 1e-17 relative
        coefficients = _INVERSE_FACTORIALS[k : k + _SERIES_TERMS]
        total = 0.0
        for c in reversed(coefficients):
            total = total * z + c
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
    if n == 2:  # the common case (second-order multistep corrections): Cramer's rule
        (p, q), (r, t) = matrix
        det = p * t - q * r
        return [(rhs[0] * t - q * rhs[1]) / det, (p * rhs[1] - r * rhs[0]) / det]
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


def zero_snr_start(denoise, x: torch.Tensor, levels, callback, ex=None):
    """Take the first step as DDIM when the first level has alpha = 0 (logSNR = -inf).

    At a zero-terminal-SNR level (Lin et al. 2024) lam = -inf: noise-prediction forms divide
    by alpha and multistep weights see an infinite step, but the exact solution's limit is
    the DDIM step x_s = alpha_s D + (sigma_s / sigma_t) x (eps = x / sigma_t there). Returns
    (x, levels, offset): the state after that step, the remaining levels and the callback
    index offset (0 and the input unchanged when alpha > 0). The step is a fused step
    (:mod:`fundiff.fused`) on ``ex``, the run's executor (default: the one for ``x``).
    """
    t = levels[0]
    if t.alpha > 0.0 or len(levels) < 2:
        return x, levels, 0
    s = levels[1]
    ex = ex if ex is not None else fused.executor(x)
    x0 = ex.predict(denoise, x, t)
    x, x0 = ex.step(((s.alpha, x0),) if s.is_clean else ((s.alpha, x0), (s.sigma / t.sigma, x)), ((1.0, x0),))
    if callback is not None:
        callback(0, x, x0)
    return x, levels[1:], 1
