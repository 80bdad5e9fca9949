"""Building blocks shared by the image denoisers (unet, dit, uvit): the noise-level and
label embeddings, attention, patches, and the recipe checks for image data. The
learned-variance interface they (and mlp) implement lives in ``_variance.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from fundiff import DataSpec

from ._variance import VarianceOutput
from .mlp import sinusoidal_embedding


def null_labels(cond: Optional[torch.Tensor], batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Class indices for an embedding with a null row: None and -1 (no condition, the token
    classifier-free guidance drops labels to) map to index ``num_classes``."""
    if cond is None:
        return torch.full((batch,), num_classes, device=device, dtype=torch.long)
    labels = cond.long()
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)


class NoiseEmbedding(nn.Module):
    """Sinusoidal embedding of the (clamped) logSNR followed by a two-layer MLP (DDPM's
    timestep embedding, applied to lambda)."""

    def __init__(self, embed_dim: int, max_period: float, dim: int):
        super().__init__()
        self.embed_dim, self.max_period = embed_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, logsnr: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(logsnr, self.embed_dim, self.max_period).to(dtype))


class Attention(nn.Module):
    """Multi-head attention of tokens (B, N, dim) to themselves or to a context (B, M, context_dim)."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, zero_out: bool = False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, n, dim = x.shape
        context = x if context is None else context
        q = self.q(x).reshape(batch, n, self.heads, dim // self.heads).transpose(1, 2)
        k, v = self.kv(context).reshape(batch, context.shape[1], 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).reshape(batch, n, dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = max(1, int(dim * ratio))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C) tokens, row-major over patches."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (rows * cols, dim), as in MAE and DiT: half
    the channels encode the row, half the column, each with geometric frequencies."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")
    parts = []
    for grid in (r.reshape(-1), c.reshape(-1)):
        angles = grid[:, None] * freqs[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:  # dim not divisible by 4: pad with zeros
        emb = torch.cat([emb, torch.zeros(emb.shape[0], dim - emb.shape[1], dtype=emb.dtype)], dim=1)
    return emb.float()


def image_problems(name: str, components: dict, divisor: int, why: str) -> list[str]:
    """Refusals shared by the image denoisers: the data must be (C, H, W) with H and W
    divisible by ``divisor`` (``why`` says where the divisor comes from)."""
    data = components.get("data")
    if data is None:
        return []
    try:
        spec: DataSpec = data.spec()
    except Exception:  # noqa: BLE001 - the data component reports its own problems
        return []
    shape = tuple(spec.shape)
    if len(shape) != 3:
        return [
            f"denoiser '{name}' needs image data of shape (C, H, W), but the data has shape {shape}; "
            f"use denoiser 'mlp' for data that is not an image"
        ]
    _, height, width = shape
    if height % divisor or width % divisor:
        return [
            f"denoiser '{name}' needs the image height and width divisible by {divisor} ({why}), but the data is "
            f"{height}x{width}; change that parameter or the data size"
        ]
    return []


def labelled(denoiser, components: dict) -> bool:
    """Whether ``denoiser`` will see class labels in this recipe."""
    data = components.get("data")
    if data is None:
        return False
    try:
        return bool(denoiser.uses_labels(data.spec()))
    except Exception:  # noqa: BLE001
        return False


def xavier_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear (the ViT/DiT initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "Attention",
    "FeedForward",
    "NoiseEmbedding",
    "VarianceOutput",
    "image_problems",
    "labelled",
    "null_labels",
    "patchify",
    "sincos_2d",
    "unpatchify",
    "xavier_linears",
]
