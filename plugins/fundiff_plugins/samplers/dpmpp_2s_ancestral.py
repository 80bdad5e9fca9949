"""DPM-Solver++(2S) with ancestral noise (k-diffusion's ``sample_dpmpp_2s_ancestral``; the
singlestep second-order data-prediction solver of Lu et al. 2022b, "DPM-Solver++", Algorithm 1
with r = 1/2), for any Gaussian chain.

Each step from level t to the less noisy s first splits s~_s = sigma_s / alpha_s into an ODE
part s~_down and noise s~_up as Euler ancestral does (``eta``, k-diffusion's
get_ancestral_step), then takes a DPM-Solver++(2S) step of the probability-flow ODE from t to
s~_down and adds ``s_noise * s~_up`` fresh noise. In half-logSNR units (h = (lambda_down -
lambda_t) / 2, lambda_down = -2 log s~_down) with the midpoint lambda_m = lambda_t + h:

    x~_m = e^(-h/2) x~_t + (1 - e^(-h/2)) D(x_t)                     (DPM-Solver++(1) to m)
    x~_s = e^(-h) x~_t + (1 - e^(-h)) D(x_m) + s_noise s~_up z

(x~ = x / alpha); in x-space x_m = (sigma_m / sigma_t) x_t + alpha_m (1 - e^(-h/2)) D and
x_s = (sigma_s s~_down / (s~_s sigma_t)) x_t + alpha_s (1 - e^(-h)) D(x_m) + s_noise sigma_s
(s~_up / s~_s) z. The midpoint level is off the grid; its (alpha, sigma) come from the two
neighbours' chain (``_sde.inner_level``: exact on VP and VE chains). Where s~_down = 0 (the
last step, onto the clean level) the step is the Euler step to D, as in k-diffusion; from
a level at zero SNR (alpha = 0, h = inf) there is no midpoint and the step is the
first-order one, x_s = (sigma_s s~_down / (s~_s sigma_t)) x_t + alpha_s D(x_t) (DDIM).

Evaluations: 2 per step (``evaluations_per_step``), 1 on the last step; ``steps`` is the
number of grid steps. eta = 0 gives the deterministic DPM-Solver++(2S).
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.brownian import StepNoise
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

from ._sde import brownian_needs_gaussian, inner_level, noise_field
from .euler_ancestral import ancestral_fractions


@attrs.frozen(kw_only=True)
class DPMpp2SAncestral(Sampler):
    """DPM-Solver++(2S) steps of the PF-ODE to s~_down, then ancestral noise up to s~_s."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    evaluations_per_step = 2
    eta: float = attrs.field(
        default=1.0, validator=at_least(0.0), metadata=doc("ancestral noise: 0 deterministic DPM-Solver++(2S), 1 full ancestral step; above 1 capped")
    )
    s_noise: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("scale of the added noise (k-diffusion's s_noise)"))
    noise: str = noise_field()

    def check_recipe(self, components):
        return brownian_needs_gaussian(self, components)

    def _plan(self, t, s):
        """Host coefficients of one step: (mid level or None, stage-1 (a, b), stage-2 (a, b), c_z)."""
        if s.is_clean:
            return None, None, (0.0, s.alpha), 0.0
        down, up = ancestral_fractions(t, s, self.eta)
        c_z = self.s_noise * s.sigma * up
        if down == 0.0:
            return None, None, (0.0, s.alpha), c_z
        if t.alpha == 0.0:  # zero SNR at t: h = inf, no midpoint; the first-order (DDIM) step
            return None, None, (s.sigma * down / t.sigma, s.alpha), c_z
        lam_down = s.logsnr - 2.0 * math.log(down)
        h = 0.5 * (lam_down - t.logsnr)
        mid = inner_level(t, s, t.logsnr + h)
        stage1 = (mid.sigma / t.sigma, -mid.alpha * math.expm1(-0.5 * h))
        stage2 = (s.sigma * down / t.sigma, -s.alpha * math.expm1(-h))
        return mid, stage1, stage2, c_z

    def sample(self, denoise, x, levels, noise=None, callback=None):
        plans = [self._plan(levels[i], levels[i + 1]) for i in range(len(levels) - 1)]
        draws = StepNoise(noise, self.noise, levels, sampler="dpmpp-2s-ancestral") if any(p[3] > 0 for p in plans) else None
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (mid, stage1, (a2, b2), c_z) in enumerate(plans):
            x0 = predict(x, levels[i])
            if mid is None:
                terms = [(b2, x0)] if a2 == 0.0 else [(a2, x), (b2, x0)]
            else:
                x_mid, x0 = ex.step([(stage1[0], x), (stage1[1], x0)], ((1.0, x0),))
                terms = [(a2, x), (b2, predict(x_mid, mid))]
            if c_z > 0.0:
                terms.append((c_z, draws.operand(ex, i, levels[i], levels[i + 1])))
            x, x0 = ex.step(terms, ((1.0, x0),))
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpmpp-2s-ancestral", DPMpp2SAncestral)
