"""The variance-preserving chain (DDPM; the VP-SDE of Song et al. 2021, eq. 11).

alpha^2 + sigma^2 = 1 at every level, so alpha^2 = sigmoid(lambda) and
sigma^2 = sigmoid(-lambda); the prior at the terminal level is N(0, I).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Chain, Level, hookimpl, noiselevel
from fundiff.components import GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class VariancePreserving(Chain):
    """Variance-preserving Gaussian chain: x_t = alpha x0 + sigma eps with alpha^2 + sigma^2 = 1."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noiselevel.vp_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        alpha, sigma = noiselevel.vp_alpha_sigma(float(logsnr))
        return Level(logsnr=float(logsnr), alpha=alpha, sigma=sigma if logsnr != math.inf else 0.0)

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        # the VP marginal at the terminal level is N(alpha x0, sigma^2) ~ N(0, I) for small alpha
        return noise


@hookimpl
def fundiff_register_chains(register):
    register("vp", VariancePreserving)
