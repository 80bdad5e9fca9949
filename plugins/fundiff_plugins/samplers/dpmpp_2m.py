"""DPM-Solver++(2M): second-order multistep solver in data-prediction form (Lu et al. 2022b,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2).

In lam = log(alpha / sigma) the probability-flow ODE with the data prediction D(x, lam) has
the exact solution (eq. 9)

    x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lam_t}^{lam_s} e^{lam} D(x_lam, lam) dlam.

With D frozen at D_t this is the first-order step, identical to DDIM (eta = 0):

    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D_t,             h = lam_s - lam_t.

From the second step on, D is extrapolated linearly from the previous evaluation D_p at
lam_p (r = (lam_t - lam_p) / h) and the step uses (1 + 1/(2r)) D_t - 1/(2r) D_p in place of
D_t (Algorithm 2, line 8). One evaluation per step; the first step and the step onto a clean
level (sigma = 0, where e^{-h} = 0 and the step returns alpha_0 D_t) are first order.
Each step is one fused step (:mod:`fundiff.fused`): x_s and D_t (kept as the next step's D_p)
from one pass over x, D_t's guidance branches and D_p.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS

from ._exponential import lam


def plan_2m(levels) -> list[tuple[float, float, float]]:
    """Per step (c_x, c_t, c_p): x_s = c_x x_t + c_t D_t + c_p D_p (host floats)."""
    plan = []
    for i in range(len(levels) - 1):
        t, s = levels[i], levels[i + 1]
        if s.is_clean:
            plan.append((0.0, s.alpha, 0.0))
            continue
        h = lam(s) - lam(t)
        c_x = s.sigma / t.sigma
        c_d = -s.alpha * math.expm1(-h)
        if i == 0:
            plan.append((c_x, c_d, 0.0))
        else:
            r = (lam(t) - lam(levels[i - 1])) / h
            plan.append((c_x, c_d * (1.0 + 0.5 / r), -c_d * 0.5 / r))
    return plan


@attrs.frozen(kw_only=True)
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M): one evaluation per step, linear extrapolation of the x0 estimate in lam."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        plan = plan_2m(levels)
        previous = None
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (c_x, c_t, c_p) in enumerate(plan):
            x0 = predict(x, levels[i])
            x, x0 = ex.step(((c_x, x), (c_t, x0), (c_p, previous)) if c_p != 0.0 else ((c_t, x0), (c_x, x)), ((1.0, x0),))
            previous = x0
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpmpp-2m", DPMSolverPP2M)
