"""A wrapped Gaussian mixture on the torus T^2 = [-pi, pi)^2: toy data of the ``torus`` chain.

Mode k's mean lies on the (1, 2) torus knot, mu_k = wrap(2 pi k / K + phase, 2 (2 pi k / K)
+ phase), so consecutive modes differ by (2 pi / K, 4 pi / K) and, for the default phase, one
mode sits on the seam, at the corner (-pi, -pi) (a model that ignores periodicity splits it in four).
Each point is wrap(mu_k + std eps): the wrapped normal, which is exactly the ``torus``
chain's perturbation kernel at sigma = std, so the data perturbed to level sigma are again a
wrapped Gaussian mixture with std sqrt(std^2 + sigma^2) (``mixture()`` gives its parameters).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, hookimpl, rng
from fundiff.config import at_least, doc, greater_than


def _wrap(angles: torch.Tensor) -> torch.Tensor:
    wrapped = torch.remainder(angles + math.pi, 2.0 * math.pi) - math.pi
    return torch.where(wrapped >= math.pi, wrapped - 2.0 * math.pi, wrapped)


@attrs.frozen(kw_only=True)
class TorusMixture(DataSet):
    """Equal-weight wrapped Gaussian mixture on T^2 with means on a (1, 2) torus knot."""

    n: int = attrs.field(default=20000, validator=at_least(1), metadata=doc("number of points drawn"))
    modes: int = attrs.field(default=4, validator=at_least(1), metadata=doc("number of mixture components"))
    std: float = attrs.field(default=0.3, validator=greater_than(0.0), metadata=doc("std of each component before wrapping"))
    phase: float = attrs.field(default=math.pi, metadata=doc("angle added to both coordinates of every mean"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the drawn points"))

    def spec(self) -> DataSpec:
        return DataSpec(shape=(2,), num_classes=self.modes, modality="points")

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (K,), means (K, 2) in [-pi, pi), stds (K,)), float64."""
        angle = 2.0 * math.pi * torch.arange(self.modes, dtype=torch.float64) / self.modes
        means = _wrap(torch.stack([angle + self.phase, 2.0 * angle + self.phase], dim=1))
        weights = torch.full((self.modes,), 1.0 / self.modes, dtype=torch.float64)
        return weights, means, torch.full((self.modes,), self.std, dtype=torch.float64)

    def draw(self, n: int, seed: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples (float64, wrapped) and their mode labels, from per-sample streams."""
        _, means, stds = self.mixture()
        ids = torch.arange(offset, offset + n)
        u = rng.uniform(seed, rng.STREAM_DATA, 0, ids, (1,))[:, 0]
        labels = (u * self.modes).long().clamp(max=self.modes - 1)
        z = rng.normal(seed, rng.STREAM_DATA, 1, ids, (2,))
        return _wrap(means[labels] + stds[labels, None] * z), labels

    def load(self) -> Data:
        x, labels = self.draw(self.n, self.seed)
        return Data(x=x.float(), labels=labels, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("torus-mixture", TorusMixture)
