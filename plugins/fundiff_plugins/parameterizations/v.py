"""Velocity prediction (Salimans and Ho 2022, "Progressive distillation", sec. 4; survey sec. 4.2.4).

v = alpha eps - sigma x0. For chains with alpha^2 + sigma^2 != 1 the inverse is the general
one from the core: x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2).
"""

from __future__ import annotations

import attrs

from fundiff import Parameterization, hookimpl, noiselevel


@attrs.frozen(kw_only=True)
class VPrediction(Parameterization):
    """The network predicts v = alpha eps - sigma x0."""

    def target(self, x0, eps, x_t, alpha, sigma):
        return noiselevel.v_from_x0_eps(x0, eps, alpha, sigma)

    def to_x0(self, out, x_t, alpha, sigma):
        return noiselevel.x0_from_v(out, x_t, alpha, sigma)

    def from_x0(self, x0, x_t, alpha, sigma):
        eps = noiselevel.eps_from_x0(x0, x_t, alpha, sigma)
        return noiselevel.v_from_x0_eps(x0, eps, alpha, sigma)

    def log_x0_mse_factor(self, alpha, sigma):
        return noiselevel.log_x0_mse_factor_v(alpha, sigma)


@hookimpl
def fundiff_register_parameterizations(register):
    register("v", VPrediction)
