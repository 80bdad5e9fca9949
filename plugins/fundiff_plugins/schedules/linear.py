"""DDPM's linear beta schedule (Ho et al. 2020, sec. 4: beta_1 = 1e-4 to beta_T = 0.02, T = 1000)."""

from __future__ import annotations

import attrs
import torch

from fundiff import DiscreteSchedule, hookimpl
from fundiff.config import at_least, doc, in_range


@attrs.frozen(kw_only=True)
class Linear(DiscreteSchedule):
    """Betas rising linearly from beta_start to beta_end over num_steps steps (DDPM)."""

    beta_start: float = attrs.field(default=1e-4, validator=in_range(0.0, 1.0, low_open=True, high_open=True), metadata=doc("beta_1"))
    beta_end: float = attrs.field(default=0.02, validator=in_range(0.0, 1.0, low_open=True, high_open=True), metadata=doc("beta_T"))
    num_steps: int = attrs.field(default=1000, validator=at_least(2), metadata=doc("T, the number of discrete steps"))

    def __attrs_post_init__(self) -> None:
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")

    def betas(self) -> torch.Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)


@hookimpl
def fundiff_register_schedules(register):
    register("linear", Linear)
