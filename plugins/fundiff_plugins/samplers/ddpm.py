"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over any grid of Gaussian levels.

Each step draws x_s from the posterior q(x_s | x_t, x0 = x0_hat): the mean is the exact
two-marginal posterior mean from the core math (VDM eq. 7), the variance the posterior's
("fixed small", beta tilde in the DDPM paper) unless the recipe has a ``variance`` section:
then the step's variance is that component's (``noise.variance(s, t)``: fixed-large beta,
improved DDPM's learned range, Analytic-DPM's estimate; a float or a per-element tensor).
Each step is one fused step (:mod:`fundiff.fused`); a per-element variance tensor adds its
noise term outside it (its coefficient is not a host float).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Sampler, fused, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class DDPM(Sampler):
    """Ancestral sampling from the Gaussian posterior given the predicted x0."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        if noise is None:
            raise ValueError("ddpm needs a noise stream")
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            x0 = predict(x, t)
            coef_x0, coef_xt, var = noiselevel.posterior(s, t)
            chosen = noise.variance(s, t) if hasattr(noise, "variance") else None
            var = var if chosen is None else chosen
            terms = [(coef_x0, x0), (coef_xt, x)]
            if not isinstance(var, torch.Tensor) and var > 0:
                terms.append((math.sqrt(var), ex.noise(noise, i)))
            x, x0 = ex.step(terms, ((1.0, x0),))
            if isinstance(var, torch.Tensor):
                x = x + var.to(x.dtype).sqrt() * noise.sample(i)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("ddpm", DDPM)
