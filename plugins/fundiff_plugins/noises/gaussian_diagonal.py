"""Non-isotropic Gaussian noise with per-dimension scales, eps ~ N(0, diag(s^2)) (survey sec.
3.1.2: noise shaped to the data's per-dimension statistics instead of N(0, I)).

The scales are given (``scales``: one per element of a sample, in C order) or estimated
from the data (``from_data: true``): the per-dimension standard deviation of the training
set, so that dimensions in which the data varies little are also perturbed little.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl
from fundiff.components import ADDITIVE_NOISE
from fundiff.config import doc, in_range


@attrs.frozen(kw_only=True)
class GaussianDiagonal(Noise):
    """eps_d = s_d z_d with z ~ N(0, I): zero mean, variance s_d^2 in dimension d.

    Normalisation (``normalize: true``, the default): the scales are divided by their root
    mean square, so the *mean* variance over the dimensions of a sample is exactly 1 — the
    total noise energy, and hence the average signal-to-noise ratio each noise level stands
    for, is that of isotropic N(0, I) noise; only its distribution across dimensions
    changes. With ``normalize: false`` given scales are used as they are (variance s_d^2).

    ``from_data: true`` estimates s_d as the standard deviation of dimension d over the data
    set (float64, unbiased), floored at ``min_scale`` times their root mean square so that
    a constant dimension (an image border, say) still gets some noise, then normalised as
    above when ``normalize`` is true. ``bind(data)`` returns a copy holding those scales
    (``from_data: false, scales: [...]``); the estimate is deterministic, so a run rebuilt
    for sampling draws the same noise. Unbound, ``from_data: true`` refuses to draw.

    With neither ``scales`` nor ``from_data`` every scale is 1: the same draws as
    ``gaussian``.
    """

    provides = frozenset({ADDITIVE_NOISE})
    needs_data = True  # only used when from_data is true; bind() returns self otherwise

    scales: Optional[tuple[float, ...]] = attrs.field(
        default=None, metadata=doc("per-dimension standard deviations, one per element of a sample (C order)")
    )
    from_data: bool = attrs.field(default=False, metadata=doc("estimate the scales as the data's per-dimension std"))
    normalize: bool = attrs.field(default=True, metadata=doc("divide the scales by their RMS: mean variance 1"))
    min_scale: float = attrs.field(
        default=1e-2,
        validator=in_range(0.0, 1.0, low_open=True),
        metadata=doc("with from_data: floor of each estimated scale, relative to their RMS"),
    )

    def __attrs_post_init__(self) -> None:
        if self.scales is not None:
            if self.from_data:
                raise ValueError("give either scales or from_data: true, not both")
            if not self.scales:
                raise ValueError("scales: needs one value per element of a sample, got an empty list")
            if not all(math.isfinite(s) and s > 0 for s in self.scales):
                raise ValueError(f"scales: every scale must be finite and > 0, got {list(self.scales)}")

    def check_recipe(self, components) -> list[str]:
        data = components.get("data")
        if data is None or self.scales is None:
            return []
        numel = data.spec().numel
        if len(self.scales) != numel:
            return [
                f"noise 'gaussian-diagonal' has {len(self.scales)} scales but a sample of the data has {numel} "
                f"elements (shape {tuple(data.spec().shape)}); give one scale per element or use from_data: true"
            ]
        return []

    def bind(self, data) -> "GaussianDiagonal":
        if not self.from_data:
            return self
        x = data.x.to(torch.float64).reshape(data.x.shape[0], -1)
        if x.shape[0] < 2:
            raise ValueError("gaussian-diagonal with from_data: true needs at least 2 data points to estimate scales")
        std = x.std(dim=0)
        rms = std.square().mean().sqrt()
        if not rms > 0:
            raise ValueError("gaussian-diagonal with from_data: true: the data is constant, its scales are all 0")
        std = std.clamp(min=self.min_scale * float(rms))
        return attrs.evolve(self, from_data=False, scales=tuple(std.tolist()))

    def scale_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The scales used for samples of ``shape``, float64, after normalisation."""
        n = math.prod(shape)
        if self.from_data:
            raise ValueError(
                "gaussian-diagonal with from_data: true must be bound to the data first "
                "(noise.bind(data); the pipeline does this)"
            )
        if self.scales is None:
            return torch.ones(shape, dtype=torch.float64)
        if len(self.scales) != n:
            raise ValueError(f"gaussian-diagonal has {len(self.scales)} scales, but samples of shape {shape} have {n} elements")
        s = torch.tensor(self.scales, dtype=torch.float64)
        if self.normalize:
            s = s / s.square().mean().sqrt()
        return s.reshape(shape)

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        scale = self.scale_tensor(stream.sample_shape).to(device=stream.device, dtype=stream.dtype)
        return stream.normal(draw) * scale


@hookimpl
def fundiff_register_noises(register):
    register("gaussian-diagonal", GaussianDiagonal)
