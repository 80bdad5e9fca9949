"""Uniform step selection: t evenly spaced from 1 down to 0 (DDIM, Song et al. 2021, sec. 4.2,
"linear" selection; the spacing a recipe gets without a ``spacing`` section).

t_i = 1 - i / steps for i = 0 .. steps - 1, then the clean level. On a T-step discrete
schedule with T divisible by ``steps`` these are grid points k = T, T - T/steps, ..., T/steps
(the "trailing" convention of Lin et al. 2024).
"""

from __future__ import annotations

import attrs

from fundiff import Spacing, hookimpl, noise_levels


@attrs.frozen(kw_only=True)
class Uniform(Spacing):
    """Steps evenly spaced in t, from t = 1 to the clean level."""

    def levels(self, schedule, chain, steps):
        return noise_levels(schedule, chain, steps)


@hookimpl
def fundiff_register_spacings(register):
    register("uniform", Uniform)
