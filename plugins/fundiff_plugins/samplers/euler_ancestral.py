"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``; Karras et al. 2022, EDM,
sec. 3 for the (x~, s~) form), written for any Gaussian chain.

With x~ = x / alpha and s~ = sigma / alpha = exp(-lambda / 2) the probability-flow ODE is
dx~ / ds~ = (x~ - D) / s~ (D the x0 estimate). One step from level t to the less noisy s
splits s~_s^2 into a deterministic part and fresh noise (k-diffusion's get_ancestral_step):

    s~_up   = min(s~_s, eta * s~_s * sqrt(1 - exp(lambda_t - lambda_s)))
            = min(s~_s, eta * sqrt(s~_s^2 (s~_t^2 - s~_s^2) / s~_t^2)),
    s~_down = sqrt(s~_s^2 - s~_up^2),
    x~_s    = x~_t + (s~_down - s~_t) (x~_t - D) / s~_t + s_noise * s~_up * z,

an Euler step of the ODE to s~_down followed by noise up to s~_s. In x-space, with
r = exp(lambda_t - lambda_s) and q = s~_down / s~_t = sqrt(r (1 - min(eta^2 (1 - r), 1))):

    x_s = (sigma_s / sigma_t) sqrt(1 - min(eta^2 (1 - r), 1)) x_t + alpha_s (1 - q) D + s_noise sigma_s min(1, eta sqrt(1 - r)) z,

bounded even where alpha_t is tiny. ``s_noise = 1`` and eta in [0, 1] make the step DDIM's
eq. 12 with c = eta * sqrt(posterior variance) exactly (so eta = 1 is DDPM's ancestral step
on any chain, and eta = 0 is Euler in sigma~-space, i.e. deterministic DDIM). The last step,
onto the clean level, returns alpha D there (s~_down = s~_up = 0).

``noise: brownian`` replaces the fresh per-step draws by normalised increments of a
per-sample Brownian tree (:mod:`fundiff.brownian`). Each step is one fused step
(:mod:`fundiff.fused`): fresh Gaussian noise is drawn inside the kernel there.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.brownian import StepNoise
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

from ._sde import brownian_needs_gaussian, noise_field


def ancestral_fractions(t, s, eta: float) -> tuple[float, float]:
    """(s~_down / s~_s, s~_up / s~_s) for a step from level t to s (k-diffusion's
    get_ancestral_step, divided by s~_s and written with r = exp(lambda_t - lambda_s))."""
    one_minus_r = -math.expm1(t.logsnr - s.logsnr)
    up2 = min(eta * eta * one_minus_r, 1.0)
    return math.sqrt(1.0 - up2), math.sqrt(up2)


@attrs.frozen(kw_only=True)
class EulerAncestral(Sampler):
    """Euler ancestral: an Euler step of the PF-ODE in sigma~ down to s~_down, then fresh noise."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    eta: float = attrs.field(
        default=1.0, validator=at_least(0.0), metadata=doc("ancestral noise: 0 deterministic (Euler), 1 DDPM's posterior; above 1 capped as in k-diffusion")
    )
    s_noise: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("scale of the added noise (k-diffusion's s_noise)"))
    noise: str = noise_field()

    def check_recipe(self, components):
        return brownian_needs_gaussian(self, components)

    def sample(self, denoise, x, levels, noise=None, callback=None):
        steps = []  # host coefficients (c_x, c_d, c_z) per step
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            if s.is_clean:
                steps.append((0.0, s.alpha, 0.0))
                continue
            down, up = ancestral_fractions(t, s, self.eta)
            q = math.exp(0.5 * (t.logsnr - s.logsnr)) * down  # s~_down / s~_t
            steps.append(((s.sigma / t.sigma) * down, s.alpha * (1.0 - q), self.s_noise * s.sigma * up))
        draws = StepNoise(noise, self.noise, levels, sampler="euler-ancestral") if any(c[2] > 0 for c in steps) else None
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (c_x, c_d, c_z) in enumerate(steps):
            x0 = predict(x, levels[i])
            terms = [(c_d, x0)] if c_x == 0.0 else [(c_x, x), (c_d, x0)]
            if c_z > 0.0:
                terms.append((c_z, draws.operand(ex, i, levels[i], levels[i + 1])))
            x, x0 = ex.step(terms, ((1.0, x0),))
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("euler-ancestral", EulerAncestral)
