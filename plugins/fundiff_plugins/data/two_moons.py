"""Two interleaving half circles in 2-D, the classic toy data set for generative models."""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Data, DataSet, DataSpec, hookimpl, rng
from fundiff.config import at_least, doc


@attrs.frozen(kw_only=True)
class TwoMoons(DataSet):
    """Two interleaving half circles with Gaussian jitter, standardised per dimension."""

    n: int = attrs.field(default=20000, validator=at_least(1), metadata=doc("number of points"))
    noise: float = attrs.field(default=0.05, validator=at_least(0.0), metadata=doc("std of the Gaussian jitter"))
    standardize: bool = attrs.field(default=True, metadata=doc("shift and scale to zero mean, unit variance per dimension"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the generated points"))

    def spec(self) -> DataSpec:
        return DataSpec(shape=(2,), num_classes=2, modality="points")

    def load(self) -> Data:
        ids = torch.arange(self.n)
        u = rng.uniform(self.seed, rng.STREAM_DATA, 0, ids, (1,))[:, 0]
        jitter = rng.normal(self.seed, rng.STREAM_DATA, 1, ids, (2,))
        upper = ids % 2 == 0  # alternate moons so any prefix is balanced
        angle = math.pi * u
        x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        points = torch.stack([x, y], dim=1) + self.noise * jitter
        if self.standardize:
            points = (points - points.mean(0)) / points.std(0)
        return Data(x=points.float(), labels=(~upper).long(), spec=self.spec())


@hookimpl
def fundiff_register_data(register):
    register("two-moons", TwoMoons)
