"""Leading timestep spacing (DDIM and PNDM as implemented; diffusers' ``timestep_spacing=
"leading"``; Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
Table 2).

On a T-step discrete schedule the sampler visits the 1-indexed grid points

    k_i = i * floor(T / steps) + 1 + offset,   i = steps - 1, ..., 0,

then the clean level; k sits at t = k / T (alpha_bar_k, as in DDPM). For T = 1000 and 10
steps: 901, 801, ..., 1 (diffusers' 0-indexed timesteps 900, ..., 0 plus ``steps_offset``).
The first level is *not* the terminal one (k = T): sampling starts from prior noise at a
level with some signal left, the flaw Lin et al. point out; ``trailing`` starts at k = T.

The step is ``floor(T / steps)`` times i, as in diffusers and Lin et al.'s Table 2 (which
differs from floor(i * T / steps) when steps does not divide T). A continuous schedule is
treated as T = 1000 steps on its own t (t = k / 1000).
"""

from __future__ import annotations

import attrs

from fundiff import Spacing, hookimpl
from fundiff.config import at_least, doc

from ._grid import check_steps, levels_at_t, train_steps


@attrs.frozen(kw_only=True)
class Leading(Spacing):
    """Grid points k = i * floor(T / steps) + 1 + offset, from the largest down."""

    offset: int = attrs.field(
        default=0, validator=at_least(0), metadata=doc("added to every grid point (diffusers' steps_offset; Stable Diffusion uses 1)")
    )

    def levels(self, schedule, chain, steps):
        T = train_steps(schedule)
        check_steps("leading", steps, T, f"T = {T} grid points")
        ratio = T // steps
        ks = [i * ratio + 1 + self.offset for i in reversed(range(steps))]
        if ks[0] > T:
            raise ValueError(f"spacing 'leading': offset {self.offset} pushes the first grid point to {ks[0]} > T = {T}")
        return levels_at_t(schedule, chain, [k / T for k in ks])


@hookimpl
def fundiff_register_spacings(register):
    register("leading", Leading)
