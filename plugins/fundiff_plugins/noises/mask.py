"""Masking as a soft corruption (Daras et al. 2022, "Soft Diffusion: Score Matching for General
Corruptions", eq. 1 with C_t a diagonal 0/1 mask; the inpainting degradation of Bansal et al.
2022, "Cold Diffusion", sec. 4.2).

In fundiff's terms the forward process is x_t = alpha C(lambda) x0 + sigma eps, with
(alpha, sigma) from the recipe's chain and eps standard Gaussian (``sample``). C(lambda) is
diagonal: it multiplies each pixel (all channels alike) by a visibility in [0, 1]. The pixels
are hidden one after another in a fixed order; with N = H * W pixels and the masked fraction
m(lambda) in [0, 1], the pixel in position r of the order (r = 0 is hidden first) has

    visibility = clamp(r + 1 - N m, 0, 1)

so exactly N m pixels' worth is hidden: all pixels before position floor(N m) are zero, the
next one is fading out, the rest are untouched. The masked fraction rises with the noise
level along a ramp linear in logSNR,

    m(lambda) = clamp((logsnr_start - lambda) / (logsnr_start - logsnr_end), 0, 1),

so C is exactly the identity for lambda >= logsnr_start (the clean level included) and hides
every pixel for lambda <= logsnr_end, where x_t = sigma eps carries no information about x0.

The order (``order``):

- ``random``: a fixed random permutation of the pixels (seeded by ``seed``, the same for
  every image and every level), so the reverse process reveals pixels in a scattered order;
- ``center``: pixels hidden by increasing distance from the image centre (ties broken by
  the seeded permutation), so the hidden region is a disc that grows from the centre and
  the reverse process paints a digit from its border inwards.

The noise type provides ``"corruption-operator"`` and ``"gaussian-noise"`` (``sample`` draws
N(0, I)), but not ``"additive-noise"``: samplers that assume x_t = alpha x0 + sigma eps (ddpm,
ddim) are refused; use a sampler that handles the operator (``soft-momentum``).
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl, rng
from fundiff.components import CORRUPTION_OPERATOR, GAUSSIAN_NOISE
from fundiff.config import at_least, doc, one_of
from fundiff_plugins.noises.blur import corruption_problems


def mask_positions(height: int, width: int, order: str, seed: int) -> torch.Tensor:
    """Each pixel's position in the hiding order, shape (H, W), int64 in 0 .. H W - 1."""
    n = height * width
    tie_break = rng.uniform(seed, rng.STREAM_DATA, 0, torch.arange(n))  # float64 in (0, 1)
    if order == "random":
        key = tie_break
    else:  # center: squared distance from the centre (integers after scaling by 4), then random
        rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width).reshape(-1)
        cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width).reshape(-1)
        dist2 = (2 * rows - (height - 1)) ** 2 + (2 * cols - (width - 1)) ** 2  # 4 x squared distance, exact
        key = dist2 + tie_break  # tie_break < 1 <= the gap between distinct dist2 values
    positions = torch.empty(n, dtype=torch.int64)
    positions[torch.argsort(key)] = torch.arange(n)
    return positions.reshape(height, width)


@attrs.frozen(kw_only=True)
class Mask(Noise):
    """Pixels hidden one by one in a fixed order as the noise level rises, plus Gaussian noise."""

    provides = frozenset({CORRUPTION_OPERATOR, GAUSSIAN_NOISE})
    order: str = attrs.field(default="random", validator=one_of("random", "center"), metadata=doc("hiding order: random (seeded) or center (a growing disc)"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the pixel order"))
    logsnr_start: float = attrs.field(default=8.0, metadata=doc("logSNR at and above which no pixel is hidden"))
    logsnr_end: float = attrs.field(default=0.0, metadata=doc("logSNR at and below which every pixel is hidden"))

    def __attrs_post_init__(self) -> None:
        if not self.logsnr_end < self.logsnr_start:
            raise ValueError(f"logsnr_end ({self.logsnr_end}) must be < logsnr_start ({self.logsnr_start})")

    def masked_fraction(self, logsnr: torch.Tensor) -> torch.Tensor:
        """m(lambda) in [0, 1], monotone non-increasing in lambda, 0 at lambda = +inf."""
        return ((self.logsnr_start - logsnr) / (self.logsnr_start - self.logsnr_end)).clamp(0.0, 1.0)

    def visibility(self, logsnr: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Per-pixel visibility (B, 1, H, W) in [0, 1] at each logSNR (B,)."""
        positions = mask_positions(height, width, self.order, self.seed).to(logsnr.device)
        hidden = (height * width) * self.masked_fraction(logsnr)
        return (positions[None].to(logsnr.dtype) + 1.0 - hidden[:, None, None]).clamp(0.0, 1.0)[:, None]

    def check_recipe(self, components) -> list[str]:
        return corruption_problems("mask", components)

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        return stream.normal(draw)

    def corrupt(self, x0: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        if x0.ndim != 4:
            raise ValueError(f"mask needs images shaped (B, C, H, W), got shape {tuple(x0.shape)}")
        return x0 * self.visibility(logsnr.to(x0.device, x0.dtype), x0.shape[-2], x0.shape[-1])


@hookimpl
def fundiff_register_noises(register):
    register("mask", Mask)
