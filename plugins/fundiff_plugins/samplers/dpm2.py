"""DPM-2: a midpoint method in log sigma on the probability-flow ODE (k-diffusion's
``sample_dpm_2``, after the second-order DPM-Solver of Lu et al. 2022, whose intermediate
point sits at the midpoint of lambda = -2 log(sigma / alpha)).

In (x~, s~) = (x / alpha, sigma / alpha) the PF-ODE is dx~/ds~ = eps_hat (Karras et al. 2022,
eq. 4). One step from level t to the less noisy level s:

    s~_m = sqrt(s~_t s~_s)                           (lambda_m = (lambda_t + lambda_s) / 2)
    x~_m = x~_t + (s~_m - s~_t) eps_hat(x_t, s~_t)   (Euler to the midpoint)
    x~_s = x~_t + (s~_s - s~_t) eps_hat(x_m, s~_m)   (the whole step with the midpoint slope)

Second order in the step size. The step onto the clean level (s~ = 0, where the midpoint
would be 0 too) is the plain Euler step, returning alpha_s D. The midpoint level lies off the
grid; its (alpha, sigma) come from the grid's chain (VP or VE exactly, see
``_pfode.level_maker``). ``steps`` is the number of steps; each evaluates the denoiser twice
except the last onto the clean level (2 steps - 1 in all). Each stage is one fused step
(:mod:`fundiff.fused`), with eps_hat = (x - alpha D) / sigma folded into its coefficients.
"""

from __future__ import annotations

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS

from ._exponential import zero_snr_start
from ._pfode import level_maker, sigma_tilde


@attrs.frozen(kw_only=True)
class DPM2(Sampler):
    """Second-order midpoint steps of the PF-ODE, midpoint in log sigma (deterministic)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    evaluations_per_step = 2

    def sample(self, denoise, x, levels, noise=None, callback=None):
        # from a zero-terminal-SNR level (alpha = 0, x / alpha infinite) take the exact first
        # step, x_s = alpha_s D + (sigma_s / sigma_t) x, then continue on the rest of the grid
        x, levels, _ = zero_snr_start(denoise, x, levels, callback)
        if len(levels) < 2:
            return x
        make = level_maker(levels)
        plan = []
        for t, s in zip(levels[:-1], levels[1:]):
            if s.sigma == 0.0:
                plan.append(None)
                continue
            m = make(0.5 * (t.logsnr + s.logsnr))
            st, sm, ss = sigma_tilde(t), sigma_tilde(m), sigma_tilde(s)
            # x_m = (a_m / a_t) x + a_m (s~_m - s~_t) eps_t;  x_s = (a_s / a_t) x + a_s (s~_s - s~_t) eps_m
            plan.append((m, 1.0 / t.sigma, m.alpha / t.alpha, m.alpha * (sm - st), 1.0 / m.sigma, s.alpha / t.alpha, s.alpha * (ss - st)))
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i in range(len(levels) - 1):
            t = levels[i]
            x0 = predict(x, t)
            if plan[i] is None:
                x, x0 = ex.step(((levels[i + 1].alpha, x0),), ((1.0, x0),))
            else:
                m, inv_t, cm_x, cm_e, inv_m, cs_x, cs_e = plan[i]
                # eps_t = (x - alpha_t D) / sigma_t and eps_m likewise, folded into the coefficients
                x_m, x0 = ex.step(((cm_x + cm_e * inv_t, x), (-cm_e * inv_t * t.alpha, x0)), ((1.0, x0),))
                x0_m = predict(x_m, m)
                (x,) = ex.step(((cs_x, x), (cs_e * inv_m, x_m), (-cs_e * inv_m * m.alpha, x0_m)))
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpm2", DPM2)
