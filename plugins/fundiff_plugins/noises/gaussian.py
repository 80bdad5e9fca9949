"""Isotropic standard Gaussian noise, the noise type of DDPM and score SDEs (survey sec. 3.1.2)."""

from __future__ import annotations

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_NOISE


@attrs.frozen(kw_only=True)
class Gaussian(Noise):
    """Standard normal noise, eps ~ N(0, I), one stream per sample."""

    provides = frozenset({GAUSSIAN_NOISE, ADDITIVE_NOISE})
    standard_normal = True  # sample is stream.normal: fused steps draw it in their kernels

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        return stream.normal(draw)


@hookimpl
def fundiff_register_noises(register):
    register("gaussian", Gaussian)
