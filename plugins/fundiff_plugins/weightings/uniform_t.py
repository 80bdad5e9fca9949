"""Uniform-t training density (DDPM, Ho et al. 2020, Algorithm 1: t ~ U{1..T}) with a chosen
unweighted loss: ``loss: eps`` (default) is DDPM's simple loss and the same objective as
``eps-mse``; ``x0`` and ``v`` train the unweighted x0- or v-MSE (w = 1, SNR + 1 in x0 units).

One of the density weightings (``uniform-t``, ``log-normal``, ``logit-normal``,
``importance``): each fixes where training samples the noise level and leaves the loss
unweighted in the unit ``loss`` names, so the density *is* the weighting over logSNR.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import doc, one_of

from ._common import LOSS_UNITS, log_unit_weight, uniform_t


@attrs.frozen(kw_only=True)
class UniformT(Weighting):
    """t uniform on [t_min, 1]; the unweighted ``loss`` MSE."""

    loss: str = attrs.field(default="eps", validator=one_of(*LOSS_UNITS), metadata=doc("which MSE is left unweighted: eps, x0 or v"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def log_x0_weight(self, logsnr, alpha, sigma):
        return log_unit_weight(self.loss, logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("uniform-t", UniformT)
