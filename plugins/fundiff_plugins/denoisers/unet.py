"""The DDPM / ADM U-Net for images (C, H, W): Ho et al. 2020 (appendix B, the PixelCNN++-style
U-Net with GroupNorm residual blocks and self-attention at 16x16) with the improvements of
Dhariwal and Nichol 2021 (sec. 3: several attention heads, attention at chosen
resolutions, and adaptive group normalisation AdaGN(h, y) = y_s GroupNorm(h) + y_b, where
(y_s, y_b) is a linear projection of the noise-level (+ class) embedding).

Layout: a 3x3 input convolution; per level l (feature maps of size H / 2^l) ``blocks``
residual blocks of ``channels * channel_mult[l]`` channels, each followed by attention when
the level's height is in ``attention_resolutions``, and a stride-2 convolution between levels;
a middle of residual block, attention, residual block (always with attention); the mirror
image upwards with ``blocks + 1`` residual blocks per level, each taking the matching
downward activation concatenated along channels, and nearest-neighbour upsampling plus a
3x3 convolution between levels; GroupNorm, SiLU and a zero-initialised 3x3 output
convolution. As in ADM, the last convolution of every residual block, the output
projection of every attention layer and the output convolution start at zero, so a fresh
network is the identity along its residual paths and outputs zeros.

The noise level is the logSNR, clamped and embedded with sinusoids (``mlp.py``) and a
two-layer MLP to ``4 * channels``. ``conditioning`` selects how the embedding and the class
label enter:

- ``add``: the label embedding is added to the noise embedding; each residual block adds a
  projection of it to its features after the first convolution (DDPM);
- ``adagn``: as ``add``, but each residual block modulates its second GroupNorm with
  (1 + scale, shift) projected from the embedding (ADM's AdaGN, the default);
- ``cross-attention``: the noise enters by AdaGN; the label becomes ``tokens`` learned
  tokens that every attention layer cross-attends to (as latent diffusion, Rombach et al.
  2022, does with text tokens);
- ``concat``: the noise enters by AdaGN; the condition is an image concatenated to the input
  along channels (SR3-style conditioning, Saharia et al. 2021). With class labels the image
  is a learned ``condition_channels x H x W`` map per class; a float tensor of shape
  (B, condition_channels, H, W) passed as ``cond`` from Python is concatenated as it is.

All four work with class labels (the label -1, and ``cond=None``, select the null
embedding that classifier-free guidance drops to). ``add`` and ``adagn`` also work without
labels; ``cross-attention`` and ``concat`` need them in a recipe (the engine's only
condition is the class label) and are refused otherwise.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from fundiff import BuildContext, Denoiser, hookimpl
from fundiff.config import at_least, doc, greater_than, in_range

from ._layers import Attention, NoiseEmbedding, VarianceOutput, image_problems, labelled, null_labels

LABEL_MODES = ("cross-attention", "concat")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, embedding injection, GroupNorm-SiLU-dropout-conv (zero-init), plus
    the skip (identity, or a 1x1 convolution when the channel count changes)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:  # AdaGN: (1 + y_s) GroupNorm(h) + y_b
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:  # DDPM: add the embedding, then normalise
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (GroupNorm first, zero-init output, residual), then,
    with a context, cross-attention to the condition tokens in the same way."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: Optional[int]):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, heads, zero_out=True)
        self.cross = None
        if context_dim is not None:
            self.cross_norm = nn.GroupNorm(groups, channels)
            self.cross = Attention(channels, heads, context_dim=context_dim, zero_out=True)

    @staticmethod
    def _tokens(h: torch.Tensor) -> torch.Tensor:
        return h.flatten(2).transpose(1, 2)  # (B, H*W, C)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, hh, ww = x.shape
        x = x + self.attn(self._tokens(self.norm(x))).transpose(1, 2).reshape(b, c, hh, ww)
        if self.cross is not None:
            x = x + self.cross(self._tokens(self.cross_norm(x)), context).transpose(1, 2).reshape(b, c, hh, ww)
        return x


class Downsample(nn.Conv2d):
    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetModel(VarianceOutput):
    def __init__(self, unet: "UNet", shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        cin, height, width = shape
        self.learned_variance = unet.learned_variance
        self.conditioning = unet.conditioning
        self.num_classes = num_classes
        self.shape = shape
        ch = unet.channels
        emb_dim = 4 * ch
        self.noise_embedding = NoiseEmbedding(unet.embed_dim, unet.max_period, emb_dim)
        scale_shift = unet.conditioning != "add"
        groups, heads, dropout = unet.num_groups, unet.heads, unet.dropout
        self.class_embedding = self.context = self.condition_image = None
        self.condition_channels = 0
        context_dim = None
        if num_classes > 0 and unet.conditioning in ("add", "adagn"):
            self.class_embedding = nn.Embedding(num_classes + 1, emb_dim)
        elif num_classes > 0 and unet.conditioning == "cross-attention":
            context_dim = emb_dim
            self.tokens = unet.tokens
            self.context = nn.Embedding(num_classes + 1, unet.tokens * emb_dim)
        if unet.conditioning == "concat":
            self.condition_channels = unet.condition_channels
            if num_classes > 0:
                self.condition_image = nn.Embedding(num_classes + 1, unet.condition_channels * height * width)
        self.input = nn.Conv2d(cin + self.condition_channels, ch, 3, padding=1)

        def res(a: int, b: int) -> ResBlock:
            return ResBlock(a, b, emb_dim, groups, dropout, scale_shift)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, heads, groups, context_dim)

        self.down = nn.ModuleList()
        skips = [ch]
        current, size = ch, height
        levels = len(unet.channel_mult)
        for level, mult in enumerate(unet.channel_mult):
            for _ in range(unet.blocks):
                layers = nn.ModuleList([res(current, ch * mult)])
                current = ch * mult
                if size in unet.attention_resolutions:
                    layers.append(attn(current))
                self.down.append(layers)
                skips.append(current)
            if level < levels - 1:
                self.down.append(nn.ModuleList([Downsample(current)]))
                skips.append(current)
                size //= 2
        self.middle = nn.ModuleList([res(current, current), attn(current), res(current, current)])
        #: channels of :meth:`encode`'s features: the skip tensors, then the middle block's output
        self.feature_channels = (*skips, current)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(unet.channel_mult))):
            for i in range(unet.blocks + 1):
                layers = nn.ModuleList([res(current + skips.pop(), ch * mult)])
                current = ch * mult
                if size in unet.attention_resolutions:
                    layers.append(attn(current))
                if level > 0 and i == unet.blocks:
                    layers.append(Upsample(current))
                    size *= 2
                self.up.append(layers)
        self.out_norm = nn.GroupNorm(groups, current)
        self.out = _zero(nn.Conv2d(current, cin * self.out_factor, 3, padding=1))

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(self, x, logsnr, cond=None, return_variance: bool = False, residuals=None):
        """As every denoiser; ``residuals`` (one tensor per :attr:`feature_channels` entry, e.g.
        from a ControlNet) are added to the skip connections and the middle block's output."""
        if residuals is None:
            return super().forward(x, logsnr, cond, return_variance)
        raw = self.network(x, logsnr, cond, residuals).reshape(x.shape[0], self.out_factor, *x.shape[1:])
        if not return_variance:
            return raw[:, 0]
        return raw[:, 0], (raw[:, 1] if self.learned_variance else None)

    def copy_encoder(self) -> "UNetModel":
        """A trainable deep copy of the embeddings, input convolution, down path and middle
        block (the decoder left out): run it with :meth:`encode`."""
        encoder = copy.deepcopy(self)
        encoder.up = nn.ModuleList()
        encoder.out_norm = encoder.out = None
        return encoder.requires_grad_(True)

    def encode(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor], input_residual: Optional[torch.Tensor] = None):
        """``(features, emb, context)``: the skip tensors (input convolution, then each down
        stage) followed by the middle block's output; ``input_residual`` is added to the input
        convolution's output (where a ControlNet injects its condition)."""
        batch = x.shape[0]
        emb = self.noise_embedding(logsnr, x.dtype)
        context = None
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(null_labels(cond, batch, self.num_classes, x.device))
        if self.context is not None:
            tokens = self.context(null_labels(cond, batch, self.num_classes, x.device))
            context = tokens.reshape(batch, self.tokens, -1)
        if self.condition_channels:
            if cond is not None and cond.is_floating_point():  # an image condition given from Python
                image = cond.to(x.dtype)
            elif self.condition_image is not None:
                image = self.condition_image(null_labels(cond, batch, self.num_classes, x.device))
                image = image.reshape(batch, self.condition_channels, *x.shape[2:])
            else:
                image = x.new_zeros(batch, self.condition_channels, *x.shape[2:])
            x = torch.cat([x, image], dim=1)
        h = self.input(x)
        if input_residual is not None:
            h = h + input_residual.to(h.dtype)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, context)
            hs.append(h)
        return hs + [self._run(self.middle, h, emb, context)], emb, context

    def network(self, x: torch.Tensor, logsnr: torch.Tensor, cond: Optional[torch.Tensor], residuals=None) -> torch.Tensor:
        features, emb, context = self.encode(x, logsnr, cond)
        if residuals is not None:
            if len(residuals) != len(features):
                raise ValueError(f"residuals: expected {len(features)} tensors (feature_channels), got {len(residuals)}")
            features = [f + r.to(f.dtype) for f, r in zip(features, residuals)]
        hs, h = features[:-1], features[-1]
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(F.silu(self.out_norm(h)))


