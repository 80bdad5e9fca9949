"""Class logits for categorical states (D3PM's x0-parameterization, Austin et al. 2021,
sec. 3.3: the network predicts logits of p(x0 | x_t)).

The network's output has the state's shape, (B, M, *positions), and is read as unnormalised
log-probabilities over the M classes of each position: ``to_x0`` is the softmax over axis 1,
the predicted class probabilities, which is also the expected one-hot x0 (the posterior mean
of a one-hot vector is its class distribution). The network sees the one-hot x_t unscaled.

There is no regression target: a categorical chain trains this output with its own objective
(``Chain.training_losses``: D3PM's L_vb + lambda CE), so ``target`` and ``log_x0_mse_factor``
refuse, and the component requires ``categorical-state`` so a recipe can only pair it with a
categorical chain.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import FundiffError, Parameterization, hookimpl
from fundiff.components import CATEGORICAL_STATE

_NO_TARGET = (
    "parameterization 'logits' has no regression target: class logits are trained by a categorical chain's own "
    "loss (chain: d3pm-uniform or d3pm-absorbing), not by the Gaussian denoising loss"
)


@attrs.frozen(kw_only=True)
class Logits(Parameterization):
    """The network predicts class logits; x0 = softmax over the class axis (predicted class probabilities)."""

    requires = frozenset({CATEGORICAL_STATE})

    def target(self, x0, eps, x_t, alpha, sigma):
        raise FundiffError(_NO_TARGET)

    def log_x0_mse_factor(self, alpha, sigma):
        raise FundiffError(_NO_TARGET)

    def to_x0(self, out, x_t, alpha, sigma):
        return torch.softmax(out, dim=1)

    def from_x0(self, x0, x_t, alpha, sigma):
        """log x0: logits whose softmax is x0 (softmax ignores a constant added per position).
        Zero probabilities become the log of the dtype's smallest normal number, whose
        softmax weight is below the dtype's resolution next to any class with mass."""
        return torch.log(x0.clamp_min(torch.finfo(x0.dtype).tiny))


@hookimpl
def fundiff_register_parameterizations(register):
    register("logits", Logits)
