"""Symmetric splitting CLD sampler (SSCS; Dockhorn, Vahdat and Kreis 2022, sec. 3 and its
appendix on SSCS), the reverse-time sampler of the ``cld`` chain.

The reverse SDE of critically-damped Langevin diffusion, in integrated time B running
backwards, splits into a linear part and a score part:

    A:  du = [[0, -1/M], [1, -Gamma/M]] u dB + (0, sqrt(2 Gamma)) dW    (Ornstein-Uhlenbeck)
    S:  dv = 2 Gamma (score_v(u, B) + v / M) dB                         (x unchanged)

A is solved exactly (a Gaussian step: ``cld.reverse_linear_step``) and S with an Euler step
(``cld.score_step``); a step from B_t to B_s < B_t is the symmetric (Strang) composition
A(h/2) S(h) A(h/2), h = B_t - B_s. The score is evaluated once per step, at the state after
the first half step and at the mid time B_t - h/2 (the paper's code evaluates it at B_t; the
midpoint keeps the splitting symmetric). The score part vanishes at equilibrium (score_v =
-v / M), so early steps are nearly exact whatever their size. The last step ends at B = 0
without evaluating the network there. Fresh noise: draws 2i and 2i + 1 at step i.
"""

from __future__ import annotations

import attrs

from fundiff import Sampler, hookimpl
from fundiff_plugins.chains.cld import CLD_STATE, CriticallyDampedLangevin


@attrs.frozen(kw_only=True)
class SymmetricSplittingCLD(Sampler):
    """SSCS: exact Ornstein-Uhlenbeck half steps around an Euler step of the score (CLD only)."""

    requires = frozenset({CLD_STATE})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        chain = levels[0].chain
        if not isinstance(chain, CriticallyDampedLangevin):
            raise TypeError(f"cld-sscs walks levels of the cld chain (level.chain), got levels of {type(chain).__name__}")
        if noise is None:
            raise ValueError("cld-sscs is stochastic: it needs a noise stream")
        u = x
        for i in range(len(levels) - 1):
            b_t, b_s = chain.time(levels[i].logsnr), chain.time(levels[i + 1].logsnr)
            half = 0.5 * (b_t - b_s)
            u = chain.reverse_linear_step(u, half, noise.sample(2 * i))
            mid = chain.level_at_time(b_t - half)
            denoised = denoise(u, mid)
            u = chain.score_step(u, chain.velocity_score(u, denoised, mid), 2.0 * half)
            u = chain.reverse_linear_step(u, half, noise.sample(2 * i + 1))
            if callback is not None:
                callback(i, u, denoised)
        return u


@hookimpl
def fundiff_register_samplers(register):
    register("cld-sscs", SymmetricSplittingCLD)
