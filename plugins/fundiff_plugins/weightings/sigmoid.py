"""Sigmoid weighting (Kingma and Gao 2023, "Understanding diffusion objectives as the ELBO with
simple data augmentation", sec. 5 and app. D): a monotonic weighting w(lambda) = sigmoid(b - lambda)
of the ELBO's integrand.

Their weighted loss is L_w = 1/2 E_{t ~ U} [ w(lambda_t) (-d lambda / dt) ||eps_hat - eps||^2 ]
(eq. 8), which integrates w(lambda) ||eps_hat - eps||^2 over lambda and so does not depend on
the schedule except through its end points: the schedule only decides where the Monte-Carlo
samples fall. As in ``likelihood``, t is uniform and the per-sample factor -lambda'(t) / 2 is
returned by ``draw``; in x0 units w(lambda) = SNR sigmoid(b - lambda) (log: lambda +
logsigmoid(b - lambda)).

w decreases in lambda (a monotonic weighting in their sense: an ELBO of noise-augmented data),
tends to 1 — the ``likelihood`` weighting — at high noise, and to e^b / SNR (a constant times the
x0-MSE) at low noise. The bias b = 2 is the value they report for their ImageNet models
(w(lambda) = sigmoid(-lambda + 2)); b -> +infinity recovers ``likelihood``.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from fundiff import Schedule, Weighting, hookimpl
from fundiff.config import doc

from ._common import uniform_t


@attrs.frozen(kw_only=True)
class SigmoidWeighting(Weighting):
    """t uniform; loss = sigmoid(b - lambda) (-lambda'(t) / 2) ||eps_hat - eps||^2."""

    bias: float = attrs.field(default=2.0, metadata=doc("b in w(lambda) = sigmoid(b - lambda): the logSNR where the weight halves"))

    def sample_logsnr(self, u: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return schedule.logsnr(uniform_t(u, schedule))

    def draw(self, u: torch.Tensor, schedule: Schedule):
        logsnr, rate = schedule.logsnr_and_rate(uniform_t(u, schedule))
        return logsnr, torch.log(-rate) - math.log(2.0)  # log(-lambda'(t) / 2)

    def log_x0_weight(self, logsnr, alpha, sigma):
        return logsnr + F.logsigmoid(self.bias - logsnr)


@hookimpl
def fundiff_register_weightings(register):
    register("sigmoid", SigmoidWeighting)
