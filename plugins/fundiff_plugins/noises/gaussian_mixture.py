"""Mixture-of-Gaussians noise with matched first two moments (Nachmani, San Roman and Wolf
2021, "Non Gaussian denoising diffusion models", arXiv:2106.07582: the mixture noise of
their diffusion process, two components in their experiments).

Each element is drawn independently from

    eps ~ sum_j w_j N(mu_j, s_j^2),   sum_j w_j mu_j = 0,   sum_j w_j (mu_j^2 + s_j^2) = 1,

so the noise has the first two moments of a standard normal (mean 0, variance 1) while its
shape (bimodality, kurtosis sum_j w_j (mu_j^4 + 6 mu_j^2 s_j^2 + 3 s_j^4)) differs.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl, rng
from fundiff.components import ADDITIVE_NOISE
from fundiff.config import doc

#: how far the moments of an unstandardised mixture may be from (0, 1)
MOMENT_TOLERANCE = 1e-9


@attrs.frozen(kw_only=True)
class GaussianMixture(Noise):
    """Per-element mixture of Gaussians, mean 0 and variance 1 (moments matched).

    ``weights`` are normalised to sum to 1. With ``standardize: true`` (the default) the
    components are shifted and scaled together so that the mixture has mean 0 and
    variance 1: with M = sum w mu and V = sum w (s^2 + mu^2) - M^2, the components used are
    N((mu_j - M) / sqrt(V), (s_j / sqrt(V))^2) — the mixture's shape is kept, its location
    and scale fixed. With ``standardize: false`` the components are used as given and must
    already have mean 0 and variance 1 (within 1e-9); otherwise the component is refused
    with the moments it has.

    Random numbers per element: three uniforms (one picks the component, two give its
    normal by Box-Muller).
    """

    provides = frozenset({ADDITIVE_NOISE})

    weights: tuple[float, ...] = attrs.field(default=(0.5, 0.5), metadata=doc("component weights (normalised to sum 1)"))
    means: tuple[float, ...] = attrs.field(default=(-0.8, 0.8), metadata=doc("component means"))
    stds: tuple[float, ...] = attrs.field(default=(0.6, 0.6), metadata=doc("component standard deviations (>= 0)"))
    standardize: bool = attrs.field(
        default=True, metadata=doc("rescale the mixture to mean 0, variance 1 (false: require it as given)")
    )

    def __attrs_post_init__(self) -> None:
        n = len(self.weights)
        if n < 1:
            raise ValueError("weights: needs at least one component")
        if len(self.means) != n or len(self.stds) != n:
            raise ValueError(
                f"weights, means and stds need one value per component; got {n}, {len(self.means)} and {len(self.stds)}"
            )
        if min(self.weights) <= 0 or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"weights: every weight must be finite and > 0, got {list(self.weights)}")
        if min(self.stds) < 0 or not all(math.isfinite(s) for s in self.stds + self.means):
            raise ValueError("means and stds must be finite and stds >= 0")
        mean, var = self.raw_moments()
        if not var > 0:
            raise ValueError("the mixture has zero variance (every std is 0 and every mean equal); it cannot be noise")
        if not self.standardize and (abs(mean) > MOMENT_TOLERANCE or abs(var - 1.0) > MOMENT_TOLERANCE):
            raise ValueError(
                f"with standardize: false the mixture must have mean 0 and variance 1, but it has mean {mean:.6g} "
                f"and variance {var:.6g}; set standardize: true to rescale it"
            )

    def raw_moments(self) -> tuple[float, float]:
        """(mean, variance) of the mixture as given (weights normalised)."""
        total = math.fsum(self.weights)
        w = [x / total for x in self.weights]
        mean = math.fsum(wj * mj for wj, mj in zip(w, self.means))
        second = math.fsum(wj * (sj * sj + mj * mj) for wj, mj, sj in zip(w, self.means, self.stds))
        return mean, second - mean * mean

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (weights, means, stds) drawn from, float64: normalised and, if asked, standardised."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        w = w / w.sum()
        mu = torch.tensor(self.means, dtype=torch.float64)
        s = torch.tensor(self.stds, dtype=torch.float64)
        if self.standardize:
            mean, var = self.raw_moments()
            scale = math.sqrt(var)
            mu, s = (mu - mean) / scale, s / scale
        return w, mu, s

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        shape = stream.sample_shape
        n = math.prod(shape)
        w, mu, s = self.components()
        u = rng.uniform(stream.seed, stream.stream, draw, stream.sample_ids, (3, n))
        cumulative = torch.cumsum(w, 0)
        which = torch.searchsorted(cumulative, u[:, 0].contiguous()).clamp(max=len(w) - 1)
        z = torch.sqrt(-2.0 * torch.log(u[:, 1])) * torch.cos((2.0 * math.pi) * u[:, 2])
        eps = mu[which] + s[which] * z
        return eps.reshape(stream.batch_size, *shape).to(device=stream.device, dtype=stream.dtype)


@hookimpl
def fundiff_register_noises(register):
    register("gaussian-mixture", GaussianMixture)
