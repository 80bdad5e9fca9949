"""DPM-Solver++(2M) SDE (Lu et al. 2022b, "DPM-Solver++", sec. 5 and App. B: the second-order
multistep solver of the data-prediction reverse SDE; as in k-diffusion's
``sample_dpmpp_2m_sde`` and diffusers' ``sde-dpmsolver++``), for any Gaussian chain.

In half-logSNR units, h = (lambda_s - lambda_t) / 2 for a step from level t to the less noisy
s, and with x~ = x / alpha, D_i the x0 estimate at level i:

    x~_s = e^(-h) e^(-eta h) x~_t + (1 - e^(-(1 + eta) h)) D_i + correction
           + s_noise s~_s sqrt(1 - e^(-2 eta h)) z,
    midpoint:  correction = 1/2 (1 - e^(-(1 + eta) h)) (D_i - D_{i-1}) / r
    heun:      correction = phi2((1 + eta) h) (D_i - D_{i-1}) / r,   phi2(x) = 1 - (1 - e^-x) / x

with r = h_{i-1} / h (no correction on the first step). eta = 1 is the SDE solver (on the first
step it is DDPM's posterior step exactly); eta = 0 is the deterministic DPM-Solver++(2M) with
``midpoint`` (k-diffusion's ``sample_dpmpp_2m``) and diffusers' ``heun`` 2M variant with
``heun``. In x-space the factor e^(-h) alpha_s / alpha_t is sigma_s / sigma_t and the noise
scale alpha_s s~_s is sigma_s. The last step, onto the clean level, returns alpha D there.
A first level at zero SNR (alpha = 0, h = inf) gives a first step to alpha_s D plus the
posterior noise, and no history correction after it (r = inf).
``noise: brownian`` uses a per-sample Brownian tree (k-diffusion defaults to one here).
Each step is one fused step (:mod:`fundiff.fused`), with c_diff (D_i - D_{i-1}) collected
into the coefficients of D_i and D_{i-1}; fresh noise is drawn inside the kernel there.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.brownian import StepNoise
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, one_of

from ._sde import brownian_needs_gaussian, noise_field, phi2


@attrs.frozen(kw_only=True)
class DPMpp2MSDE(Sampler):
    """DPM-Solver++(2M) for the reverse SDE (eta = 1) down to the ODE (eta = 0); one evaluation per step."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    eta: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("stochasticity: 0 the PF-ODE (DPM-Solver++(2M)), 1 the reverse SDE"))
    s_noise: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("scale of the added noise (k-diffusion's s_noise)"))
    solver_type: str = attrs.field(default="midpoint", validator=one_of("midpoint", "heun"), metadata=doc("second-order correction: midpoint or heun"))
    noise: str = noise_field()

    def check_recipe(self, components):
        return brownian_needs_gaussian(self, components)

    def _plan(self, levels):
        """Per step (c_x, c_d, c_diff, c_z): x_s = c_x x + c_d D_i + c_diff (D_i - D_{i-1}) + c_z z."""
        plans, h_last = [], None
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            if s.is_clean:
                plans.append((0.0, s.alpha, 0.0, 0.0))
                continue
            h = 0.5 * (s.logsnr - t.logsnr)
            h_eta = (1.0 + self.eta) * h
            c_d = -s.alpha * math.expm1(-h_eta)
            c_diff = 0.0
            if h_last is not None:
                r = h_last / h
                c_diff = s.alpha * (0.5 * -math.expm1(-h_eta) if self.solver_type == "midpoint" else phi2(h_eta)) / r
            c_z = self.s_noise * s.sigma * math.sqrt(-math.expm1(-2.0 * self.eta * h)) if self.eta > 0 else 0.0
            plans.append(((s.sigma / t.sigma) * (math.exp(-self.eta * h) if self.eta > 0 else 1.0), c_d, c_diff, c_z))
            h_last = h
        return plans

    def sample(self, denoise, x, levels, noise=None, callback=None):
        plans = self._plan(levels)
        draws = StepNoise(noise, self.noise, levels, sampler="dpmpp-2m-sde") if any(p[3] > 0 for p in plans) else None
        x0_prev = None
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (c_x, c_d, c_diff, c_z) in enumerate(plans):
            x0 = predict(x, levels[i])
            if c_diff != 0.0 and x0_prev is not None:
                c_d, terms = c_d + c_diff, [(-c_diff, x0_prev)]
            else:
                terms = []
            terms = ([(c_d, x0)] if c_x == 0.0 else [(c_x, x), (c_d, x0)]) + terms
            if c_z > 0.0:
                terms.append((c_z, draws.operand(ex, i, levels[i], levels[i + 1])))
            x, x0 = ex.step(terms, ((1.0, x0),))
            x0_prev = x0
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpmpp-2m-sde", DPMpp2MSDE)
