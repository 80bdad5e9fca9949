"""Centred, standardised Gamma noise (Nachmani, San Roman and Wolf 2021, "Non Gaussian
denoising diffusion models" / "Denoising diffusion gamma models", arXiv:2106.07582).

Their forward process adds ``g - E[g]`` with ``g ~ Gamma(k, theta)`` instead of a Gaussian;
its closed-form marginal is ``x_t = sqrt(alpha_bar_t) x0 + (g_bar_t - k_bar_t theta_t)``
with ``g_bar_t ~ Gamma(k_bar_t, theta_t)``. Here the noise type is that centred Gamma
variable standardised to unit variance,

    eps = (g - k theta) / sqrt(k theta^2),   g ~ Gamma(k, theta),

which has mean 0, variance 1, skewness 2 / sqrt(k) and kurtosis 3 + 6 / k. The scale theta
cancels in the standardisation (g / theta ~ Gamma(k, 1)), so the shape k is the only
parameter; theta only sets the variance of the unstandardised ``g - k theta``, which the
chain's sigma already sets. Unlike the paper, k does not vary with the noise level: the
noise interface draws one distribution for every level (the paper's k_bar_t grows with t
and its noise becomes more Gaussian at high noise).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Noise, NoiseStream, hookimpl, rng
from fundiff.components import ADDITIVE_NOISE
from fundiff.config import at_least, doc, greater_than

#: the smallest acceptance probability of one Marsaglia-Tsang candidate (shape a = 1;
#: it rises towards 1 as a grows: 0.973 at 1.5, 0.982 at 2, 0.992 at 4)
MIN_ACCEPTANCE = 0.95


@attrs.frozen(kw_only=True)
class Gamma(Noise):
    """eps = (g - k) / sqrt(k), g ~ Gamma(k, 1): zero mean, unit variance, skewness 2/sqrt(k).

    Gamma variates come from Marsaglia and Tsang's method (2000, "A simple method for
    generating gamma variables") applied to a shape a = k (k >= 1) or a = k + 1 (k < 1):
    with d = a - 1/3 and c = 1 / sqrt(9 d), a candidate is v = (1 + c z)^3 for a standard
    normal z, accepted when 1 + c z > 0 and log u < z^2 / 2 + d - d v + d log v for a
    uniform u; the accepted d v ~ Gamma(a, 1). For k < 1 the result is multiplied by
    u'^(1/k) with another uniform u' (Gamma(k) = Gamma(k + 1) U^(1/k)).

    Every element gets a fixed number of candidates, ``candidates``, drawn from its own
    per-sample stream all at once (vectorised, no data-dependent loop), and takes the first
    accepted one. A candidate is accepted with probability at least 0.95 for every k, so an
    element rejects all of them with probability at most 0.05^candidates (about 1e-16 for
    the default 12). Only then does the fallback apply: the last candidate's d (1 + c z)^3,
    its base clamped at 0 — a value of the right scale but not an exact Gamma draw. The
    distribution is therefore exact except on an event of probability <= 0.05^candidates
    per element.

    Random numbers per element: ``2 * candidates`` uniforms (plus one for k < 1): the first
    ``candidates`` become the candidates' normals by Box-Muller (both branches), the next
    ``candidates`` their acceptance uniforms.
    """

    provides = frozenset({ADDITIVE_NOISE})

    k: float = attrs.field(default=2.0, validator=greater_than(0.0), metadata=doc("shape of the Gamma distribution (skewness 2/sqrt(k))"))
    candidates: int = attrs.field(
        default=12,
        validator=at_least(2),
        metadata=doc("Marsaglia-Tsang candidates per element; all are rejected with probability <= 0.05^candidates"),
    )

    @property
    def _proposal_shape(self) -> float:
        return self.k if self.k >= 1.0 else self.k + 1.0

    def _uniforms(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        rows = 2 * ((self.candidates + 1) // 2) + self.candidates + (1 if self.k < 1.0 else 0)
        n = math.prod(stream.sample_shape)
        return rng.uniform(stream.seed, stream.stream, draw, stream.sample_ids, (rows, n))  # (B, rows, n)

    def proposals(self, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Marsaglia-Tsang candidates for shape a (k, or k + 1 when k < 1) from the uniforms
        of ``_uniforms``: (d v, accepted), both (B, candidates, n); d v ~ Gamma(a, 1) where
        accepted."""
        m = self.candidates
        pairs = (m + 1) // 2
        radius = torch.sqrt(-2.0 * torch.log(uniforms[:, :pairs]))
        angle = (2.0 * math.pi) * uniforms[:, pairs : 2 * pairs]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :m]
        accept_u = uniforms[:, 2 * pairs : 2 * pairs + m]
        a = self.k if self.k >= 1.0 else self.k + 1.0
        d = a - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        base = 1.0 + c * z
        positive = base > 0
        v = base.clamp(min=0.0) ** 3
        log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
        accepted = positive & (torch.log(accept_u) < 0.5 * z * z + d - d * v + d * log_v)
        return d * v, accepted

    def standard_gamma(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        """Gamma(k, 1) variates, float64 on the CPU, shape (batch, *sample_shape)."""
        uniforms = self._uniforms(stream, draw)
        values, accepted = self.proposals(uniforms)
        # the first accepted candidate; with none accepted (probability <= 0.05^candidates)
        # argmax would return 0, so the fallback takes the last candidate explicitly
        first = torch.argmax(accepted.to(torch.int8), dim=1, keepdim=True)
        first = torch.where(accepted.any(dim=1, keepdim=True), first, torch.full_like(first, self.candidates - 1))
        g = torch.gather(values, 1, first).squeeze(1)  # (B, n)
        if self.k < 1.0:
            g = g * torch.exp(torch.log(uniforms[:, -1]) / self.k)
        return g.reshape(stream.batch_size, *stream.sample_shape)

    def sample(self, stream: NoiseStream, draw: int) -> torch.Tensor:
        g = self.standard_gamma(stream, draw)
        eps = (g - self.k) / math.sqrt(self.k)
        return eps.to(device=stream.device, dtype=stream.dtype)


@hookimpl
def fundiff_register_noises(register):
    register("gamma", Gamma)
