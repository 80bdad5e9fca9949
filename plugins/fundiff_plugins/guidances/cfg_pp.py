"""CFG++ (Chung et al. 2024, "CFG++: manifold-constrained classifier free guidance for
diffusion models", Algorithm 1), as an x0 estimate for DDIM-style samplers.

CFG++ takes one DDIM step (eta = 0) from level t to the next level s with the clean
estimate of the *guided* noise but re-noises with the *unconditional* noise:

    eps_l  = eps_u + l (eps_c - eps_u),  l in [0, 1]
    x0_l   = (x_t - sigma_t eps_l) / alpha_t          (= x0_u + l (x0_c - x0_u))
    x_s    = alpha_s x0_l + sigma_s eps_u

Our samplers receive one x0 estimate and form eps_hat = (x_t - alpha_t x0_hat) / sigma_t
themselves, so a DDIM step gives x_s = alpha_s x0_hat + sigma_s eps_hat. Solving
alpha_s x0_hat + sigma_s eps_hat = alpha_s x0_l + sigma_s eps_u for x0_hat, with
eps_u = (x_t - alpha_t x0_u) / sigma_t:

    (1 - rho) x0_hat = x0_l - rho x0_u,   rho = (sigma_s / alpha_s) / (sigma_t / alpha_t)
                                              = exp((lambda_t - lambda_s) / 2)
    x0_hat = x0_u + l / (1 - rho) (x0_c - x0_u)

So CFG++ under DDIM *is* CFG with the step-dependent scale w = l / (1 - rho) (rho < 1
because s is less noisy than t; rho = 0 at the last step onto clean data, where w = l).
This guidance returns that x0_hat, which makes a deterministic DDIM step (and the samplers
equal to it: Euler in sigma space, first-order DPM-Solver) reproduce the CFG++ update
exactly. It needs the next level, so it reads the run's grid from ``start(levels)``; an
evaluation between grid points (multi-stage or adaptive solvers) uses the scale of the grid
step it falls in, so the scale is piecewise constant over the run and bounded. With
higher-order, multistep, adaptive or stochastic samplers the result is CFG with that scale
schedule, not the paper's update (their re-noising term is not sigma_s eps_hat); this is the
documented deviation.
"""

from __future__ import annotations

import bisect
from typing import Optional, Sequence

import attrs
import torch

from fundiff import Guidance, Level, hookimpl
from fundiff.config import doc, in_range

from ._common import conditional_and_unconditional, conditional_denoiser_problems, drop_conditions


class _CFGPPRun:
    """One sampling run: the grid's logSNRs, to find each evaluation's next level."""

    def __init__(self, scale: float, levels: Optional[Sequence[Level]]):
        self.scale = scale
        self.levels = sorted(levels, key=lambda level: level.logsnr) if levels is not None else None
        self.logsnrs = [level.logsnr for level in self.levels] if self.levels is not None else None

    def effective_scale(self, level: Level) -> float:
        """w = l / (1 - rho) for the step from ``level`` to the next grid level."""
        if self.logsnrs is None:
            raise ValueError(
                "guidance 'cfg-pp' needs the sampling grid to find each step's next level: build the "
                "denoiser with fundiff.make_denoise(..., levels=levels) (Pipeline.sample does)"
            )
        # the grid step [t, s) holding this evaluation: at a grid level t itself, its own step
        index = max(bisect.bisect_right(self.logsnrs, level.logsnr), 1)
        if index == len(self.logsnrs):
            return self.scale  # at or beyond the last level: nothing is re-noised, rho = 0
        t, s = self.levels[index - 1], self.levels[index]
        if not (t.sigma > 0.0 and t.alpha > 0.0):
            return self.scale  # alpha_t = 0: eps_u = x / sigma_t, rho = 0
        rho = (s.sigma * t.alpha) / (s.alpha * t.sigma)
        return self.scale / (1.0 - rho)

    def denoise(self, predict, x, level, cond):
        x0_c, x0_u = conditional_and_unconditional(predict, x, level, cond)
        return torch.lerp(x0_u, x0_c, self.effective_scale(level))


@attrs.frozen(kw_only=True)
class CFGPlusPlus(Guidance):
    """CFG++: guided clean estimate, unconditional re-noising (exact for DDIM, eta = 0)."""

    scale: float = attrs.field(default=0.6, validator=in_range(0.0, 1.0), metadata=doc("lambda in [0, 1]: 0 = unconditional"))
    drop_prob: float = attrs.field(
        default=0.1, validator=in_range(0.0, 1.0), metadata=doc("training: probability of replacing the label by the null token -1")
    )

    def check_recipe(self, components):
        return conditional_denoiser_problems("cfg-pp", components)

    def training_condition(self, cond, u):
        return drop_conditions(cond, u, self.drop_prob)

    def start(self, levels):
        return _CFGPPRun(self.scale, levels)

    def denoise(self, predict, x, level, cond):
        return self.start(None).denoise(predict, x, level, cond)


@hookimpl
def fundiff_register_guidances(register):
    register("cfg-pp", CFGPlusPlus)
