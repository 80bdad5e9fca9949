"""Gaussian noise correlated along one axis of a sample, e.g. the frames of a video or the
steps of a sequence, as a stationary first-order autoregressive process.

Ge et al. 2023 ("Preserve your own correlation: a noise prior for video diffusion models")
show that video models train better when the noise of neighbouring frames is correlated;
they build it either from a shared plus an independent component ("mixed") or as an
autoregression along the frames ("progressive"). This module implements the progressive
form, AR(1) with coefficient ``rho`` (their alpha corresponds to rho = alpha / sqrt(1 +
alpha^2)):

    eps_0 = z_0,   eps_j = rho eps_{j-1} + sqrt(1 - rho^2) z_j,   z ~ N(0, I),

along ``axis``, independently for every other position. The process is stationary with
unit marginal variance and correlation rho^|i - j| between positions i and j of that axis.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl, rng
from fundiff.config import doc, in_range
from fundiff.components import ADDITIVE_NOISE


@attrs.frozen(kw_only=True)
class Correlated(Noise):
    """Stationary AR(1) Gaussian noise along ``axis``: zero mean, unit variance per element,
    Corr(eps_i, eps_j) = rho^|i - j| along the axis, independent across the other axes.

    ``axis`` indexes a sample's shape (0 is the first axis after the batch; negative values
    count from the end). The recurrence is evaluated in closed form, eps = L z with the
    lower-triangular L[j, i] = rho^(j - i) (times sqrt(1 - rho^2) for i > 0), in float64.
    """

    provides = frozenset({ADDITIVE_NOISE})

    rho: float = attrs.field(
        default=0.5,
        validator=in_range(-1.0, 1.0, low_open=True, high_open=True),
        metadata=doc("correlation of neighbouring positions along the axis"),
    )
    axis: int = attrs.field(default=0, metadata=doc("axis of a sample the noise is correlated along (0: first after the batch)"))

    def _axis_for(self, shape: tuple[int, ...]) -> int:
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"correlated: axis {self.axis} is out of range for samples of shape {shape}")
        return self.axis % ndim

    def check_recipe(self, components) -> list[str]:
        data = components.get("data")
        if data is None:
            return []
        shape = tuple(data.spec().shape)
        if not -len(shape) <= self.axis < len(shape):
            return [
                f"noise 'correlated' has axis {self.axis}, but a sample of the data has shape {shape} "
                f"(axes 0..{len(shape) - 1}); pick the axis of the frames"
            ]
        return []

    def mixing_matrix(self, length: int) -> torch.Tensor:
        """L (length x length, float64) with eps = L z along the axis; L L^T = [rho^|i-j|]."""
        j = torch.arange(length, dtype=torch.float64)
        lag = j[:, None] - j[None, :]
        powers = torch.where(lag >= 0, torch.tensor(self.rho, dtype=torch.float64) ** lag.clamp(min=0), torch.zeros(()))
        column_scale = torch.full((length,), math.sqrt(1.0 - self.rho * self.rho), dtype=torch.float64)
        column_scale[0] = 1.0
        return powers * column_scale[None, :]

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        shape = stream.sample_shape
        axis = self._axis_for(shape) + 1  # the batch comes first
        z = rng.normal(stream.seed, stream.stream, draw, stream.sample_ids, shape)
        mixing = self.mixing_matrix(shape[axis - 1])
        eps = torch.movedim(torch.movedim(z, axis, -1) @ mixing.T, -1, axis)
        return eps.to(device=stream.device, dtype=stream.dtype)


@hookimpl
def fundiff_register_noises(register):
    register("correlated", Correlated)
