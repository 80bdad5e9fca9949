"""EDM's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2), for any Gaussian chain.

In (x~, s~) = (x / alpha, sigma / alpha) the probability-flow ODE is dx~/ds~ = eps_hat (EDM
eq. 4 with s(t) = 1). Each step from level t to the less noisy level s:

1. churn (optional): where S_tmin <= s~_t <= S_tmax, raise the noise to
   s~_hat = (1 + gamma) s~_t with gamma = min(S_churn / N, sqrt(2) - 1) (N = number of
   steps) by adding fresh noise, x~_hat = x~_t + S_noise sqrt(s~_hat^2 - s~_t^2) z;
2. Euler:  x~_e = x~_hat + (s~_s - s~_hat) eps_hat(x_hat, s~_hat);
3. Heun's correction (the trapezoidal rule, skipped on the step onto the clean level,
   which is the plain Euler step and returns alpha_s D):
   x~_s = x~_hat + (s~_s - s~_hat) (eps_hat(x_hat) + eps_hat(x_e)) / 2.

With S_churn = 0 (the default) the sampler is deterministic and second order in the step
size. S_tmin and S_tmax are compared with s~ = sigma / alpha, EDM's sigma. The churned
level lies off the grid; its (alpha, sigma) come from the grid's chain (VP or VE exactly,
see ``_pfode.level_maker``). ``steps`` is the number of steps; each makes two denoiser
evaluations except the last onto the clean level (2 steps - 1 in all). The churn, the Euler
step and the correction are fused steps (:mod:`fundiff.fused`).
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

from ._exponential import zero_snr_start
from ._pfode import level_maker, logsnr_from_sigma_tilde, sigma_tilde


def heun_step(denoise, x, t, s, x0=None, ex=None):
    """One Heun step of the PF-ODE from level t to level s in x space (Euler onto s~ = 0).

    eps_hat = (x - alpha D) / sigma is dx~/ds~; the update x_s = alpha_s x~_s is written with
    host-float coefficients, as two fused steps on ``ex`` (default: the executor for x):

        x_e = (alpha_s / alpha_t) x + alpha_s h eps_1,        eps_1 = (x - alpha_t D_1) / sigma_t,
        x_s = x_e + (alpha_s h / 2) (eps_2 - eps_1),          eps_2 = (x_e - alpha_s D_2) / sigma_s,

    each collected into one linear combination of x, D_1, x_e and D_2. Returns (x_s, D at t).
    ``x0`` reuses a known D(x, t).
    """
    ex = ex if ex is not None else fused.executor(x)
    if x0 is None:
        x0 = ex.predict(denoise, x, t)
    if s.sigma == 0.0:
        return ex.step(((s.alpha, x0),), ((1.0, x0),))  # the Euler step onto s~ = 0 lands on alpha_s D exactly
    h = sigma_tilde(s) - sigma_tilde(t)
    k = s.alpha * h  # the step in x~ times alpha_s
    x_e, x0 = ex.step(((s.alpha / t.alpha + k / t.sigma, x), (-k * t.alpha / t.sigma, x0)), ((1.0, x0),))
    d2 = ex.predict(denoise, x_e, s)
    half = 0.5 * k
    x_s = ex.combine(((1.0 + half / s.sigma, x_e), (-half * s.alpha / s.sigma, d2), (-half / t.sigma, x), (half * t.alpha / t.sigma, x0)))
    return x_s, x0


@attrs.frozen(kw_only=True)
class Heun(Sampler):
    """EDM's Heun sampler: second-order PF-ODE steps with optional stochastic churn."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    evaluations_per_step = 2

    s_churn: float = attrs.field(default=0.0, validator=at_least(0.0), metadata=doc("total churn S_churn (0: deterministic)"))
    s_tmin: float = attrs.field(default=0.0, validator=at_least(0.0), metadata=doc("churn only where sigma/alpha >= S_tmin"))
    s_tmax: float = attrs.field(default=math.inf, validator=at_least(0.0), metadata=doc("churn only where sigma/alpha <= S_tmax"))
    s_noise: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("scale of the churn noise S_noise"))

    def sample(self, denoise, x, levels, noise=None, callback=None):
        # from a zero-terminal-SNR level (alpha = 0, x / alpha infinite) take the exact first
        # step, x_s = alpha_s D + (sigma_s / sigma_t) x, then continue on the rest of the grid
        ex = fused.executor(x)
        x, levels, _ = zero_snr_start(denoise, x, levels, callback, ex)
        if len(levels) < 2:
            return x
        n = len(levels) - 1
        make = level_maker(levels)
        gamma_max = min(self.s_churn / n, math.sqrt(2.0) - 1.0) if n else 0.0
        plan = []  # per step: None, or (churned level, coefficient of x, coefficient of z)
        for t in levels[:-1]:
            st = sigma_tilde(t)
            if gamma_max > 0 and self.s_tmin <= st <= self.s_tmax and math.isfinite(st):
                hat = make(logsnr_from_sigma_tilde(st * (1.0 + gamma_max)))
                st_hat = sigma_tilde(hat)
                plan.append((hat, hat.alpha / t.alpha, hat.alpha * self.s_noise * math.sqrt(max(st_hat**2 - st**2, 0.0))))
            else:
                plan.append(None)
        if noise is None and any(p is not None and p[2] > 0 for p in plan):
            raise ValueError("heun with s_churn > 0 needs a noise stream")
        for i in range(n):
            t, s = levels[i], levels[i + 1]
            if plan[i] is not None:
                t, c_x, c_z = plan[i]
                x = ex.combine(((c_x, x), (c_z, ex.noise(noise, i))) if c_z > 0 else ((c_x, x),))
            x, x0 = heun_step(denoise, x, t, s, ex=ex)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("heun", Heun)
