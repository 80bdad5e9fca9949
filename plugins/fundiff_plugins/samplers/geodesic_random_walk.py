"""Reverse-time geodesic random walk with optional Langevin corrector steps, for chains whose
state lies on a manifold (De Bortoli et al. 2022, "Riemannian Score-Based Generative
Modelling", Algorithm 1 (GRW) and sec. 3.3 (predictor-corrector); survey sec. 3.2).

The forward process of a manifold chain is Brownian motion for time tau = sigma^2 (generator
Delta / 2). Its time reversal is dx = grad log p_tau(x) dtau + dW run backwards in tau
(RSGM, Thm. 1, the manifold form of Anderson 1982), so one Euler-Maruyama step on the
manifold from level t down to level s is the geodesic random walk step

    x_s = exp_x( Delta s_t(x) + sqrt(Delta) P_x z ),      Delta = sigma_t^2 - sigma_s^2,

with s_t the model's score (``level.chain.score`` from the denoiser's output), z a fresh
standard normal draw of the state's shape and P_x the projection onto the tangent space. The
last step, onto the clean level, adds no noise: x_0 = exp_x(sigma_t^2 s_t(x)) (Varadhan:
sigma^2 grad log p(x | x0) -> log_x(x0), the noise-free denoising step of Song et al. 2021).

Corrector (``corrector_steps`` = M per level, before each predictor step): Langevin dynamics
for p_t on the manifold, x <- exp_x(eps s_t(x) + sqrt(2 eps) P_x z), with the step
eps = 2 r^2 sigma_t^2 of a target signal-to-noise ratio r = ``snr`` (Song et al. 2021,
Algorithm 5, with the norms' mean squares |z|^2 = d and |s|^2 = d / sigma^2 as in the ``pc``
sampler's "expected" rule, so eps is a host float).

Every step ends in the chain's exponential map, so every intermediate state lies on the
manifold. Fresh noise draw indices: (1 + M) i + j for corrector step j at level i and
(1 + M) i + M for the predictor. The callback's x0 is exp_x(sigma_t^2 s_t(x)), the denoised
point on the manifold.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, hookimpl
from fundiff.components import MANIFOLD_STATE
from fundiff.config import at_least, doc, greater_than

#: the maps a level's chain must have for this sampler
MANIFOLD_MAPS = ("exp_map", "project_tangent", "score", "denoised")


class _EvaluationsPerStep:
    """1 + corrector_steps on an instance; on the class, the value for the default."""

    def __get__(self, obj, cls=None) -> int:
        if obj is None:
            return 1 + attrs.fields(cls).corrector_steps.default
        return 1 + obj.corrector_steps


@attrs.frozen(kw_only=True)
class GeodesicRandomWalk(Sampler):
    """Reverse geodesic random walk on the chain's manifold, with optional Langevin corrector steps."""

    requires = frozenset({MANIFOLD_STATE})
    steps: int = attrs.field(default=100, validator=at_least(1), metadata=doc("number of predictor steps"))
    corrector_steps: int = attrs.field(default=0, validator=at_least(0), metadata=doc("Langevin corrector steps per level"))
    snr: float = attrs.field(
        default=0.16, validator=greater_than(0.0), metadata=doc("target signal-to-noise ratio r of a Langevin step")
    )

    #: 1 + corrector_steps (read on the class: the default's 1)
    evaluations_per_step = _EvaluationsPerStep()

    def sample(self, denoise, x, levels, noise=None, callback=None):
        chain = levels[0].chain
        if chain is None or not all(hasattr(chain, name) for name in MANIFOLD_MAPS):
            raise ValueError(
                "geodesic-random-walk walks on a manifold: its levels must come from a chain that provides "
                f"'{MANIFOLD_STATE}' (chain.level(...) of e.g. torus or sphere), got levels of {type(chain).__name__}"
            )
        if noise is None:
            raise ValueError("geodesic-random-walk is stochastic: it needs a noise stream")
        m = self.corrector_steps
        two_r2 = 2.0 * self.snr * self.snr
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            base = (m + 1) * i
            for j in range(m):
                score = chain.score(x, denoise(x, t), t)
                eps = two_r2 * t.sigma**2
                z = chain.project_tangent(x, noise.sample(base + j))
                x = chain.exp_map(x, eps * score + math.sqrt(2.0 * eps) * z)
            score = chain.score(x, denoise(x, t), t)
            x0 = chain.denoised(x, score, t)
            if s.is_clean:
                x = x0
            else:
                delta = t.sigma**2 - s.sigma**2
                z = chain.project_tangent(x, noise.sample(base + m))
                x = chain.exp_map(x, delta * score + math.sqrt(delta) * z)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("geodesic-random-walk", GeodesicRandomWalk)
