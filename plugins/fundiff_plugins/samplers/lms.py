"""Linear multistep (Adams-Bashforth) on the probability-flow ODE in s~ = sigma / alpha
(k-diffusion's ``sample_lms``; the variable-step Adams-Bashforth family, Hairer, Norsett and
Wanner, "Solving ODEs I", sec. III.5).

In (x~, s~) = (x / alpha, sigma / alpha) the PF-ODE is dx~/ds~ = eps_hat (Karras et al. 2022,
eq. 4). Step i goes from s~_i to s~_{i+1} with the last q = min(i + 1, order) slopes:

    x~_{i+1} = x~_i + sum_j c_ij eps_hat_{i-j},
    c_ij = integral from s~_i to s~_{i+1} of the Lagrange basis polynomial l_j(tau) through
           the nodes s~_i, s~_{i-1}, ..., s~_{i-q+1}.

The integrals are exact: Gauss-Legendre with q nodes integrates the degree q - 1 basis
polynomials exactly; they are computed on the host once per grid, before the loop.

Warm start (``warm_start``): until ``order`` slopes exist,

- ``lower-order`` (k-diffusion's, the default): the first steps use the slopes there are,
  at orders 1, 2, ..., k - 1. NFE = steps. The first (Euler) step's local error O(h^2)
  stays in the result, so for k > 2 the global order is k only while that step's error is
  small (a grid that starts at high noise, where the path is nearly straight) and falls to
  2 as steps grow.
- ``rk4``: the first k - 1 steps are classical Runge-Kutta steps in s~ (midpoint in s~,
  4 evaluations each), whose local error O(h^5) keeps the global order k <= 4.
  NFE = steps + 3 (k - 1).

The last step integrates onto s~ = 0 with the same formula (as k-diffusion does), so the
sample lands on the clean level without a separate jump. ``steps`` is the number of steps.
Each slope and each update is one fused step (:mod:`fundiff.fused`).
"""

from __future__ import annotations

import functools

import attrs
import numpy as np

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import doc, in_range, one_of

from ._exponential import zero_snr_start
from ._pfode import level_maker, rk4_slope, sigma_tilde, transfer


@functools.lru_cache(maxsize=None)
def _gauss_legendre(q: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    nodes, weights = np.polynomial.legendre.leggauss(q)
    return tuple(float(v) for v in nodes), tuple(float(v) for v in weights)


def adams_coefficients(nodes: list[float], a: float, b: float) -> list[float]:
    """Integrals over [a, b] of the Lagrange basis polynomials through ``nodes`` (host floats)."""
    gauss_x, gauss_w = _gauss_legendre(len(nodes))
    half, centre = 0.5 * (b - a), 0.5 * (b + a)
    taus = [half * v + centre for v in gauss_x]
    out = []
    for j, nj in enumerate(nodes):
        total = 0.0
        for tau, w in zip(taus, gauss_w):
            basis = w
            for m, nm in enumerate(nodes):
                if m != j:
                    basis *= (tau - nm) / (nj - nm)
            total += basis
        out.append(half * total)
    return out


@attrs.frozen(kw_only=True)
class LMS(Sampler):
    """Variable-step Adams-Bashforth of order k on the PF-ODE in sigma / alpha (deterministic)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    order: int = attrs.field(default=4, validator=in_range(1, 6), metadata=doc("order k: how many past slopes each step uses"))
    warm_start: str = attrs.field(
        default="lower-order", validator=one_of("lower-order", "rk4"), metadata=doc("first k - 1 steps: lower-order (k-diffusion) or rk4")
    )

    def plan(self, levels) -> list[tuple[float, float, list[float]]]:
        """Per step: (1 / sigma_i, alpha_{i+1} / alpha_i, alpha_{i+1} * [c_i0, c_i1, ...])."""
        st = [sigma_tilde(lv) for lv in levels]
        out = []
        for i in range(len(levels) - 1):
            q = min(i + 1, self.order)
            nodes = [st[i - j] for j in range(q)]
            coefs = adams_coefficients(nodes, st[i], st[i + 1])
            nxt = levels[i + 1]
            out.append((1.0 / levels[i].sigma, nxt.alpha / levels[i].alpha, [nxt.alpha * c for c in coefs]))
        return out

    def sample(self, denoise, x, levels, noise=None, callback=None):
        # from a zero-terminal-SNR level (alpha = 0, x / alpha infinite) take the exact first
        # step, x_s = alpha_s D + (sigma_s / sigma_t) x, then continue on the rest of the grid
        x, levels, _ = zero_snr_start(denoise, x, levels, callback)
        if len(levels) < 2:
            return x
        history = []  # eps_hat, newest first
        make = level_maker(levels) if self.warm_start == "rk4" else None
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (inv_sigma, c_x, c_eps) in enumerate(self.plan(levels)):
            t = levels[i]
            warming = make is not None and i < self.order - 1
            x0 = denoise(x, t) if warming else predict(x, t)
            eps, x0 = ex.step(((inv_sigma, x), (-t.alpha * inv_sigma, x0)), ((1.0, x0),))  # (x - alpha D) / sigma
            history.insert(0, eps)
            del history[self.order :]
            if warming:
                x = transfer(x, rk4_slope(denoise, x, t, levels[i + 1], history[0], make), t, levels[i + 1])
            else:
                (x,) = ex.step([(c_x, x), *zip(c_eps, history)])
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("lms", LMS)
