"""Trailing timestep spacing (DPM-Solver as implemented; diffusers' ``timestep_spacing=
"trailing"``; Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
Table 2 and sec. 3.3: always start from the last timestep).

On a T-step discrete schedule the sampler visits the 1-indexed grid points

    k_i = round(T - i * T / steps),   i = 0, ..., steps - 1,

(round half to even, as numpy), then the clean level; k sits at t = k / T. For T = 1000 and
10 steps: 1000, 900, ..., 100 (diffusers' 0-indexed timesteps 999, ..., 99). A continuous
schedule is treated as T = 1000 steps on its own t (t = k / 1000); when steps divides T this
is the ``uniform`` spacing.
"""

from __future__ import annotations

import attrs

from fundiff import Spacing, hookimpl

from ._grid import check_steps, levels_at_t, train_steps


@attrs.frozen(kw_only=True)
class Trailing(Spacing):
    """Grid points k = round(T - i T / steps), starting at the terminal one, k = T."""

    def levels(self, schedule, chain, steps):
        T = train_steps(schedule)
        check_steps("trailing", steps, T, f"T = {T} grid points")
        ratio = T / steps
        ks = [round(T - i * ratio) for i in range(steps)]
        return levels_at_t(schedule, chain, [k / T for k in ks])


@hookimpl
def fundiff_register_spacings(register):
    register("trailing", Trailing)
