"""The Momentum Sampler of soft diffusion (Daras et al. 2022, "Soft Diffusion: Score Matching
for General Corruptions", sec. 3.3 and its Algorithm 1), for x_t = alpha C_t x0 + sigma eps.

Daras et al. write the forward process as y_t = C_t x0 + s_t eta. Dividing fundiff's x_t by
alpha gives that form, u_t = x_t / alpha_t = C_t x0 + s_t eps with s_t = sigma_t / alpha_t =
exp(-lambda_t / 2). One step from level t to the less noisy level s, with x0_hat = D(x_t):

    eta_hat = u_t - C_t x0_hat                                  (the noise estimate)
    y       = u_t - (1 - s_s^2 / s_t^2) eta_hat + c z            (denoise: noise s_t -> s_s)
    u_s     = y + (C_s - C_t) x0_hat                             (the "momentum" correction:
                                                                  corruption C_t -> C_s)

and x_s = alpha_s u_s. The correction term is cold diffusion's improved sampling step
(Bansal et al. 2022, Algorithm 2: x_{s} = x_t - D(x0_hat, t) + D(x0_hat, s)); the denoising
term is a reverse step of the VE chain. ``variance`` picks the fresh-noise scale c:

- ``posterior`` (default): c^2 = s_s^2 (1 - s_s^2 / s_t^2), the variance of u_s given u_t and
  x0 when the noise grows by independent increments. The step is then exact whatever its
  size, and with C the identity it is DDPM's ancestral step (and DDIM with eta = 1).
- ``sde``: c^2 = s_t^2 - s_s^2, Daras et al.'s Euler-Maruyama step of the reverse SDE. It
  adds more noise than the posterior (s_s^2 / s_t^2 (s_t^2 - s_s^2) more), which vanishes
  only for small steps: use it with many steps and a VE chain, as in the paper.

In x-space, with r = alpha_s s_s^2 / (alpha_t s_t^2) = alpha_t sigma_s^2 / (alpha_s sigma_t^2):

    x_s = alpha_s C_s x0_hat + r (x_t - alpha_t C_t x0_hat) + alpha_s c z

which keeps every coefficient bounded even where alpha_t is tiny. All coefficients are host
floats. The last step, onto the clean level (sigma = 0), returns alpha C x0_hat there, which
is x0_hat for operators that are the identity at the clean level. A noise source without
``corrupt`` (a plain stream) stands for additive Gaussian noise: C is the identity.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, hookimpl
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_MARGINALS, GAUSSIAN_NOISE
from fundiff.config import doc, one_of


@attrs.frozen(kw_only=True)
class SoftMomentum(Sampler):
    """Soft diffusion's Momentum Sampler: denoise, then move the corruption from C_t to C_s."""

    requires = frozenset({GAUSSIAN_MARGINALS, CORRUPTION_OPERATOR, GAUSSIAN_NOISE})
    variance: str = attrs.field(
        default="posterior", validator=one_of("posterior", "sde"), metadata=doc("fresh-noise variance: posterior (exact step) or sde (Daras et al.'s Euler-Maruyama)")
    )

    def sample(self, denoise, x, levels, noise=None, callback=None):
        if noise is None:
            raise ValueError("soft-momentum needs a noise source (noise.sample, and noise.corrupt for an operator)")
        # a plain stream (no operator) is additive Gaussian noise: C is the identity
        corrupt = getattr(noise, "corrupt", None) or (lambda x0, level: x0)
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            x0 = denoise(x, t)
            if s.is_clean:
                x = s.alpha * corrupt(x0, s)
            else:
                # s_s^2 / s_t^2 = exp(lambda_t - lambda_s) <= 1 on a decreasing-noise grid
                ratio = math.exp(t.logsnr - s.logsnr)
                r = t.alpha * s.sigma**2 / (s.alpha * t.sigma**2)  # = alpha_s s_s^2 / (alpha_t s_t^2); 0 where alpha_t = 0
                if self.variance == "posterior":
                    c = s.sigma * math.sqrt(max(1.0 - ratio, 0.0))  # alpha_s s_s sqrt(1 - ratio)
                else:
                    if t.alpha == 0.0:
                        raise ValueError("soft-momentum with variance 'sde' needs alpha > 0 on every level (s_t = sigma / alpha); use variance 'posterior'")
                    c = s.alpha * (t.sigma / t.alpha) * math.sqrt(max(1.0 - ratio, 0.0))  # alpha_s sqrt(s_t^2 - s_s^2)
                x = s.alpha * corrupt(x0, s) + r * (x - t.alpha * corrupt(x0, t))
                if c > 0:
                    x = x + c * noise.sample(i)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("soft-momentum", SoftMomentum)
