"""Euler's method on the probability-flow ODE in (x~, s~) = (x / alpha, sigma / alpha)
(Karras et al. 2022, EDM, Algorithm 1 with s(t) = 1; k-diffusion's ``sample_euler``).

The PF-ODE of any Gaussian chain reads dx~/ds~ = (x~ - D) / s~ = eps_hat (EDM eq. 4), so one
Euler step from level t to the less noisy level s is

    x~_s = x~_t + (s~_s - s~_t) eps_hat,     eps_hat = (x_t - alpha_t D(x_t)) / sigma_t.

Back in x = alpha x~ this is x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - s~_s / s~_t) D,
which is DDIM with eta = 0 (Song et al. 2021, eq. 13: DDIM is Euler on this ODE), so the
two samplers agree to rounding. The step onto the clean level (s~ = 0) returns alpha_s D.
The two coefficients of every step are host floats computed before the loop. ``steps`` is
the number of steps and of denoiser evaluations. Each step is one fused step
(:mod:`fundiff.fused`).
"""

from __future__ import annotations

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS

from ._pfode import sigma_tilde


@attrs.frozen(kw_only=True)
class Euler(Sampler):
    """First-order Euler steps of the probability-flow ODE in sigma / alpha (deterministic)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        coefs = []
        for t, s in zip(levels[:-1], levels[1:]):
            ratio = sigma_tilde(s) / sigma_tilde(t)
            coefs.append((s.sigma / t.sigma, s.alpha * (1.0 - ratio)))
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i, (c_x, c_d) in enumerate(coefs):
            x0 = predict(x, levels[i])
            x, x0 = ex.step(((c_d, x0),) if c_x == 0.0 else ((c_x, x), (c_d, x0)), ((1.0, x0),))
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("euler", Euler)
