"""The learned-variance interface of the built-in trainable denoisers.

Learned variance (improved DDPM, Nichol and Dhariwal 2021, sec. 3.1)
-------------------------------------------------------------------
A denoiser built with ``learned_variance: true`` has twice the output channels: the first
half is the usual output (in the parameterization's space), the second half ``v`` is a raw,
unconstrained per-element value for the reverse variance. The built module exposes:

- ``module.learned_variance`` (bool);
- ``module(x, logsnr, cond)``: the first half only, shaped like ``x``, so the trainer,
  parameterizations, guidance and samplers keep working unchanged;
- ``module(x, logsnr, cond, return_variance=True)`` and the equivalent
  ``module.forward_with_variance(x, logsnr, cond)``: ``(out, v)``, both shaped like ``x``;
  ``v`` is None when the module was built without the head. Call the keyword form through
  wrappers (DistributedDataParallel, compiled modules) so their forward hooks run.

The split follows improved DDPM's convention: for images the channels ``0..C-1`` are the
output and ``C..2C-1`` are ``v``; for flattened data (mlp) the first ``numel`` outputs are
the output. ``v`` means nothing by itself: the reverse-variance component that consumes it
defines it (improved DDPM's ``learned-range`` reads ``(v + 1) / 2`` as the interpolation
weight between log beta and log beta-tilde). A variance component can check a recipe with
``getattr(components["denoiser"], "learned_variance", False)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class VarianceOutput(nn.Module):
    """Base of networks with an optional learned-variance head (see the module docstring).

    Subclasses implement ``network(x, logsnr, cond)`` returning the raw output with
    ``out_factor`` times the channels of ``x`` along dimension 1 (image networks), or
    (B, out_factor * numel) (networks of flattened data)."""

    learned_variance: bool = False

    @property
    def out_factor(self) -> int:
        return 2 if self.learned_variance else 1

    def network(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor] = None, return_variance: bool = False):
        raw = self.network(x, logsnr, cond)
        shape = x.shape
        # images: channel c' = j * C + c is half j of channel c; flattened data: output j * numel + i
        raw = raw.reshape(shape[0], self.out_factor, *shape[1:])
        out = raw[:, 0]
        if not return_variance:
            return out
        return out, (raw[:, 1] if self.learned_variance else None)

    def forward_with_variance(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor] = None):
        """``(out, v)``: the output and the learned-variance values (None without the head)."""
        return self(x, logsnr, cond, return_variance=True)
