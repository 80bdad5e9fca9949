"""Fixed-small reverse variance: the posterior's, beta tilde (Ho et al. 2020, DDPM, sec. 3.2,
sigma_t^2 = beta_tilde_t; the variance of q(x_s | x_t, x0), VDM eq. 7).

beta_tilde = sigma_s^2 (1 - SNR_t / SNR_s), from ``noiselevel.posterior``; optimal when x0 is
a single point. The ``ddpm`` sampler uses it without a ``variance`` section too, so this
section changes nothing there; it makes the choice explicit in a recipe.
"""

from __future__ import annotations

import attrs

from fundiff import ReverseVariance, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class FixedSmall(ReverseVariance):
    """The posterior variance beta tilde of q(x_s | x_t, x0)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    def variance(self, s, t, v=None):
        return noiselevel.posterior(s, t)[2]


@hookimpl
def fundiff_register_variances(register):
    register("fixed-small", FixedSmall)
