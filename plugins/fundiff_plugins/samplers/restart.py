"""Restart sampling (Xu, Deng, Sun, Lipman, Lu and Tian 2023, "Restart Sampling for Improving
Generative Processes", sec. 4 and Algorithm 1), for any Gaussian chain.

The sampler follows the probability-flow ODE with EDM's Heun steps (Karras et al. 2022,
Algorithm 2 without churn) and, once, on reaching the bottom of a *restart interval*
[s~_min, s~_max] (in s~ = sigma / alpha, EDM's sigma), repeats ``repeats`` (K) times:

1. restart forward: add fresh noise so the state is back at s~_max,
   x~ <- x~ + S_noise sqrt(s~_max^2 - s~_min^2) z  (the forward transition of x~ = x / alpha,
   which is x0 + s~ eps for every Gaussian chain: eq. 6 of the paper);
2. restart backward: ``restart_steps`` Heun steps of the ODE from s~_max down to s~_min on
   a Karras grid (rho = 7).

The forward noise contracts the error accumulated above s~_min (the paper's Theorem 2), the
ODE steps keep the discretisation error small; that combination is the method.

``restart_min`` is snapped to the nearest noisy level of the main grid, so the restarts
end exactly where the main ODE resumes. Levels of the inner grid lie off the main grid;
their (alpha, sigma) come from the grid's chain (VP or VE exactly, see
``_pfode.level_maker``). ``steps`` is the number of main Heun steps; evaluations:
2 steps - 1 on the main grid plus repeats * 2 * restart_steps for the restarts. The K
forward jumps draw noise with draw indices 0 .. K - 1.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, greater_than

from ._exponential import zero_snr_start
from ._pfode import (
    karras_sigma_tildes,
    level_maker,
    logsnr_from_sigma_tilde,
    sigma_tilde,
)
from .heun import heun_step


@attrs.frozen(kw_only=True)
class Restart(Sampler):
    """Heun PF-ODE steps plus K restarts of the interval [restart_min, restart_max] with forward noise."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    evaluations_per_step = 2

    restart_min: float = attrs.field(default=0.1, validator=greater_than(0.0), metadata=doc("s~_min = sigma/alpha where restarts begin (snapped to the grid)"))
    restart_max: float = attrs.field(default=2.0, validator=greater_than(0.0), metadata=doc("s~_max = sigma/alpha the forward noise returns to"))
    repeats: int = attrs.field(default=2, validator=at_least(0), metadata=doc("K: how many times the interval is restarted"))
    restart_steps: int = attrs.field(default=10, validator=at_least(1), metadata=doc("Heun steps of each backward pass"))
    s_noise: float = attrs.field(default=1.0, validator=at_least(0.0), metadata=doc("scale of the forward noise"))

    def __attrs_post_init__(self) -> None:
        if not self.restart_max > self.restart_min:
            raise ValueError(f"restart_max: must be > restart_min ({self.restart_min}), got {self.restart_max}")

    def restart_index(self, levels) -> int:
        """The main-grid level where the restarts happen: the noisy one nearest restart_min in log s~."""
        noisy = [i for i, lv in enumerate(levels) if lv.sigma > 0 and lv.alpha > 0]
        return min(noisy, key=lambda i: abs(math.log(sigma_tilde(levels[i]) / self.restart_min)))

    def sample(self, denoise, x, levels, noise=None, callback=None):
        # from a zero-terminal-SNR level (alpha = 0, x / alpha infinite) take the exact first
        # step, x_s = alpha_s D + (sigma_s / sigma_t) x, then continue on the rest of the grid
        x, levels, _ = zero_snr_start(denoise, x, levels, callback)
        if len(levels) < 2:
            return x
        make = level_maker(levels)
        j = self.restart_index(levels)
        bottom = levels[j]
        s_bottom = sigma_tilde(bottom)
        inner = []
        if self.repeats > 0 and self.restart_max > s_bottom:
            if noise is None:
                raise ValueError("restart needs a noise stream for its forward jumps")
            sts = karras_sigma_tildes(self.restart_max, s_bottom, self.restart_steps)
            inner = [make(logsnr_from_sigma_tilde(v)) for v in sts[:-1]] + [bottom]
            top = inner[0]
            c_x = top.alpha / bottom.alpha
            c_z = top.alpha * self.s_noise * math.sqrt(max(sigma_tilde(top) ** 2 - s_bottom**2, 0.0))
        for i in range(len(levels) - 1):
            if i == j:
                for k in range(self.repeats if inner else 0):
                    x = c_x * x + c_z * noise.sample(k)
                    for a, b in zip(inner[:-1], inner[1:]):
                        x, _ = heun_step(denoise, x, a, b)
            x, x0 = heun_step(denoise, x, levels[i], levels[i + 1])
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("restart", Restart)
