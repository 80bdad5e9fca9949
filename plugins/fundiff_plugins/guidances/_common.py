"""Shared pieces of the guidance plugins: the null label, condition dropout, the batched
conditional + unconditional forward, and the recipe check for a conditional denoiser.

Not a registered component (no entry point): the modules next to it import it.
"""

from __future__ import annotations

from typing import Optional

import torch

from fundiff import Level

#: the label of "no condition" (the denoiser contract: cond -1 means unconditional)
NULL_LABEL = -1


def drop_conditions(cond: Optional[torch.Tensor], u: torch.Tensor, drop_prob: float) -> Optional[torch.Tensor]:
    """Condition dropout (Ho & Salimans 2022, Algorithm 1): label -> NULL_LABEL where u < p."""
    if cond is None or drop_prob <= 0.0:
        return cond
    return torch.where(u.to(cond.device) < drop_prob, torch.full_like(cond, NULL_LABEL), cond)


def conditional_and_unconditional(predict, x: torch.Tensor, level: Level, cond: Optional[torch.Tensor]):
    """(x0 | cond, x0 | no condition) from ONE call of ``predict`` on the doubled batch
    ``[x, x]`` with labels ``[cond, -1]`` (Ho & Salimans 2022, sec. 3.2: both branches in one
    forward pass). Without a condition both are the one unconditional prediction."""
    if cond is None:
        x0 = predict(x, level, None)
        return x0, x0
    null = torch.full_like(cond, NULL_LABEL)
    both = predict(torch.cat([x, x]), level, torch.cat([cond, null]))
    x0_cond, x0_uncond = both.chunk(2)
    return x0_cond, x0_uncond


def conditional_denoiser_problems(name: str, components: dict) -> list[str]:
    """The problem (if any) with a recipe whose guidance needs a conditional denoiser."""
    denoiser, data = components.get("denoiser"), components.get("data")
    if denoiser is None or data is None:
        return []
    spec = data.spec()
    if denoiser.uses_labels(spec):
        return []
    if spec.num_classes == 0:
        return [f"guidance '{name}' needs class labels, but the data set has none; use guidance: none"]
    return [
        f"guidance '{name}' needs a conditional denoiser, but this one ignores the data's {spec.num_classes} "
        "class labels; set denoiser.conditional: true (or use guidance: none)"
    ]


def per_sample_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The non-batch dimensions: norms, inner products and stds are taken per sample."""
    return tuple(range(1, x.ndim))
