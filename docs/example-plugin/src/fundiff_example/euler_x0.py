"""The ``euler-x0`` sampler: Euler's method for the probability-flow ODE, driven by the x0 estimate.

For any Gaussian chain x = alpha x0 + sigma eps, take the scaled state y = x / alpha and the
noise-to-signal ratio s = sigma / alpha as time (Karras et al. 2022, "Elucidating the design
space", sec. 4). With D the denoiser's x0 estimate, the probability-flow ODE is

    dy / ds = (y - D) / s.

One Euler step from the noisier level t to the cleaner level s_next (s_next < s_t) is

    y_next = y_t + (s_next - s_t) (y_t - D) / s_t,    x_next = alpha_next * y_next.

On the last step s_next = 0 (the clean level) and the step returns D exactly. For a frozen
D the ODE is linear in s, so this Euler step is exact for it and coincides with
deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0): the two differ only in how the
update is written, which the plugin's tests check. Everything is computed from the host
floats of the levels; one denoiser call per step.
"""

from __future__ import annotations

import attrs

import fundiff
from fundiff.components import GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class EulerX0(fundiff.Sampler):
    """Euler steps of the probability-flow ODE in the noise-to-signal ratio (deterministic, first order)."""

    # the step assumes x = alpha x0 + sigma eps: only a Gaussian chain provides that
    requires = frozenset({GAUSSIAN_MARGINALS})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]  # from the noisier level t to the cleaner level s
            if t.alpha == 0.0:
                raise ValueError("euler-x0 cannot start at alpha = 0 (logSNR = -inf); use a schedule with a finite end")
            x0 = denoise(x, t)
            y = x / t.alpha
            nsr_t, nsr_s = t.sigma / t.alpha, s.sigma / s.alpha  # host floats
            x = s.alpha * (y + (nsr_s - nsr_t) / nsr_t * (y - x0))
            if callback is not None:
                callback(i, x, x0)
        return x


@fundiff.hookimpl
def fundiff_register_samplers(register):
    register("euler-x0", EulerX0)
