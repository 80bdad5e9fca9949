"""U-ViT (Bao et al. 2023, "All are worth words", sec. 3), for images (C, H, W).

A plain pre-LayerNorm vision transformer that treats every input as a token: the noise
level (the clamped logSNR, sinusoidal embedding and a two-layer MLP; ``mlp.py``) is one
token, the class label, when the model is conditional, another (the label -1, and
``cond=None``, select the null token classifier-free guidance drops to), and each p x p
patch of the image one more; a learned position embedding is added to all of them.

The ``depth`` blocks are split into ``depth // 2`` shallow blocks, ``depth % 2`` middle
block and ``depth // 2`` deep blocks; shallow block i and deep block ``depth // 2 - 1 - i``
are joined by a long skip connection: the deep block first combines its input h with the
shallow block's output s as ``Linear([h, s])`` (concatenation along channels, then a
linear map back to the width; the paper's sec. 3.1 found this better than adding). After a
final LayerNorm the patch tokens are mapped linearly to p x p x C patches, reassembled,
and passed through a 3x3 convolution (sec. 3.1, "an extra convolutional block").
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import nn

from fundiff import BuildContext, Denoiser, hookimpl
from fundiff.config import at_least, doc, greater_than

from ._layers import Attention, FeedForward, NoiseEmbedding, VarianceOutput, image_problems, null_labels, unpatchify


class UViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, skip: bool):
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViTModel(VarianceOutput):
    def __init__(self, uvit: "UViT", shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = shape
        dim, p = uvit.width, uvit.patch_size
        self.learned_variance = uvit.learned_variance
        self.patch, self.channels, self.height, self.width = p, channels, height, width
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(channels, dim, p, stride=p)
        self.noise_embedding = NoiseEmbedding(uvit.embed_dim, uvit.max_period, dim)
        self.class_embedding = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.extras = 1 + (num_classes > 0)  # noise token, class token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (height // p) * (width // p), dim))
        half = uvit.depth // 2
        self.in_blocks = nn.ModuleList(UViTBlock(dim, uvit.heads, uvit.mlp_ratio, skip=False) for _ in range(half))
        self.mid_blocks = nn.ModuleList(UViTBlock(dim, uvit.heads, uvit.mlp_ratio, skip=False) for _ in range(uvit.depth % 2))
        self.out_blocks = nn.ModuleList(UViTBlock(dim, uvit.heads, uvit.mlp_ratio, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(dim)
        out_channels = channels * self.out_factor
        self.decoder = nn.Linear(dim, p * p * out_channels)
        self.final_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # U-ViT's initialisation: truncated N(0, 0.02) for linear weights and positions, zero biases
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def network(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        batch = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        extra = [self.noise_embedding(logsnr, x.dtype)[:, None, :]]
        if self.class_embedding is not None:
            extra.append(self.class_embedding(null_labels(cond, batch, self.num_classes, x.device))[:, None, :])
        h = torch.cat([*extra, patches], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        for block in self.mid_blocks:
            h = block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())
        tokens = self.decoder(self.norm(h))[:, self.extras :]
        image = unpatchify(tokens, self.patch, self.channels * self.out_factor, self.height, self.width)
        return self.final_conv(image)


@attrs.frozen(kw_only=True)
class UViT(Denoiser):
    """U-ViT: noise level, label and patches as tokens; long skips from shallow to deep blocks."""

    patch_size: int = attrs.field(default=2, validator=at_least(1), metadata=doc("side of the square patches; must divide H and W"))
    width: int = attrs.field(default=256, validator=at_least(1), metadata=doc("token width (hidden size)"))
    depth: int = attrs.field(
        default=7, validator=at_least(1), metadata=doc("transformer blocks: depth // 2 shallow, depth % 2 middle, depth // 2 deep")
    )
    heads: int = attrs.field(default=4, validator=at_least(1), metadata=doc("attention heads; must divide width"))
    mlp_ratio: float = attrs.field(default=4.0, validator=greater_than(0.0), metadata=doc("MLP hidden width over token width"))
    embed_dim: int = attrs.field(default=64, validator=at_least(2), metadata=doc("size of the sinusoidal logSNR embedding"))
    max_period: float = attrs.field(default=1000.0, validator=greater_than(1.0), metadata=doc("longest period of the embedding, in logSNR units"))
    conditional: bool = attrs.field(default=False, metadata=doc("add a class-label token when the data has labels"))
    learned_variance: bool = attrs.field(
        default=False, metadata=doc("twice the output channels: the second half feeds a learned reverse variance (improved DDPM)")
    )

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")

    def uses_labels(self, spec) -> bool:
        return self.conditional and spec.num_classes > 0

    def check_recipe(self, components) -> list[str]:
        return image_problems("uvit", components, self.patch_size, f"patch_size {self.patch_size}")

    def build(self, context: BuildContext) -> nn.Module:
        classes = context.spec.num_classes if self.uses_labels(context.spec) else 0
        return UViTModel(self, tuple(context.spec.shape), classes)


@hookimpl
def fundiff_register_denoisers(register):
    register("uvit", UViT)
