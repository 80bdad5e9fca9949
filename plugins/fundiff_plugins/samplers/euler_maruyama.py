"""The reverse-time SDE (Song et al. 2021, "Score-based generative modeling through SDEs",
eq. 6) solved with Euler-Maruyama, for any Gaussian chain.

Forward, every chain x_t = alpha x0 + sigma eps is dx = f x dt + g dW with f dt = d log alpha
and g^2 dt = d sigma^2 - 2 sigma^2 d log alpha = -sigma^2 d lambda. In the scaled state
x~ = x / alpha this is the variance-exploding SDE dx~ = dW_tau in the time tau = s~^2 =
exp(-lambda) (s~ = sigma / alpha), whose reverse (eq. 6) is

    dx~ = -score~(x~) dtau + dW~_tau,     score~ = -(x~ - D) / s~^2   (D the x0 estimate).

Euler-Maruyama in tau, from level t back to the less noisy level s (tau_t - tau_s =
s~_t^2 rho with rho = 1 - exp(lambda_t - lambda_s) in (0, 1]):

    x~_s = x~_t - rho (x~_t - D) + s~_t sqrt(rho) z,
    x_s  = (alpha_t sigma_s^2 / (alpha_s sigma_t^2)) x_t + alpha_s rho D + alpha_s s~_t sqrt(rho) z.

This is Song et al.'s reverse-diffusion predictor of the VE-SDE (their eq. 47) applied to x~;
its mean is exactly DDPM's posterior mean, its variance alpha_s^2 (s~_t^2 - s~_s^2) the
"upper" choice (DDPM's sigma_t^2 = beta_t in x~ units) instead of the posterior's. Euler-
Maruyama in another clock (t of a VP-SDE, or lambda) differs at O(step^2) per step; this one
is stable for any step (0 < rho <= 1) and needs only the levels. Strong order 1/2, weak
order 1: use many steps. The last step, onto the clean level, returns alpha D there
(Song et al.'s final noise-free denoising step; an Euler-Maruyama step would add noise of
variance s~_t^2 to the data). The first level needs alpha > 0 (finite tau): recipes whose
schedule reaches zero terminal SNR are refused.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, hookimpl
from fundiff.brownian import StepNoise
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS

from ._sde import brownian_needs_gaussian, noise_field, refuse_zero_terminal_snr


def euler_maruyama_coefficients(t, s) -> tuple[float, float, float]:
    """(c_x, c_d, c_z) with x_s = c_x x_t + c_d D + c_z z for one step from t to s."""
    if s.is_clean:
        return 0.0, s.alpha, 0.0
    if not t.alpha > 0.0:
        raise ValueError("euler-maruyama needs alpha > 0 on every level but the last (finite sigma / alpha)")
    rho = -math.expm1(t.logsnr - s.logsnr)
    c_x = (t.alpha / s.alpha) * (s.sigma / t.sigma) ** 2
    return c_x, s.alpha * rho, s.alpha * (t.sigma / t.alpha) * math.sqrt(rho)


@attrs.frozen(kw_only=True)
class EulerMaruyama(Sampler):
    """Euler-Maruyama on the reverse SDE in tau = (sigma / alpha)^2; ``steps`` SDE steps, one evaluation each."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    noise: str = noise_field()

    def check_recipe(self, components):
        return brownian_needs_gaussian(self, components) + refuse_zero_terminal_snr(
            "euler-maruyama", components, "its first step's variance (sigma / alpha)^2 is infinite where alpha = 0"
        )

    def sample(self, denoise, x, levels, noise=None, callback=None):
        coefs = [euler_maruyama_coefficients(levels[i], levels[i + 1]) for i in range(len(levels) - 1)]
        draws = StepNoise(noise, self.noise, levels, sampler="euler-maruyama") if any(c[2] > 0 for c in coefs) else None
        for i, (c_x, c_d, c_z) in enumerate(coefs):
            x0 = denoise(x, levels[i])
            x = c_d * x0 if c_x == 0.0 else c_x * x + c_d * x0
            if c_z > 0.0:
                x = x + c_z * draws(i, levels[i], levels[i + 1])
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("euler-maruyama", EulerMaruyama)
