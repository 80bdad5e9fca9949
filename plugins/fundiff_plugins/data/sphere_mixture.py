"""A mixture of von Mises-Fisher distributions on the unit sphere S^2: toy data of the
``sphere`` chain.

Mode means are the first ``modes`` points of a Fibonacci (golden-angle) lattice, spread
evenly over the sphere and fixed by the mode count. Each point is drawn exactly, by the
inverse CDF of w = <x, mu> under vMF(mu, kappa) on S^2, whose density in w is proportional
to exp(kappa w) on [-1, 1]:

    w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa,     u ~ U(0, 1),

(the p = 3 case of Wood 1994, "Simulation of the von Mises Fisher distribution", where the
rejection step is not needed), then x = w mu + sqrt(1 - w^2) (cos phi e1 + sin phi e2) with
phi ~ U(0, 2 pi) and (e1, e2) an orthonormal basis of mu's tangent plane. E<x, mu> =
coth(kappa) - 1 / kappa (the mean resultant length), used by the tests.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, hookimpl, rng
from fundiff.config import at_least, doc, greater_than


def fibonacci_directions(count: int) -> torch.Tensor:
    """``count`` unit vectors (float64) on the golden-angle spiral, z from 1 - 1/count to -(1 - 1/count)."""
    k = torch.arange(count, dtype=torch.float64)
    z = 1.0 - (2.0 * k + 1.0) / count
    phi = k * math.pi * (3.0 - math.sqrt(5.0))  # the golden angle
    r = (1.0 - z * z).sqrt()
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1)


def tangent_basis(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis (e1, e2) of the plane orthogonal to each unit vector in ``mu`` (K, 3)."""
    # cross with the coordinate axis least aligned with mu: never degenerate
    axis = torch.nn.functional.one_hot(mu.abs().argmin(dim=1), 3).to(mu.dtype)
    e1 = torch.linalg.cross(mu, axis)
    e1 = e1 / torch.linalg.vector_norm(e1, dim=1, keepdim=True)
    return e1, torch.linalg.cross(mu, e1)


def sample_vmf_cosine(u: torch.Tensor, kappa: float) -> torch.Tensor:
    """w = <x, mu> under vMF(kappa) on S^2 from uniforms u, by the exact inverse CDF
    (log(u + (1 - u) e^{-2 kappa}) through logaddexp: no overflow for large kappa)."""
    log_term = torch.logaddexp(torch.log(u), torch.log1p(-u) - 2.0 * kappa)
    return (1.0 + log_term / kappa).clamp(-1.0, 1.0)


@attrs.frozen(kw_only=True)
class SphereMixture(DataSet):
    """Equal-weight mixture of von Mises-Fisher distributions on S^2 with Fibonacci-lattice means, drawn exactly."""

    n: int = attrs.field(default=20000, validator=at_least(1), metadata=doc("number of points drawn"))
    modes: int = attrs.field(default=4, validator=at_least(1), metadata=doc("number of mixture components"))
    kappa: float = attrs.field(default=20.0, validator=greater_than(0.0), metadata=doc("concentration of each component"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the drawn points"))

    def spec(self) -> DataSpec:
        return DataSpec(shape=(3,), num_classes=self.modes, modality="points")

    def means(self) -> torch.Tensor:
        """The (K, 3) unit mean directions, float64."""
        return fibonacci_directions(self.modes)

    def draw(self, n: int, seed: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples (float64 unit vectors) and their mode labels, from per-sample streams."""
        mu = self.means()
        e1, e2 = tangent_basis(mu)
        ids = torch.arange(offset, offset + n)
        u = rng.uniform(seed, rng.STREAM_DATA, 0, ids, (3,)).to(torch.float64)
        labels = (u[:, 0] * self.modes).long().clamp(max=self.modes - 1)
        w = sample_vmf_cosine(u[:, 1], self.kappa)[:, None]
        phi = 2.0 * math.pi * u[:, 2:3]
        tangent = torch.cos(phi) * e1[labels] + torch.sin(phi) * e2[labels]
        x = w * mu[labels] + (1.0 - w * w).clamp(min=0.0).sqrt() * tangent
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True), labels

    def load(self) -> Data:
        x, labels = self.draw(self.n, self.seed)
        return Data(x=x.float(), labels=labels, spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("sphere-mixture", SphereMixture)
