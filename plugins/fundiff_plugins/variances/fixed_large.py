"""Fixed-large reverse variance: the forward transition's, beta (Ho et al. 2020, DDPM,
sec. 3.2, sigma_t^2 = beta_t; optimal when x0 ~ N(0, I) on a VP chain).

beta = sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (VDM eq. 5, ``noiselevel.transition``),
which is DDPM's beta_t when s and t are neighbouring steps of its discrete chain. At the clean
level (s with sigma = 0) the step is deterministic: the variance is 0 there, as in DDPM's last
step.
"""

from __future__ import annotations

import attrs

from fundiff import ReverseVariance, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS


@attrs.frozen(kw_only=True)
class FixedLarge(ReverseVariance):
    """The forward transition variance beta = sigma_{t|s}^2."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})

    def variance(self, s, t, v=None):
        if s.is_clean:
            return 0.0
        return noiselevel.transition(s, t)[1]


@hookimpl
def fundiff_register_variances(register):
    register("fixed-large", FixedLarge)
