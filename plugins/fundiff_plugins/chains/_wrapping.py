"""A fitted chain module around a chain that wraps an inner Gaussian chain (not a design: no
entry point, nothing registered). ``truncated`` and ``latent`` keep their fitted state (a
generator, an autoencoder) in such a module; the noise-level math stays the recipe
component's, so the module forwards it.
"""

from __future__ import annotations

import torch
from torch import nn

from fundiff import Chain, DataSpec, Level
from fundiff.components import GAUSSIAN_MARGINALS


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
