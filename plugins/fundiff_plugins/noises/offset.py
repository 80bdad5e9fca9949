"""Per-channel offset noise (Nicholas Guttenberg 2023, "Diffusion with offset noise"):
standard noise plus one shared normal per (sample, channel), so the model also learns to
change an image's overall brightness and colour, which i.i.d. noise at the usual schedules
barely perturbs.

    eps = (z + strength * c) / sqrt(1 + strength^2)   (normalize: true, the default)
    eps =  z + strength * c                          (normalize: false)

with z ~ N(0, I) of the sample's shape and c ~ N(0, I) of shape (C,), broadcast over the
spatial axes. Axis 0 of a sample is the channel axis (images are (C, H, W)); for data with
one axis (points), every coordinate is its own "channel" and the offset is simply more
independent Gaussian noise.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl, rng
from fundiff.components import ADDITIVE_NOISE
from fundiff.config import at_least, doc


@attrs.frozen(kw_only=True)
class Offset(Noise):
    """z + strength * c with c one normal per (sample, channel): zero mean; variance 1 per
    element when ``normalize`` is true (the default), else 1 + strength^2. Two elements of
    the same channel have correlation strength^2 / (1 + strength^2); different channels
    are independent. Every element is Gaussian.
    """

    provides = frozenset({ADDITIVE_NOISE})

    strength: float = attrs.field(default=0.1, validator=at_least(0.0), metadata=doc("std of the per-channel offset (Guttenberg: 0.1)"))
    normalize: bool = attrs.field(default=True, metadata=doc("divide by sqrt(1 + strength^2): unit variance per element"))

    @property
    def variance(self) -> float:
        """Variance of each element."""
        return 1.0 if self.normalize else 1.0 + self.strength**2

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        shape = stream.sample_shape
        if not shape:
            raise ValueError("offset noise needs samples with a channel axis, got scalar samples")
        n, channels = math.prod(shape), shape[0]
        normals = rng.normal(stream.seed, stream.stream, draw, stream.sample_ids, (n + channels,))
        z = normals[:, :n].reshape(stream.batch_size, *shape)
        c = normals[:, n:].reshape(stream.batch_size, channels, *([1] * (len(shape) - 1)))
        eps = z + self.strength * c
        if self.normalize:
            eps = eps / math.sqrt(1.0 + self.strength**2)
        return eps.to(device=stream.device, dtype=stream.dtype)


@hookimpl
def fundiff_register_noises(register):
    register("offset", Offset)
