"""Noise prediction (DDPM, Ho et al. 2020, eq. 11; survey sec. 4.2.3)."""

from __future__ import annotations

import attrs

from fundiff import Parameterization, hookimpl, noiselevel

from ._common import refuse_zero_terminal_snr


@attrs.frozen(kw_only=True)
class EpsPrediction(Parameterization):
    """The network predicts the noise eps; x0 = (x_t - sigma eps) / alpha."""

    def check_recipe(self, components):
        """Refuse schedules that reach zero SNR (logSNR(1) = -inf, e.g. ``zero-terminal-snr``):
        there alpha = 0 and x0 = (x_t - sigma eps) / alpha cannot be formed."""
        return refuse_zero_terminal_snr("eps-prediction", components)

    def target(self, x0, eps, x_t, alpha, sigma):
        return eps

    def to_x0(self, out, x_t, alpha, sigma):
        return noiselevel.x0_from_eps(out, x_t, alpha, sigma)

    def from_x0(self, x0, x_t, alpha, sigma):
        return noiselevel.eps_from_x0(x0, x_t, alpha, sigma)

    def log_x0_mse_factor(self, alpha, sigma):
        return noiselevel.log_x0_mse_factor_eps(alpha, sigma)


@hookimpl
def fundiff_register_parameterizations(register):
    register("eps", EpsPrediction)
