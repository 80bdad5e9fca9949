"""The diffusion transformer, DiT (Peebles and Xie 2023, sec. 3.2), for images (C, H, W).

The image is cut into p x p patches, each linearly embedded (a p x p convolution with
stride p) and given a fixed 2-D sine-cosine position embedding; ``depth`` transformer
blocks follow; a final adaptive LayerNorm and a linear layer map each token back to its
p x p x C patch, and the patches are reassembled.

Each block is adaLN-Zero: LayerNorms without affine parameters whose shift and scale, and a
per-channel gate on each residual branch, are regressed from the condition vector c,

    x <- x + gate_msa(c) * Attn(LN(x) (1 + scale_msa(c)) + shift_msa(c))
    x <- x + gate_mlp(c) * MLP (LN(x) (1 + scale_mlp(c)) + shift_mlp(c)),

with the regression layer initialised to zero, so every block starts as the identity
(DiT sec. 3.2, "adaLN-Zero block"); the final layer's modulation and linear map also start
at zero, as in DiT's initialisation, so a fresh network outputs zeros.

c is the embedding of the logSNR (clamped, sinusoidal, two-layer MLP; ``mlp.py``).
``conditioning`` says where the class label goes:

- ``adaln-zero``: its learned embedding is added to c (DiT's best variant; default);
- ``cross-attention``: c carries the noise level alone and the label becomes ``tokens``
  learned tokens that a multi-head cross-attention layer after each self-attention attends
  to (DiT's "cross-attention block", with the noise kept in adaLN-Zero; the layer's output
  projection starts at zero, so blocks still start as the identity).

The label -1, and ``cond=None``, select the null embedding that classifier-free guidance
drops to. ``cross-attention`` needs labels in a recipe and is refused without them.
"""

from __future__ import annotations

from typing import Literal, Optional

import attrs
import torch
from torch import nn

from fundiff import BuildContext, Denoiser, hookimpl
from fundiff.config import at_least, doc, greater_than

from ._layers import (
    Attention,
    FeedForward,
    NoiseEmbedding,
    VarianceOutput,
    image_problems,
    labelled,
    null_labels,
    sincos_2d,
    unpatchify,
    xavier_linears,
)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.cross = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, heads, context_dim=context_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None, :].chunk(6, dim=2)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None, :].chunk(2, dim=2)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiTModel(VarianceOutput):
    def __init__(self, dit: "DiT", shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = shape
        dim, p = dit.width, dit.patch_size
        self.learned_variance = dit.learned_variance
        self.patch, self.channels, self.height, self.width = p, channels, height, width
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(channels, dim, p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(dim, height // p, width // p)[None], persistent=False)
        self.noise_embedding = NoiseEmbedding(dit.embed_dim, dit.max_period, dim)
        self.class_embedding = self.context = None
        context_dim = None
        if num_classes > 0 and dit.conditioning == "adaln-zero":
            self.class_embedding = nn.Embedding(num_classes + 1, dim)
        elif num_classes > 0:
            context_dim, self.tokens = dim, dit.tokens
            self.context = nn.Embedding(num_classes + 1, dit.tokens * dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, dit.heads, dit.mlp_ratio, context_dim) for _ in range(dit.depth))
        self.final = FinalLayer(dim, p * p * channels * self.out_factor)
        self._initialise()

    def _initialise(self) -> None:
        # DiT's initialize_weights: Xavier linears, the patch embedding like a linear layer,
        # N(0, 0.02) embeddings, and zeros for every adaLN regression and the output layer
        xavier_linears(self)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.noise_embedding.mlp[0], self.noise_embedding.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for table in (self.class_embedding, self.context):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        zero = [block.modulation[-1] for block in self.blocks] + [self.final.modulation[-1], self.final.linear]
        zero += [block.cross.out for block in self.blocks if block.cross is not None]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def network(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        batch = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.noise_embedding(logsnr, x.dtype)
        context = None
        if self.class_embedding is not None:
            c = c + self.class_embedding(null_labels(cond, batch, self.num_classes, x.device))
        if self.context is not None:
            context = self.context(null_labels(cond, batch, self.num_classes, x.device)).reshape(batch, self.tokens, -1)
        for block in self.blocks:
            tokens = block(tokens, c, context)
        out = self.final(tokens, c)
        return unpatchify(out, self.patch, self.channels * self.out_factor, self.height, self.width)


@attrs.frozen(kw_only=True)
class DiT(Denoiser):
    """Diffusion transformer: patchify, adaLN-Zero blocks, adaptive final layer, unpatchify."""

    patch_size: int = attrs.field(default=2, validator=at_least(1), metadata=doc("side of the square patches; must divide H and W"))
    width: int = attrs.field(default=256, validator=at_least(1), metadata=doc("token width (hidden size)"))
    depth: int = attrs.field(default=6, validator=at_least(1), metadata=doc("number of transformer blocks"))
    heads: int = attrs.field(default=4, validator=at_least(1), metadata=doc("attention heads; must divide width"))
    mlp_ratio: float = attrs.field(default=4.0, validator=greater_than(0.0), metadata=doc("MLP hidden width over token width"))
    conditioning: Literal["adaln-zero", "cross-attention"] = attrs.field(
        default="adaln-zero", metadata=doc("where the class label goes: adaln-zero (added to the noise embedding) or cross-attention tokens")
    )
    tokens: int = attrs.field(default=4, validator=at_least(1), metadata=doc("condition tokens per class label (conditioning: cross-attention)"))
    embed_dim: int = attrs.field(default=64, validator=at_least(2), metadata=doc("size of the sinusoidal logSNR embedding"))
    max_period: float = attrs.field(default=1000.0, validator=greater_than(1.0), metadata=doc("longest period of the embedding, in logSNR units"))
    conditional: bool = attrs.field(default=False, metadata=doc("condition on class labels when the data has them"))
    learned_variance: bool = attrs.field(
        default=False, metadata=doc("twice the output channels: the second half feeds a learned reverse variance (improved DDPM)")
    )

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")

    def uses_labels(self, spec) -> bool:
        return self.conditional and spec.num_classes > 0

    def check_recipe(self, components) -> list[str]:
        problems = image_problems("dit", components, self.patch_size, f"patch_size {self.patch_size}")
        if not problems and self.conditioning == "cross-attention" and not labelled(self, components):
            problems.append(
                "denoiser 'dit' with conditioning 'cross-attention' attends to class-label tokens; set conditional: true "
                "with labelled data, or use conditioning 'adaln-zero'"
            )
        return problems

    def build(self, context: BuildContext) -> nn.Module:
        classes = context.spec.num_classes if self.uses_labels(context.spec) else 0
        return DiTModel(self, tuple(context.spec.shape), classes)


@hookimpl
def fundiff_register_denoisers(register):
    register("dit", DiT)