def _positive_tuple(instance, attribute, value) -> None:
    if len(value) == 0 or any(v < 1 for v in value):
        raise ValueError(f"must be a non-empty list of integers >= 1, got {list(value)}")


def _sizes(instance, attribute, value) -> None:
    if any(v < 1 for v in value):
        raise ValueError(f"must be feature-map heights >= 1, got {list(value)}")


@attrs.frozen(kw_only=True)
class UNet(Denoiser):
    """DDPM/ADM U-Net: GroupNorm residual blocks, AdaGN conditioning, multi-head attention."""

    channels: int = attrs.field(default=64, validator=at_least(1), metadata=doc("channels at the first level (ADM's model_channels)"))
    channel_mult: tuple[int, ...] = attrs.field(
        default=(1, 2, 2), validator=_positive_tuple, metadata=doc("channel multiplier per level; one level per entry, each but the last halves H and W")
    )
    blocks: int = attrs.field(default=2, validator=at_least(1), metadata=doc("residual blocks per level on the way down (one more on the way up)"))
    attention_resolutions: tuple[int, ...] = attrs.field(
        default=(), validator=_sizes, metadata=doc("feature-map heights at which self-attention follows each residual block (the middle always has attention)")
    )
    heads: int = attrs.field(default=4, validator=at_least(1), metadata=doc("attention heads"))
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0, high_open=True), metadata=doc("dropout in the residual blocks"))
    num_groups: int = attrs.field(default=32, validator=at_least(1), metadata=doc("GroupNorm groups; must divide every level's channels"))
    conditioning: Literal["add", "adagn", "cross-attention", "concat"] = attrs.field(
        default="adagn", metadata=doc("how noise level and labels enter: add | adagn | cross-attention | concat (see the module docs)")
    )
    tokens: int = attrs.field(default=4, validator=at_least(1), metadata=doc("condition tokens per class label (conditioning: cross-attention)"))
    condition_channels: int = attrs.field(default=1, validator=at_least(1), metadata=doc("channels of the condition image (conditioning: concat)"))
    embed_dim: int = attrs.field(default=64, validator=at_least(2), metadata=doc("size of the sinusoidal logSNR embedding"))
    max_period: float = attrs.field(default=1000.0, validator=greater_than(1.0), metadata=doc("longest period of the embedding, in logSNR units"))
    conditional: bool = attrs.field(default=False, metadata=doc("condition on class labels when the data has them"))
    learned_variance: bool = attrs.field(
        default=False, metadata=doc("twice the output channels: the second half feeds a learned reverse variance (improved DDPM)")
    )

    def __attrs_post_init__(self) -> None:
        for mult in self.channel_mult:
            width = self.channels * mult
            if width % self.num_groups:
                raise ValueError(
                    f"num_groups {self.num_groups} must divide the channels of every level, but channels * channel_mult = {width}"
                )
            if width % self.heads:
                raise ValueError(f"heads {self.heads} must divide the channels of every level, but channels * channel_mult = {width}")

    def uses_labels(self, spec) -> bool:
        return self.conditional and spec.num_classes > 0

    def check_recipe(self, components) -> list[str]:
        downsamplings = len(self.channel_mult) - 1
        problems = image_problems(
            "unet", components, 2**downsamplings, f"{downsamplings} halvings for the {len(self.channel_mult)} levels of channel_mult"
        )
        if problems:
            return problems
        data = components.get("data")
        if data is not None and self.attention_resolutions:
            height = data.spec().shape[1]
            sizes = [height // 2**level for level in range(len(self.channel_mult))]
            missing = [r for r in self.attention_resolutions if r not in sizes]
            if missing:
                problems.append(
                    f"denoiser 'unet': attention_resolutions {missing} match no level; the feature maps have heights "
                    f"{sizes} for this data and channel_mult"
                )
        if self.conditioning in LABEL_MODES and not labelled(self, components):
            problems.append(
                f"denoiser 'unet' with conditioning '{self.conditioning}' conditions on class labels; set conditional: true "
                "with labelled data, or use conditioning 'adagn' or 'add'"
            )
        return problems

    def build(self, context: BuildContext) -> nn.Module:
        classes = context.spec.num_classes if self.uses_labels(context.spec) else 0
        return UNetModel(self, tuple(context.spec.shape), classes)


@hookimpl
def fundiff_register_denoisers(register):
    register("unet", UNet)
