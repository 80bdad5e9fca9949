"""DPM-Solver-fast (Lu et al. 2022, sec. 3.4): a budget of NFE evaluations spent on singlestep
DPM-Solver steps of mixed order, mostly third order, lower orders at the end.

With K = floor(NFE / 3) + 1 outer steps the orders are (sec. 3.4)

    NFE = 3m      [3] * (K - 2) + [2, 1]
    NFE = 3m + 1  [3] * (K - 1) + [1]
    NFE = 3m + 2  [3] * (K - 1) + [2]

``steps`` is the NFE budget, so the grid has NFE + 1 levels and every level but the last is
evaluated once: an outer step of order k spans k grid intervals and its inner evaluations
sit at the grid's levels inside it. With a grid uniform in logSNR (the ``logsnr-uniform``
spacing) the inner points fall at r = 1/3, 2/3 and r = 1/2, exactly the paper's DPM-Solver-
fast; any other smooth spacing gives r2 = 2/3 + O(h), which keeps third order. The step onto
a clean level (sigma = 0) can only be first order, so when the mix would end there with a
second-order step, that step is taken as two first-order ones ([..., 3, 1, 1]). A first
level with alpha = 0 (zero terminal SNR) is left by a DDIM step, the exact limit there, which
spends one evaluation of the budget.
"""

from __future__ import annotations

import attrs

from fundiff import Sampler, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

from ._exponential import zero_snr_start
from .dpm_solver import singlestep


def fast_orders(nfe: int, ends_clean: bool) -> list[int]:
    """The orders of DPM-Solver-fast's outer steps for a budget of ``nfe`` evaluations."""
    m, rest = divmod(nfe, 3)
    if nfe == 0:
        return []
    if rest == 0:
        orders = [3] * (m - 1) + [2, 1]
    else:
        orders = [3] * m + [rest]
    if ends_clean and orders[-1] == 2:
        orders[-1:] = [1, 1]
    return orders


@attrs.frozen(kw_only=True)
class DPMSolverFast(Sampler):
    """DPM-Solver-fast: ``steps`` evaluations, grouped into outer steps of order 3, 2 and 1."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    steps: int = attrs.field(default=20, validator=at_least(1), metadata=doc("number of evaluations (NFE); the grid has steps + 1 levels, each but the last evaluated once"))

    def sample(self, denoise, x, levels, noise=None, callback=None):
        x, levels, offset = zero_snr_start(denoise, x, levels, callback)
        start, plan = 0, []
        for k in fast_orders(len(levels) - 1, levels[-1].is_clean):
            plan.append((levels[start], levels[start + k], levels[start + 1 : start + k]))
            start += k
        for i, (t, s, inner) in enumerate(plan):
            x0 = denoise(x, t)
            x = x0 * s.alpha if s.is_clean else singlestep(denoise, x, x0, t, s, inner)
            if callback is not None:
                callback(i + offset, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpm-solver-fast", DPMSolverFast)
