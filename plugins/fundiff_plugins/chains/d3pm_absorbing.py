"""D3PM with an absorbing state (Austin et al. 2021, sec. 3.1 and appendix A.2.2; the
masked-token diffusion behind "Unleashing Transformers", Bond-Taylor et al. 2022).

The state has one class more than the data, [MASK] (the last channel). Each step keeps a
position's class with probability a and otherwise replaces it by [MASK], which never leaves:
Q(a) = a I + (1 - a) 1 e_mask^T. The cumulative matrix is Q(alpha_bar) with alpha_bar the
product of the keep probabilities, and the terminal distribution (alpha_bar = 0) masks every
position. ``encode`` adds the empty [MASK] channel to one-hot data and ``decode`` drops it.
The logSNR currency maps to alpha_bar = sigmoid(lambda) (see ``_categorical``), so the
``simple-linear`` schedule (alpha_bar = 1 - t) gives the paper's schedule for this chain, whose
every step masks each remaining position with probability 1 / (number of steps left).

The model's reverse step (D3PM eq. 4) leaves unmasked positions as they are (their class is
certain given x_t) and unmasks a masked position into class c with probability
(alpha_bar_s - alpha_bar_t) / (1 - alpha_bar_t) * p(x0 = c | x_t).
"""

from __future__ import annotations

import attrs
import torch

from fundiff import hookimpl

from ._categorical import CategoricalChain


@attrs.frozen(kw_only=True)
class D3PMAbsorbing(CategoricalChain):
    """Categorical chain on one-hot data with an extra [MASK] class that absorbs every class (D3PM absorbing)."""

    name = "d3pm-absorbing"
    extra_classes = 1

    def stationary(self, num_state_classes: int, like: torch.Tensor) -> torch.Tensor:
        # pi = e_mask: all mass on the last class
        shape = (1, num_state_classes) + (1,) * (like.ndim - 2)
        pi = torch.zeros(shape, dtype=like.dtype, device=like.device)
        pi[:, -1] = 1.0
        return pi


@hookimpl
def fundiff_register_chains(register):
    register("d3pm-absorbing", D3PMAbsorbing)
