"""Ancestral sampling of a categorical chain (D3PM, Austin et al. 2021, sec. 3.3 and eq. 4).

From x_t at each grid level t the sampler asks the denoiser for the predicted x0 class
probabilities p(x0 | x_t) and draws x_s, at the next level s, from the chain's reverse step

    p(x_s | x_t)  proportional to  (x_t Q_{t|s}^T) * (p(x0 | x_t) Q-bar_s)      (D3PM eq. 4),

computed by ``level.chain.posterior``; Q_{t|s} is the exact step matrix between any two
levels of the chain (its keep probabilities multiply), so a grid coarser than the chain's
training grid skips steps without approximation of the forward process.

Draws use the sample's own uniforms, ``noise.uniform(i)`` at step i (channel 0 of each
position, inverse CDF), so sample i does not depend on the batch it is in. The last step,
onto the clean level, draws x0 from p(x_0 | x_1) like every other step (``last_step: draw``,
the model's exact ancestral sample); ``last_step: argmax`` takes the most probable class
instead, as D3PM's reference code does at t = 0, which trades diversity for fewer stray pixels.

The levels must come from a categorical chain (``level.chain``, with ``posterior``,
``x0_distribution`` and ``sample_categorical``; the built-in ``d3pm-uniform`` and
``d3pm-absorbing``), and the start ``x`` is a one-hot state (``Chain.initial_state``).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from fundiff import Sampler, hookimpl
from fundiff.components import CATEGORICAL_STATE
from fundiff.config import doc, one_of

_CHAIN_METHODS = ("posterior", "x0_distribution", "sample_categorical")


@attrs.frozen(kw_only=True)
class D3PMAncestral(Sampler):
    """Ancestral categorical sampling through the chain's reverse step p(x_s | x_t) (D3PM eq. 4)."""

    requires = frozenset({CATEGORICAL_STATE})
    last_step: Literal["draw", "argmax"] = attrs.field(
        default="draw",
        validator=one_of("draw", "argmax"),
        metadata=doc("the step onto the clean level: draw from p(x0 | x_1) (exact ancestral sampling) or take its argmax"),
    )

    def sample(self, denoise, x, levels, noise=None, callback=None):
        chain = levels[0].chain
        if chain is None or not all(hasattr(chain, name) for name in _CHAIN_METHODS):
            raise ValueError(
                "d3pm-ancestral needs levels made by a categorical chain (level.chain with "
                f"{', '.join(_CHAIN_METHODS)}), e.g. chain: d3pm-uniform or d3pm-absorbing"
            )
        if noise is None or not hasattr(noise, "uniform"):
            raise ValueError("d3pm-ancestral draws categories: it needs a noise source with uniform(draw)")
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            x0 = denoise(x, t)
            probs = chain.posterior(x, chain.x0_distribution(x0.to(x.dtype)), s, t)
            if s.is_clean and self.last_step == "argmax":
                x = torch.nn.functional.one_hot(probs.argmax(1), x.shape[1]).movedim(-1, 1).to(x.dtype)
            else:
                x = chain.sample_categorical(probs, noise.uniform(i))
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("d3pm-ancestral", D3PMAncestral)
