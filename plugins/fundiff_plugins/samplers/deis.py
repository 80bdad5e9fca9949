"""DEIS: diffusion exponential integrator sampler (Zhang and Chen 2023, "Fast Sampling of
Diffusion Models with Exponential Integrator", sec. 3-4), multistep, orders 1-3.

With the scaled state x~ = x / alpha and rho = sigma / alpha (= exp(-logSNR / 2)) the
probability-flow ODE of any Gaussian chain is dx~/drho = eps(x, rho) (the noise prediction),
so exactly

    x_s / alpha_s = x_t / alpha_t + int_{rho_t}^{rho_s} eps(rho) drho.

DEIS replaces eps by the Lagrange polynomial through the last ``order`` evaluations
(Adams-Bashforth, eq. 14) and integrates the weights once per grid on the host:

    x_s = (alpha_s / alpha_t) x_t + alpha_s sum_j C_j eps_{t_j},  C_j = int_{rho_t}^{rho_s} L_j(v(rho)) drho

``variant`` picks the variable the polynomial lives in:

* ``rhoAB``: v = rho, the paper's rhoAB-DEIS (eq. 15); the weights are integrals of
  polynomials, exact with Gauss-Legendre quadrature. It reaches the clean level (rho = 0)
  at full order.
* ``lambdaAB``: v = log rho = -logSNR / 2, the exponential-integrator form (diffusers'
  ``DEISMultistepScheduler``, "logrho"); C_j = int L_j(v) e^v dv by 16-point Gauss-Legendre,
  exact to rounding for the step sizes samplers take. The step onto a clean level
  (v = -inf) is first order there: x = alpha_0 D.

Order 1 of either is DDIM. The paper's tAB-DEIS (a polynomial in the time t) needs each
level's t, which a sampler does not receive (levels carry logSNR, alpha, sigma), so it is not
offered. Warm-up: step i uses order min(order, i + 1). Weights are cached per grid. A first
level with alpha = 0 (zero terminal SNR, rho = inf) is left by a DDIM step, the exact limit
there, and the polynomial history starts at the next level. Each step is one fused step
(:mod:`fundiff.fused`): eps_t (kept as history), x_s with eps_t's two terms folded in, and the
x0 estimate, from one pass over x, the denoiser's branches and the older eps.
"""

from __future__ import annotations

import functools
import math

import attrs
import numpy as np

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import doc, in_range, one_of

from ._exponential import zero_snr_start

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)


def _lagrange(nodes: list[float], j: int, v: np.ndarray) -> np.ndarray:
    out = np.ones_like(v)
    for k, vk in enumerate(nodes):
        if k != j:
            out = out * (v - vk) / (nodes[j] - vk)
    return out


@functools.lru_cache(maxsize=64)
def deis_plan(grid: tuple[tuple[float, float, float], ...], order: int, variant: str) -> tuple[tuple[float, ...], ...]:
    """Per step (c_x, c_0, c_1, ...): x_s = c_x x_t + sum_j c_j eps at the j-th previous level."""
    plan = []
    for i in range(len(grid) - 1):
        (_, a_t, _), (_, a_s, s_s) = grid[i], grid[i + 1]
        p = min(order, i + 1)
        rho = [grid[i - j][2] / grid[i - j][1] for j in range(p)]
        rho_s = s_s / a_s
        if variant == "rhoAB":
            lo, hi, nodes = rho[0], rho_s, rho
            v = 0.5 * (hi - lo) * _NODES + 0.5 * (hi + lo)
            weight = 0.5 * (hi - lo) * _WEIGHTS
        else:
            if s_s == 0.0:  # onto the clean level: first order, C_0 = rho_s - rho_t
                plan.append((a_s / a_t, a_s * (rho_s - rho[0])))
                continue
            nodes = [math.log(r) for r in rho]
            lo, hi = nodes[0], math.log(rho_s)
            v = 0.5 * (hi - lo) * _NODES + 0.5 * (hi + lo)
            weight = 0.5 * (hi - lo) * _WEIGHTS * np.exp(v)
        coefs = [float(np.sum(weight * _lagrange(nodes, j, v))) for j in range(p)]
        plan.append((a_s / a_t,) + tuple(a_s * c for c in coefs))
    return tuple(plan)


@attrs.frozen(kw_only=True)
class DEIS(Sampler):
    """DEIS: Adams-Bashforth exponential integrator on the noise prediction, one evaluation per step."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    order: int = attrs.field(default=3, validator=in_range(1, 3), metadata=doc("number of eps evaluations the polynomial passes through (1 = DDIM)"))
    variant: str = attrs.field(default="rhoAB", validator=one_of("rhoAB", "lambdaAB"), metadata=doc("polynomial in rho = sigma / alpha (rhoAB) or in log rho = -logSNR / 2 (lambdaAB)"))

    def sample(self, denoise, x, levels, noise=None, callback=None):
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        x, levels, offset = zero_snr_start(denoise, x, levels, callback, ex)
        plan = deis_plan(tuple((lv.logsnr, lv.alpha, lv.sigma) for lv in levels), self.order, self.variant)
        history: list = []  # eps estimates, newest first
        for i, coefs in enumerate(plan):
            t = levels[i]
            x0 = predict(x, t)
            # eps_t = (x - alpha_t x0) / sigma_t; x_s = c_x x + c_0 eps_t + sum_{j >= 1} c_j eps_j
            c_0 = coefs[1]
            older = [(c, history[j - 1]) for j, c in enumerate(coefs[2:], start=1)]
            step = [(coefs[0] + c_0 / t.sigma, x), (-c_0 * t.alpha / t.sigma, x0)] + older
            eps, x, x0 = ex.step(((1.0 / t.sigma, x), (-t.alpha / t.sigma, x0)), step, ((1.0, x0),))
            history = [eps] + history[: self.order - 1]
            if callback is not None:
                callback(i + offset, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("deis", DEIS)
