"""A Gaussian mixture with closed-form parameters: the data set of the exact denoiser.

Because every Gaussian chain maps a Gaussian mixture to a Gaussian mixture, the
``gmm-oracle`` denoiser can compute E[x0 | x_t] exactly for this data, which makes sampler
error measurable without training.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, hookimpl, rng
from fundiff.config import at_least, doc, greater_than

GAUSSIAN_MIXTURE_DATA = "gaussian-mixture-data"


@attrs.frozen(kw_only=True)
class GaussianMixture(DataSet):
    """An isotropic Gaussian mixture: modes on a ring (in the first two dimensions) or at
    random, equal weights unless given."""

    provides = frozenset({GAUSSIAN_MIXTURE_DATA})

    n: int = attrs.field(default=20000, validator=at_least(1), metadata=doc("number of points drawn"))
    modes: int = attrs.field(default=8, validator=at_least(1), metadata=doc("number of mixture components"))
    dim: int = attrs.field(default=2, validator=at_least(1), metadata=doc("dimension of the data"))
    radius: float = attrs.field(default=2.0, validator=greater_than(0.0), metadata=doc("ring radius / scale of random means"))
    std: float = attrs.field(default=0.15, validator=greater_than(0.0), metadata=doc("std of every component"))
    layout: Literal["ring", "random"] = attrs.field(default="ring", metadata=doc("where the means lie"))
    weights: Optional[tuple[float, ...]] = attrs.field(default=None, metadata=doc("mixture weights (default equal)"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of random means and drawn points"))

    def __attrs_post_init__(self) -> None:
        if self.weights is not None:
            if len(self.weights) != self.modes:
                raise ValueError(f"weights: needs {self.modes} values (one per mode), got {len(self.weights)}")
            if min(self.weights) <= 0:
                raise ValueError("weights: every weight must be > 0")
        if self.layout == "ring" and self.dim < 2:
            raise ValueError("layout 'ring' needs dim >= 2; use layout: random for 1-D data")

    def spec(self) -> DataSpec:
        return DataSpec(shape=(self.dim,), num_classes=self.modes, modality="points")

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (K,), means (K, D), stds (K,)), float64."""
        k = torch.arange(self.modes, dtype=torch.float64)
        if self.layout == "ring":
            means = torch.zeros(self.modes, self.dim, dtype=torch.float64)
            angle = 2 * math.pi * k / self.modes
            means[:, 0] = self.radius * torch.cos(angle)
            means[:, 1] = self.radius * torch.sin(angle)
        else:
            z = rng.normal(self.seed, rng.STREAM_DATA, 100, torch.arange(self.modes), (self.dim,))
            means = self.radius * z / math.sqrt(self.dim)
        w = torch.ones(self.modes, dtype=torch.float64) if self.weights is None else torch.tensor(self.weights, dtype=torch.float64)
        return w / w.sum(), means, torch.full((self.modes,), self.std, dtype=torch.float64)

    def draw(self, n: int, seed: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples (float64) and their mode labels, from per-sample streams."""
        weights, means, stds = self.mixture()
        ids = torch.arange(offset, offset + n)
        u = rng.uniform(seed, rng.STREAM_DATA, 0, ids, (1,))[:, 0]
        labels = torch.searchsorted(torch.cumsum(weights, 0), u).clamp(max=self.modes - 1)
        z = rng.normal(seed, rng.STREAM_DATA, 1, ids, (self.dim,))
        return means[labels] + stds[labels, None] * z, labels

    def load(self) -> Data:
        x, labels = self.draw(self.n, self.seed)
        return Data(x=x.float(), labels=labels, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("gmm", GaussianMixture)
