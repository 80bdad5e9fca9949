"""Chains that wrap an inner Gaussian chain (not a design: no entry point, nothing
registered). ``truncated`` and ``latent`` take their noise-level math from their ``inner``
chain (:class:`InnerChainMath`) and keep their fitted state (a generator, an autoencoder) in
a module (:class:`WrappingChainModule`) that forwards the math to the recipe component.
"""

from __future__ import annotations

import torch
from torch import nn

from fundiff import Chain, DataSpec, Level
from fundiff.components import GAUSSIAN_MARGINALS


class InnerChainMath(Chain):
    """A chain whose marginals, prior and dynamics are its ``inner`` chain's (an attrs field
    of the subclass); the subclass adds what it changes (a cut, an encoding)."""

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        return self.inner.level(logsnr)

    def perturb(self, x0, noise, alpha, sigma):
        return self.inner.perturb(x0, noise, alpha, sigma)

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        return self.inner.prior(level, noise)

    def dlog_alpha_dlogsnr(self, logsnr: float) -> float:
        return self.inner.dlog_alpha_dlogsnr(logsnr)


class WrappingChainModule(nn.Module, Chain):
    """``nn.Module`` + :class:`fundiff.Chain` holding ``config`` (the recipe's chain component,
    which has an ``inner`` chain) and a ``fitted`` flag buffer; the math is ``config``'s."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    def __init__(self, config: Chain, spec: DataSpec):
        nn.Module.__init__(self)
        self.config = config
        self.spec = spec
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def alpha_sigma(self, logsnr):
        return self.config.alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        return self.config.inner.level(logsnr)

    def perturb(self, x0, noise, alpha, sigma):
        return self.config.perturb(x0, noise, alpha, sigma)

    def prior(self, level, noise):
        return self.config.prior(level, noise)

    def dlog_alpha_dlogsnr(self, logsnr: float) -> float:
        return self.config.dlog_alpha_dlogsnr(logsnr)

    def check_recipe(self, components) -> list[str]:
        return self.config.check_recipe(components)
