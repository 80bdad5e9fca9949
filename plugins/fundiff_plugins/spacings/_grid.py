"""Helpers the step-selection plugins share (not a registered component).

A spacing returns ``steps + 1`` host-side levels: ``steps`` noisy ones, strictly less noisy
one after the other, then the clean level (lambda = +inf, sigma = 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fundiff import DiscreteSchedule, Level

#: the training-step count assumed for continuous schedules by the timestep spacings
#: (``leading``, ``trailing``): t = k / 1000, as diffusers' default num_train_timesteps
CONTINUOUS_T = 1000


def train_steps(schedule) -> int:
    """T of a discrete schedule; :data:`CONTINUOUS_T` for a continuous one (its t = k / T)."""
    return int(schedule.num_steps) if isinstance(schedule, DiscreteSchedule) else CONTINUOUS_T


def logsnr_range(schedule) -> tuple[float, float]:
    """(lambda(1), lambda(t_min)): the noisiest and the least noisy level a model sees."""
    return schedule.logsnr_at(1.0), schedule.logsnr_at(float(schedule.t_min))


def levels_at_t(schedule, chain, ts: Sequence[float]) -> list[Level]:
    """Levels at the decreasing times ``ts``, then the clean level."""
    logsnrs = schedule.logsnr(torch.tensor(list(ts), dtype=torch.float64)).tolist()
    return levels_at_logsnr(chain, logsnrs)


def levels_at_logsnr(chain, logsnrs: Sequence[float]) -> list[Level]:
    """Levels at the increasing logSNRs ``logsnrs``, then the clean level."""
    return [chain.level(float(lam)) for lam in logsnrs] + [chain.level(math.inf)]


def check_steps(name: str, steps: int, most: int, what: str) -> None:
    if steps < 1:
        raise ValueError(f"spacing '{name}': steps must be >= 1, got {steps}")
    if steps > most:
        raise ValueError(f"spacing '{name}': at most {most} steps ({what}), got {steps}")
