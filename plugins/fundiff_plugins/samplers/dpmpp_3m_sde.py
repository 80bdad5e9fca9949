"""DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``: the third-order multistep
data-prediction solver of Lu et al. 2022b, "DPM-Solver++", extended to the reverse SDE as in
its sec. 5), for any Gaussian chain.

With h = (lambda_s - lambda_t) / 2 for a step from level t to the less noisy s, h_eta =
(1 + eta) h, x~ = x / alpha, D_i the x0 estimate at level i and h_1, h_2 the previous two
steps:

    x~_s = e^(-h_eta) x~_t + (1 - e^(-h_eta)) D_i + phi2(h_eta) d1 - phi3(h_eta) d2
           + s_noise s~_s sqrt(1 - e^(-2 eta h)) z,

    r0 = h_1 / h, r1 = h_2 / h, d1_0 = (D_i - D_{i-1}) / r0, d1_1 = (D_{i-1} - D_{i-2}) / r1,
    d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1),   d2 = (d1_0 - d1_1) / (r0 + r1),
    phi2(x) = 1 - (1 - e^-x) / x,   phi3(x) = phi2(x) / x - 1/2,

with the second-order step (d1 = d1_0, no d2) when only one previous estimate exists and
the first-order one on the first step. eta = 1 is the SDE solver (its first step DDPM's
posterior step); eta = 0 the deterministic DPM-Solver++(3M). phi2 and phi3 are evaluated
by their series for small arguments (k-diffusion's closed forms lose digits as h -> 0). In
x-space e^(-h_eta) alpha_s / alpha_t = (sigma_s / sigma_t) e^(-eta h) and the noise scale
alpha_s s~_s = sigma_s. The last step, onto the clean level, returns alpha D there.
Each step is one fused step (:mod:`fundiff.fused`); fresh noise is drawn inside the kernel there.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.brownian import StepNoise
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

from ._sde import brownian_needs_gaussian, noise_field, phi2, phi3


@attrs.frozen(kw_only=True)
class DPMpp3MSDE(Sampler):
    """DPM-Solver++(3M) for the reverse SDE (eta = 1) down to the ODE (eta = 0); one evaluation per step."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    eta: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("stochasticity: 0 the PF-ODE (DPM-Solver++(3M)), 1 the reverse SDE"))
    s_noise: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("scale of the added noise (k-diffusion's s_noise)"))
    noise: str = noise_field()

    def check_recipe(self, components):
        return brownian_needs_gaussian(self, components)

    def _plan(self, levels):
        """Per step (c_x, c_0, c_1, c_2, c_z): x_s = c_x x + c_0 D_i + c_1 D_{i-1} + c_2 D_{i-2} + c_z z,
        the history differences expanded into weights of D_i, D_{i-1}, D_{i-2}."""
        plans, hist = [], []  # hist: previous step sizes h, newest first
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            if s.is_clean:
                plans.append((0.0, s.alpha, 0.0, 0.0, 0.0))
                continue
            h = 0.5 * (s.logsnr - t.logsnr)
            h_eta = (1.0 + self.eta) * h
            w0, w1, w2 = -math.expm1(-h_eta), 0.0, 0.0  # weights of D_i, D_{i-1}, D_{i-2} (x~ units)
            if len(hist) >= 2:
                r0, r1 = hist[0] / h, hist[1] / h
                p2, p3 = phi2(h_eta), phi3(h_eta)
                # d1_0 = (D0 - D1) / r0, d1_1 = (D1 - D2) / r1 as weight vectors on (D0, D1, D2)
                d10 = (1.0 / r0, -1.0 / r0, 0.0)
                d11 = (0.0, 1.0 / r1, -1.0 / r1)
                diff = tuple(a - b for a, b in zip(d10, d11))
                d1 = tuple(a + b * r0 / (r0 + r1) for a, b in zip(d10, diff))
                d2 = tuple(b / (r0 + r1) for b in diff)
                w0 += p2 * d1[0] - p3 * d2[0]
                w1 += p2 * d1[1] - p3 * d2[1]
                w2 += p2 * d1[2] - p3 * d2[2]
            elif len(hist) == 1:
                r = hist[0] / h
                p2 = phi2(h_eta)
                w0 += p2 / r
                w1 -= p2 / r
            c_z = self.s_noise * s.sigma * math.sqrt(-math.expm1(-2.0 * self.eta * h)) if self.eta > 0 else 0.0
            plans.append(((s.sigma / t.sigma) * (math.exp(-self.eta * h) if self.eta > 0 else 1.0), s.alpha * w0, s.alpha * w1, s.alpha * w2, c_z))
            hist.insert(0, h)
        return plans

    def sample(self, denoise, x, levels, noise=None, callback=None):
        plans = self._plan(levels)
        draws = StepNoise(noise, self.noise, levels, sampler="dpmpp-3m-sde") if any(p[4] > 0 for p in plans) else None
        x0_1 = x0_2 = None  # D_{i-1}, D_{i-2}
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (c_x, c_0, c_1, c_2, c_z) in enumerate(plans):
            x0 = predict(x, levels[i])
            terms = [(c_0, x0)] if c_x == 0.0 else [(c_x, x), (c_0, x0)]
            if c_1 != 0.0:
                terms.append((c_1, x0_1))
            if c_2 != 0.0:
                terms.append((c_2, x0_2))
            if c_z > 0.0:
                terms.append((c_z, draws.operand(ex, i, levels[i], levels[i + 1])))
            x, x0 = ex.step(terms, ((1.0, x0),))
            x0_1, x0_2 = x0, x0_1
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpmpp-3m-sde", DPMpp3MSDE)
