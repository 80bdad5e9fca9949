"""Multi-resolution ("pyramid") noise for images (Jonathan Whitaker 2023, "Multi-resolution
noise for diffusion model training"): white noise plus upsampled white noise at ever
coarser resolutions with geometrically discounted weights, so the perturbation destroys
low frequencies as fast as high ones.

Level 0 is N(0, I) at the full H x W resolution; level i >= 1 is N(0, I) at
(max(1, floor(H / f^i)), max(1, floor(W / f^i))), upsampled to H x W. The noise is

    eps = sum_i discount^i up_i(z_i) / sqrt(v),   v = sum_i discount^(2 i) Var[up_i(z_i)],

per pixel. Differences from Whitaker's snippet, which draws a random factor f in [2, 4) per
call and divides by the batch's empirical std: the factor is a fixed parameter and v is the
exact per-pixel variance of the linear upsampling (a sum of squared interpolation weights),
so every element is exactly N(0, 1) and a sample's noise does not depend on its batch.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from fundiff import Noise, NoiseStream, hookimpl, rng
from fundiff.components import ADDITIVE_NOISE
from fundiff.config import at_least, doc, greater_than, in_range


def _interpolation_matrix(size_in: int, size_out: int, mode: str) -> torch.Tensor:
    """The (size_out, size_in) matrix of 1-D upsampling as F.interpolate does it."""
    eye = torch.eye(size_in, dtype=torch.float64).reshape(size_in, 1, size_in)
    out = F.interpolate(eye, size=size_out, mode=mode, **({"align_corners": False} if mode == "linear" else {}))
    return out.reshape(size_in, size_out).T


@attrs.frozen(kw_only=True)
class Pyramid(Noise):
    """Gaussian noise with low-frequency energy: every element N(0, 1), neighbouring pixels
    positively correlated (the more, the closer ``discount`` is to 1).

    Works on the last two axes of a sample (H, W); leading axes (channels) get independent
    pyramids. For data that is not an image (modality other than ``images``, or fewer than
    two axes) the recipe is refused: use ``gaussian`` or ``correlated`` there.
    """

    provides = frozenset({ADDITIVE_NOISE})

    discount: float = attrs.field(
        default=0.8, validator=in_range(0.0, 1.0, high_open=True), metadata=doc("weight ratio of each coarser level")
    )
    factor: float = attrs.field(default=2.0, validator=greater_than(1.0), metadata=doc("downscaling factor between levels"))
    levels: int = attrs.field(
        default=0, validator=at_least(0), metadata=doc("coarser levels added (0: down to 1 x 1)")
    )
    mode: Literal["bilinear", "nearest"] = attrs.field(default="bilinear", metadata=doc("upsampling of coarse levels"))

    def check_recipe(self, components) -> list[str]:
        data = components.get("data")
        if data is None:
            return []
        spec = data.spec()
        if spec.modality != "images" or len(spec.shape) < 2:
            return [
                f"noise 'pyramid' needs image data (modality 'images', shape (C, H, W)), but the data has modality "
                f"'{spec.modality}' and shape {tuple(spec.shape)}; use noise 'gaussian' (or 'correlated' along an axis)"
            ]
        return []

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        sizes = [(height, width)]
        i = 1
        while sizes[-1] != (1, 1) and (self.levels == 0 or i <= self.levels):
            scale = self.factor**i
            sizes.append((max(1, int(height / scale)), max(1, int(width / scale))))
            i += 1
        return sizes

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        shape = stream.sample_shape
        if len(shape) < 2:
            raise ValueError(f"pyramid noise needs samples with at least two (H, W) axes, got shape {shape}")
        height, width = shape[-2], shape[-1]
        lead = math.prod(shape[:-2])
        batch = stream.batch_size
        sizes = self.level_sizes(height, width)
        counts = [lead * h * w for h, w in sizes]
        z = rng.normal(stream.seed, stream.stream, draw, stream.sample_ids, (sum(counts),))
        mode_1d = "linear" if self.mode == "bilinear" else "nearest"
        total = torch.zeros(batch * lead, 1, height, width, dtype=torch.float64)
        variance = torch.zeros(height, width, dtype=torch.float64)
        start = 0
        for i, ((h, w), count) in enumerate(zip(sizes, counts)):
            level = z[:, start : start + count].reshape(batch * lead, 1, h, w)
            start += count
            weight = self.discount**i
            if (h, w) != (height, width):
                options = {"align_corners": False} if self.mode == "bilinear" else {}
                level = F.interpolate(level, size=(height, width), mode=self.mode, **options)
                row_var = _interpolation_matrix(h, height, mode_1d).square().sum(1)
                col_var = _interpolation_matrix(w, width, mode_1d).square().sum(1)
                variance += weight * weight * row_var[:, None] * col_var[None, :]
            else:
                variance += weight * weight
            total += weight * level
        eps = total / variance.sqrt()
        return eps.reshape(batch, *shape).to(device=stream.device, dtype=stream.dtype)


@hookimpl
def fundiff_register_noises(register):
    register("pyramid", Pyramid)
