"""The variance-exploding chain (NCSN, Song and Ermon 2019; the VE-SDE of Song et al. 2021, eq. 9).

alpha = 1 and sigma = exp(-lambda / 2): x_t = x0 + sigma eps. The prior at the terminal
level is N(0, sigma_max^2 I), which neglects the data's own spread (sigma_max >> data std).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Chain, Level, hookimpl, noiselevel
from fundiff.components import GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class VarianceExploding(Chain):
    """Variance-exploding Gaussian chain: x_t = x0 + sigma eps."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    def check_recipe(self, components):
        schedule = components.get("schedule")
        if schedule is not None and schedule.reaches_zero_snr():
            return [
                "chain 've' cannot reach zero SNR: sigma = exp(-lambda / 2) is infinite at the schedule's "
                "terminal logSNR of -inf; use chain: vp with this schedule, or a schedule with a finite end"
            ]
        return []

    def alpha_sigma(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return noiselevel.ve_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        alpha, sigma = noiselevel.ve_alpha_sigma(float(logsnr))
        return Level(logsnr=float(logsnr), alpha=alpha, sigma=sigma if logsnr != math.inf else 0.0)

    def prior(self, level: Level, noise: torch.Tensor) -> torch.Tensor:
        return level.sigma * noise


@hookimpl
def fundiff_register_chains(register):
    register("ve", VarianceExploding)
