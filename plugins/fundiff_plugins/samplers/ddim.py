"""DDIM (Song, Meng and Ermon 2021, eq. 12), in terms of any Gaussian chain's (alpha, sigma).

From level t to the less noisy level s, with x0_hat = D(x_t) and eps_hat = (x_t - alpha_t
x0_hat) / sigma_t:

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,   c = eta * sqrt(var_post)

where var_post is the variance of q(x_s | x_t, x0) (eq. 16: eta = 1 is DDPM's ancestral
step with the posterior variance, eta = 0 the deterministic DDIM, a first-order solver of
the probability-flow ODE). Each step is one fused step (:mod:`fundiff.fused`): the new x and
the x0 estimate (guidance combined) from one pass over x, the denoiser's branches and the noise.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import doc, in_range


@attrs.frozen(kw_only=True)
class DDIM(Sampler):
    """Denoising diffusion implicit models; eta interpolates from deterministic (0) to DDPM (1)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    eta: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0), metadata=doc("stochasticity: 0 deterministic, 1 DDPM"))

    def sample(self, denoise, x, levels, noise=None, callback=None):
        if self.eta > 0 and noise is None:
            raise ValueError("ddim with eta > 0 needs a noise stream")
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            x0 = predict(x, t)
            if s.is_clean:
                x, x0 = ex.step(((s.alpha, x0),), ((1.0, x0),))
            else:
                # x_s = alpha_s x0 + d eps with eps = (x_t - alpha_t x0) / sigma_t, collected as
                # (d / sigma_t) x_t + (alpha_s - d alpha_t / sigma_t) x0 (+ c z)
                c = self.eta * math.sqrt(noiselevel.posterior(s, t)[2]) if self.eta > 0 else 0.0
                ratio = math.sqrt(max(s.sigma**2 - c * c, 0.0)) / t.sigma
                terms = [(ratio, x), (s.alpha - ratio * t.alpha, x0)]
                if c > 0:
                    terms.append((c, ex.noise(noise, i)))
                x, x0 = ex.step(terms, ((1.0, x0),))
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("ddim", DDIM)
