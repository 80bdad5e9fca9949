"""Quadratic step selection (DDIM, Song et al. 2021, sec. 4.2 and appendix D.2: timesteps
tau_i proportional to i^2, used for CIFAR-10).

    t_i = t_min + (1 - t_min) * (i / steps)^2,   i = steps, ..., 1,

then the clean level: proportional to (i / steps)^2 on the schedule's [t_min, 1], so small
steps are spent near the data, and the least noisy level is never below t_min (where a
continuous schedule's lambda may be infinite). DDIM's code scales the squares to 0.8 T; here
they span the whole schedule, like the ``uniform`` spacing.
"""

from __future__ import annotations

import attrs

from fundiff import Spacing, hookimpl

from ._grid import check_steps, levels_at_t


@attrs.frozen(kw_only=True)
class Quadratic(Spacing):
    """t proportional to (i / steps)^2 on [t_min, 1]: denser near the data."""

    def levels(self, schedule, chain, steps):
        check_steps("quadratic", steps, 10**9, "")
        t_min = float(schedule.t_min)
        return levels_at_t(schedule, chain, [t_min + (1.0 - t_min) * (i / steps) ** 2 for i in range(steps, 0, -1)])


@hookimpl
def fundiff_register_spacings(register):
    register("quadratic", Quadratic)
