"""Ancestral sampling of a ``product`` chain: DDPM's step (Ho et al. 2020, Algorithm 2) in
every part at that part's own noise levels.

At each grid step t -> s the denoiser's x0 estimate (one network evaluation for the whole
state) is plugged into each part's exact Gaussian posterior q(x_s | x_t, x0) from the core
two-marginal math (VDM eq. 7, ``fundiff.noiselevel.posterior``) between the part's levels
(``level.chain.part_levels``), and the part's posterior variance is drawn from the recipe's
noise. A part already clean at t stays as it is; a part whose level does not change between
t and s keeps its state (the posterior is the identity there).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Sampler, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE
from fundiff_plugins.chains.product import PRODUCT_STATE, Product


@attrs.frozen(kw_only=True)
class ProductAncestral(Sampler):
    """DDPM ancestral steps per part of a product chain, each at the part's own levels."""

    requires = frozenset({PRODUCT_STATE, ADDITIVE_NOISE})

    def sample(self, denoise, x, levels, noise=None, callback=None):
        chain = levels[0].chain
        if not isinstance(chain, Product):
            raise TypeError(
                f"product-ancestral walks levels of the product chain (level.chain), got levels of {type(chain).__name__}"
            )
        if noise is None:
            raise ValueError("product-ancestral is stochastic: it needs a noise stream")
        part_levels = [chain.part_levels(level) for level in levels]
        for i in range(len(levels) - 1):
            x0 = denoise(x, levels[i])
            fresh = noise.sample(i)
            parts = []
            for j, (x_j, x0_j, fresh_j) in enumerate(zip(chain.split_parts(x), chain.split_parts(x0), chain.split_parts(fresh))):
                t, s = part_levels[i][j], part_levels[i + 1][j]
                if t.is_clean or not s.logsnr > t.logsnr:
                    parts.append(x_j)  # nothing left to denoise, or no change of level in this part
                    continue
                coef_x0, coef_xt, var = noiselevel.posterior(s, t)
                step = coef_x0 * x0_j + coef_xt * x_j
                parts.append(step + math.sqrt(var) * fresh_j if var > 0 else step)
            x = torch.cat(parts, dim=1)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("product-ancestral", ProductAncestral)
