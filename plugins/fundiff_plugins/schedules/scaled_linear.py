"""The "scaled linear" beta schedule of latent diffusion (Rombach et al. 2022; the schedule
Stable Diffusion ships, "scaled_linear" in its configuration).

The square roots of the betas rise linearly: beta_k = (sqrt(b_0) + (k - 1) / (T - 1) *
(sqrt(b_1) - sqrt(b_0)))^2 for k = 1 .. T, with b_0 = 0.00085, b_1 = 0.012 and T = 1000.
Compared with DDPM's linear schedule the betas stay small for longer, so alpha_bar_T is
about 4.7e-3 (logSNR(1) ~ -5.4): the terminal step keeps some signal, which is what
``zero-terminal-snr`` (Lin et al. 2024) corrects.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import DiscreteSchedule, hookimpl
from fundiff.config import at_least, doc, in_range


@attrs.frozen(kw_only=True)
class ScaledLinear(DiscreteSchedule):
    """Betas whose square roots rise linearly from sqrt(beta_start) to sqrt(beta_end) (latent diffusion)."""

    beta_start: float = attrs.field(default=0.00085, validator=in_range(0.0, 1.0, low_open=True, high_open=True), metadata=doc("beta_1"))
    beta_end: float = attrs.field(default=0.012, validator=in_range(0.0, 1.0, low_open=True, high_open=True), metadata=doc("beta_T"))
    num_steps: int = attrs.field(default=1000, validator=at_least(2), metadata=doc("T, the number of discrete steps"))

    def __attrs_post_init__(self) -> None:
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")

    def betas(self) -> torch.Tensor:
        roots = torch.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), self.num_steps, dtype=torch.float64)
        return roots * roots


@hookimpl
def fundiff_register_schedules(register):
    register("scaled-linear", ScaledLinear)
