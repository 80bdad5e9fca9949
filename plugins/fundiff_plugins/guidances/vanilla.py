"""Vanilla guidance: sample the conditional denoiser p(x | y) as it is.

The condition joins only through the denoiser's own conditioning mechanism (a class
embedding, as in the conditional models of Dhariwal & Nichol 2021, sec. 4): the guided
estimate is x0_hat = D(x_t, lambda, y). It is ``none`` with a stated requirement: the
recipe's denoiser must take class labels, and a recipe with an unconditional one is refused
at load time instead of silently sampling p(x).
"""

from __future__ import annotations

import attrs

from fundiff import Guidance, hookimpl

from ._common import conditional_denoiser_problems


@attrs.frozen(kw_only=True)
class Vanilla(Guidance):
    """The conditional denoiser's prediction alone (requires a conditional denoiser)."""

    def check_recipe(self, components):
        return conditional_denoiser_problems("vanilla", components)

    def denoise(self, predict, x, level, cond):
        return predict(x, level, cond)


@hookimpl
def fundiff_register_guidances(register):
    register("vanilla", Vanilla)
