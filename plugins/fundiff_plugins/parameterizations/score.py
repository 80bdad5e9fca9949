"""Score prediction (NCSN, Song and Ermon 2019; score SDEs, Song et al. 2021, eq. 5; survey
sec. 4.2.2): the network predicts grad_x log p_t(x_t).

For Gaussian marginals Tweedie's formula ties the score to the noise,
score = -eps / sigma, and to the data, x0 = (x_t + sigma^2 score) / alpha (both in
``fundiff.noiselevel``). The score-MSE is the eps-MSE divided by sigma^2, i.e.
SNR / sigma^2 = alpha^2 / sigma^4 times the x0-MSE.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Parameterization, hookimpl, noiselevel

from ._common import as_tensor, refuse_zero_terminal_snr


@attrs.frozen(kw_only=True)
class ScorePrediction(Parameterization):
    """The network predicts the score -eps / sigma; x0 = (x_t + sigma^2 score) / alpha."""

    def check_recipe(self, components):
        """x0 = (x_t + sigma^2 score) / alpha: refused with zero-terminal-SNR schedules."""
        return refuse_zero_terminal_snr("score-prediction", components)

    def target(self, x0, eps, x_t, alpha, sigma):
        return noiselevel.score_from_eps(eps, sigma)

    def to_x0(self, out, x_t, alpha, sigma):
        return noiselevel.x0_from_score(out, x_t, alpha, sigma)

    def from_x0(self, x0, x_t, alpha, sigma):
        return noiselevel.score_from_eps(noiselevel.eps_from_x0(x0, x_t, alpha, sigma), sigma)

    def log_x0_mse_factor(self, alpha, sigma):
        # ||score_hat - score||^2 = ||eps_hat - eps||^2 / sigma^2 = (alpha^2 / sigma^4) ||x0_hat - x0||^2
        alpha, sigma = as_tensor(alpha), as_tensor(sigma)
        return 2.0 * torch.log(alpha) - 4.0 * torch.log(sigma)


@hookimpl
def fundiff_register_parameterizations(register):
    register("score", ScorePrediction)
