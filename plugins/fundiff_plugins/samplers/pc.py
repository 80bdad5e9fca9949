"""Predictor-corrector sampling (Song et al. 2021, "Score-based generative modeling through
SDEs", sec. 4.2 and Algorithms 1, 2 (PC sampling) and 4, 5 (Langevin corrector)), for any
Gaussian chain.

At each level t of the grid, ``corrector_steps`` Langevin steps move x towards p_t, then a
predictor step of the reverse SDE goes to the next level s:

* corrector (Langevin dynamics at a target signal-to-noise ratio r = ``snr``): with the
  score g = -(x - alpha_t D) / sigma_t^2 and fresh noise z,

      x <- x + eps g + sqrt(2 eps) z,      eps = 2 (r ||z|| / ||g||)^2,

  the step for which ||eps g|| / ||sqrt(2 eps) z|| = r (Algorithm 5). ``step_rule`` decides
  which norms: ``expected`` (default) takes their mean squares, ||z||^2 = d and ||g||^2 =
  d / sigma_t^2 (the score's mean square where the noise estimate is the noise itself, true
  both near the data and at the prior), so eps = 2 r^2 sigma_t^2 is a host float, the same
  for every sample; ``per-sample`` takes each sample's own norms (Song et al.'s code takes
  batch means instead, which would make sample i depend on its batch). A step size that
  depends on the state breaks Langevin's invariance of p_t: in high dimensions the norms
  concentrate and the two rules agree, but in low dimensions ||g|| is often near 0 and
  ``per-sample`` over-disperses badly (with 3-D Gaussian data, std 0.55 instead of 0.3).
  Song et al.'s VP variant multiplies eps by alpha_i = 1 - beta_i of their 1000-level
  discretisation, ~1 there; it is left out, because on a coarse grid that per-step factor
  is far from 1. Both rules are invariant to rescaling x by alpha.
* predictor ``reverse-diffusion`` (Song et al.'s eq. 46-47): reverse the discretised forward
  transition q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2) between the two levels
  (``fundiff.noiselevel.transition``):  x_s = (2 - alpha_{t|s}) x_t + sigma_{t|s}^2 g +
  sigma_{t|s} z. On a VE chain it is the same step as Euler-Maruyama below.
* predictor ``euler-maruyama``: the ``euler-maruyama`` sampler's step (Euler-Maruyama in
  tau = (sigma / alpha)^2).

The last step onto the clean level returns alpha D there (Song et al.'s final denoising
step) and no corrector runs at the clean level. Schedules with zero terminal SNR are refused
(both predictors approximate small steps, and the first step from alpha = 0 is not one). Evaluations per step: 1 + corrector_steps
(``evaluations_per_step``); ``steps`` is the number of predictor steps. Fresh noise draw
indices: (1 + corrector_steps) i + j for corrector step j at level i, (1 + corrector_steps) i
+ corrector_steps for the predictor, so ``corrector_steps: 0`` with the Euler-Maruyama
predictor is the ``euler-maruyama`` sampler exactly.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Sampler, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, greater_than, one_of

from ._sde import refuse_zero_terminal_snr
from .euler_maruyama import euler_maruyama_coefficients


def reverse_diffusion_coefficients(t, s) -> tuple[float, float, float]:
    """(c_x, c_d, c_z) of Song et al.'s reverse-diffusion step from t to s, with the score
    written through D: (2 - a) x + v (-(x - alpha_t D) / sigma_t^2) + sqrt(v) z."""
    if s.is_clean:
        return 0.0, s.alpha, 0.0
    a, v = noiselevel.transition(s, t)
    return 2.0 - a - v / t.sigma**2, v * t.alpha / t.sigma**2, math.sqrt(v)


class _EvaluationsPerStep:
    """1 + corrector_steps on an instance; on the class (which tools such as the benchmark
    read), the value for the default corrector_steps."""

    def __get__(self, obj, cls=None) -> int:
        if obj is None:
            return 1 + attrs.fields(cls).corrector_steps.default
        return 1 + obj.corrector_steps


@attrs.frozen(kw_only=True)
class PredictorCorrector(Sampler):
    """Song et al.'s PC sampler: Langevin corrector steps at a target SNR, then a reverse-SDE predictor step."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    predictor: str = attrs.field(
        default="reverse-diffusion", validator=one_of("reverse-diffusion", "euler-maruyama"), metadata=doc("predictor: reverse-diffusion or euler-maruyama")
    )
    corrector_steps: int = attrs.field(default=1, validator=at_least(0), metadata=doc("Langevin corrector steps per level (M in Algorithm 1)"))
    snr: float = attrs.field(default=0.16, validator=greater_than(0.0), metadata=doc("target signal-to-noise ratio r of a Langevin step"))
    step_rule: str = attrs.field(
        default="expected", validator=one_of("expected", "per-sample"), metadata=doc("Langevin step from the norms' mean squares (expected) or each sample's norms (per-sample)")
    )

    def check_recipe(self, components):
        return refuse_zero_terminal_snr(
            "pc", components, "its predictors are small-step approximations that break down where alpha_{t|s} = 0 (x_t carries no signal)"
        )

    #: 1 + corrector_steps (read on the class: the default's 2)
    evaluations_per_step = _EvaluationsPerStep()

    def sample(self, denoise, x, levels, noise=None, callback=None):
        if noise is None:
            raise ValueError("pc needs a noise stream")
        step = reverse_diffusion_coefficients if self.predictor == "reverse-diffusion" else euler_maruyama_coefficients
        coefs = [step(levels[i], levels[i + 1]) for i in range(len(levels) - 1)]
        m = self.corrector_steps
        two_r2 = 2.0 * self.snr * self.snr
        for i, (c_x, c_d, c_z) in enumerate(coefs):
            t = levels[i]
            base = (m + 1) * i
            if not t.is_clean:
                for j in range(m):
                    x0 = denoise(x, t)
                    z = noise.sample(base + j)
                    if self.step_rule == "expected":
                        # eps = 2 r^2 sigma_t^2: x + eps g = (1 - 2 r^2) x + 2 r^2 alpha_t D
                        x = (1.0 - two_r2) * x + (two_r2 * t.alpha) * x0 + (2.0 * self.snr * t.sigma) * z
                        continue
                    g = (t.alpha / t.sigma**2) * x0 - (1.0 / t.sigma**2) * x
                    dims = tuple(range(1, x.ndim))
                    g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
                    z_norm = torch.linalg.vector_norm(z, dim=dims, keepdim=True)
                    ratio = z_norm / g_norm.clamp_min(torch.finfo(g.dtype).tiny)
                    eps = two_r2 * ratio * ratio
                    x = x + eps * g + (2.0 * eps).sqrt() * z
            x0 = denoise(x, t)
            x = c_d * x0 if c_x == 0.0 else c_x * x + c_d * x0
            if c_z > 0.0:
                x = x + c_z * noise.sample(base + m)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("pc", PredictorCorrector)
