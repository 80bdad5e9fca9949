"""Data prediction (survey sec. 4.2.1): the network predicts x0 directly."""

from __future__ import annotations

import attrs

from fundiff import Parameterization, hookimpl


@attrs.frozen(kw_only=True)
class X0Prediction(Parameterization):
    """The network predicts the clean data x0."""

    def target(self, x0, eps, x_t, alpha, sigma):
        return x0

    def to_x0(self, out, x_t, alpha, sigma):
        return out

    def from_x0(self, x0, x_t, alpha, sigma):
        return x0

    def log_x0_mse_factor(self, alpha, sigma):
        return 0.0 * alpha  # the x0-MSE is its own unit: log 1, shaped like alpha


@hookimpl
def fundiff_register_parameterizations(register):
    register("x0", X0Prediction)
