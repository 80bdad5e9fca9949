"""D3PM with uniform transitions (Austin et al. 2021, sec. 3.1 and appendix A.2.1; the
multinomial diffusion of Hoogeboom et al. 2021).

Each step keeps a position's class with probability a and otherwise redraws it uniformly
from the K data classes: Q(a) = a I + (1 - a) 11^T / K. The cumulative matrix after keep
probabilities a_1 .. a_k is Q(alpha_bar) with alpha_bar = prod a_i, and the terminal
distribution (alpha_bar = 0) is uniform over the classes. The logSNR currency maps to
alpha_bar = sigmoid(lambda) (see ``_categorical``): the cosine schedule is the paper's choice
for this chain.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import hookimpl

from ._categorical import CategoricalChain


@attrs.frozen(kw_only=True)
class D3PMUniform(CategoricalChain):
    """Categorical chain on one-hot data: each step keeps a class or redraws it uniformly (D3PM uniform)."""

    name = "d3pm-uniform"
    extra_classes = 0

    def stationary(self, num_state_classes: int, like: torch.Tensor) -> torch.Tensor:
        # pi = 1/K on every class
        shape = (1, num_state_classes) + (1,) * (like.ndim - 2)
        return torch.full(shape, 1.0 / num_state_classes, dtype=like.dtype, device=like.device)


@hookimpl
def fundiff_register_chains(register):
    register("d3pm-uniform", D3PMUniform)
