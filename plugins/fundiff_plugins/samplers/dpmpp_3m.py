"""DPM-Solver++(3M): third-order multistep solver in data-prediction form (Lu et al. 2022b,
DPM-Solver++, sec. 4 and Appendix; k-diffusion's ``sample_dpmpp_3m_sde`` with eta = 0,
diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``).

With lam = log(alpha / sigma), h = lam_s - lam_t and D_t, D_1, D_2 the x0 estimates at the
current and the two previous levels (steps h_1 = lam_t - lam_1, h_2 = lam_1 - lam_2), the
exact solution x_s = (sigma_s / sigma_t) x_t + sigma_s int e^{lam} D dlam is integrated with D
replaced by its quadratic interpolant in lam:

    r0 = h_1 / h, r1 = h_2 / h
    d1_0 = (D_t - D_1) / r0,  d1_1 = (D_1 - D_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1)          (~ h D')
    d2 = (d1_0 - d1_1) / (r0 + r1)                      (~ h^2 D'' / 2)
    x_s = (sigma_s / sigma_t) x_t + alpha_s [ (1 - e^{-h}) D_t + h phi_2(-h) d1 + 2 h phi_3(-h) d2 ]

with phi_k the exponential-integrator weights (phi_2(-h) ~ 1/2, phi_3(-h) ~ 1/6), computed
on the host without cancellation. The weight of d2 is the Taylor-exact one: sigma_s int
e^lam (lam - lam_t)^2 dlam = 2 alpha_s h^3 phi_3(-h), and d2 = h^2 D'' / 2.

Difference from k-diffusion (``sample_dpmpp_3m_sde``, eta = 0) and diffusers
(``multistep_dpm_solver_third_order_update``): both form d1 and d2 as above but weight d2
by h phi_3(-h) (their ``-phi_3`` with phi_3 = phi_2 / h - 1/2), half the exact weight, so
their step matches a quadratic D only to second order (with an x-independent D that is flat
at the start, tests/test_samplers_exponential.py, the error falls ~8x per halving of h with
this weight and measured ~4x with theirs).

The first step is first order, the second second order (DPM-Solver++(2M) with r = r0), then
third order; the step onto a clean level returns alpha_0 D_t (first order, as k-diffusion and diffusers do).
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS

from ._exponential import lam, lincomb, phi


def plan_3m(levels) -> list[tuple[float, float, float, float]]:
    """Per step (c_x, c_t, c_1, c_2): x_s = c_x x_t + c_t D_t + c_1 D_1 + c_2 D_2 (host floats)."""
    plan = []
    for i in range(len(levels) - 1):
        t, s = levels[i], levels[i + 1]
        if s.is_clean:
            plan.append((0.0, s.alpha, 0.0, 0.0))
            continue
        h = lam(s) - lam(t)
        c_x = s.sigma / t.sigma
        c_t = -s.alpha * math.expm1(-h)
        p2 = s.alpha * h * phi(2, -h)  # weight of d1
        if i == 0:
            plan.append((c_x, c_t, 0.0, 0.0))
        elif i == 1:
            r0 = (lam(t) - lam(levels[i - 1])) / h
            plan.append((c_x, c_t + p2 / r0, -p2 / r0, 0.0))
        else:
            r0 = (lam(t) - lam(levels[i - 1])) / h
            r1 = (lam(levels[i - 1]) - lam(levels[i - 2])) / h
            p3 = s.alpha * h * phi(3, -h)  # weight of d2 (with the factor 2 from d2 ~ h^2 D'' / 2)
            # d1_0 = (D_t - D_1) / r0, d1_1 = (D_1 - D_2) / r1, expanded into D_t, D_1, D_2
            a0, a1 = 1.0 / r0, 1.0 / r1
            w = r0 / (r0 + r1)
            d1 = ((1 + w) * a0, -(1 + w) * a0 - w * a1, w * a1)  # coefficients of (D_t, D_1, D_2) in d1
            d2 = (a0 / (r0 + r1), (-a0 - a1) / (r0 + r1), a1 / (r0 + r1))
            c = [p2 * d1[k] + 2.0 * p3 * d2[k] for k in range(3)]
            plan.append((c_x, c_t + c[0], c[1], c[2]))
    return plan


@attrs.frozen(kw_only=True)
class DPMSolverPP3M(Sampler):
    """DPM-Solver++(3M): one evaluation per step, quadratic extrapolation of the x0 estimate in lam."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        plan = plan_3m(levels)
        d1 = d2 = None
        for i, (c_x, c_t, c_1, c_2) in enumerate(plan):
            x0 = denoise(x, levels[i])
            terms = [(c_t, x0), (c_x, x)]
            if c_1 != 0.0:
                terms.append((c_1, d1))
            if c_2 != 0.0:
                terms.append((c_2, d2))
            x = lincomb(terms)
            d1, d2 = x0, d1
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpmpp-3m", DPMSolverPP3M)
