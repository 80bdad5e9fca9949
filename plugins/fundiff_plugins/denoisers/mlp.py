"""A residual MLP denoiser for low-dimensional data (any data shape, flattened).

The noise level enters as a sinusoidal embedding of logSNR (the transformer position
encoding of Vaswani et al. used by DDPM, applied to lambda instead of the step index), added
to every residual block; class labels, when the data has them, add a learned embedding
(index ``num_classes`` is the "no condition" token used by condition dropout).
``learned_variance: true`` doubles the outputs for a reverse-variance head (``_variance.py``).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from fundiff import BuildContext, Denoiser, hookimpl
from fundiff.config import at_least, doc, greater_than

from ._variance import VarianceOutput


#: logSNR is clamped to [-LOGSNR_CLAMP, LOGSNR_CLAMP] before it is embedded. Schedules may
#: reach lambda = -inf (zero terminal SNR, alpha = 0) or +inf (clean data), and cos(inf) is
#: NaN; beyond |lambda| = 50 alpha or sigma is below exp(-25) ~ 1e-11, which float32 inputs
#: cannot tell from 0, so the clamp changes nothing a network could resolve.
LOGSNR_CLAMP = 50.0


def sinusoidal_embedding(logsnr: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """[cos(lambda w_k), sin(lambda w_k)] with w_k geometric from 1 down to 1 / max_period
    (lambda clamped to +-LOGSNR_CLAMP first, so that infinite levels embed as finite ones)."""
    half = dim // 2
    # at least float32 (half-precision angles lose the fine frequencies); float64 stays float64
    dtype = torch.promote_types(logsnr.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=logsnr.device, dtype=dtype) / half)
    angles = logsnr.to(dtype).clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualMLP(VarianceOutput):
    def __init__(
        self, numel: int, width: int, depth: int, embed_dim: int, num_classes: int, max_period: float, learned_variance: bool = False
    ):
        super().__init__()
        self.learned_variance = learned_variance
        self.embed_dim = embed_dim
        self.max_period = max_period
        self.level_mlp = nn.Sequential(nn.Linear(embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embedding = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.num_classes = num_classes
        self.input = nn.Linear(numel, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(width), "cond": nn.Linear(width, width), "fc1": nn.Linear(width, 2 * width), "fc2": nn.Linear(2 * width, width)}
            )
            for _ in range(depth)
        )
        self.output = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, numel * self.out_factor))

    def network(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        emb = self.level_mlp(sinusoidal_embedding(logsnr, self.embed_dim, self.max_period).to(x.dtype))
        if self.class_embedding is not None:
            labels = torch.full((shape[0],), self.num_classes, device=x.device, dtype=torch.long) if cond is None else cond.long()
            labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
            emb = emb + self.class_embedding(labels)
        h = self.input(x.reshape(shape[0], -1))
        for block in self.blocks:
            z = block["norm"](h) + block["cond"](nn.functional.silu(emb))
            h = h + block["fc2"](nn.functional.silu(block["fc1"](z)))
        return self.output(h)  # (B, out_factor * numel): VarianceOutput.forward splits and reshapes


@attrs.frozen(kw_only=True)
class MLP(Denoiser):
    """Residual MLP with a sinusoidal logSNR embedding and optional class embedding."""

    width: int = attrs.field(default=256, validator=at_least(1), metadata=doc("hidden width"))
    depth: int = attrs.field(default=4, validator=at_least(1), metadata=doc("number of residual blocks"))
    embed_dim: int = attrs.field(default=64, validator=at_least(2), metadata=doc("size of the sinusoidal logSNR embedding"))
    max_period: float = attrs.field(default=1000.0, validator=greater_than(1.0), metadata=doc("longest period of the embedding, in logSNR units"))
    conditional: bool = attrs.field(default=False, metadata=doc("embed class labels when the data has them"))
    learned_variance: bool = attrs.field(
        default=False, metadata=doc("twice the outputs: the second half feeds a learned reverse variance (improved DDPM)")
    )

    def uses_labels(self, spec) -> bool:
        return self.conditional and spec.num_classes > 0

    def build(self, context: BuildContext) -> nn.Module:
        classes = context.spec.num_classes if self.uses_labels(context.spec) else 0
        return ResidualMLP(context.spec.numel, self.width, self.depth, self.embed_dim, classes, self.max_period, self.learned_variance)


@hookimpl
def fundiff_register_denoisers(register):
    register("mlp", MLP)
