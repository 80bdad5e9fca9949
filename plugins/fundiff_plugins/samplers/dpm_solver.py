"""Singlestep DPM-Solver of orders 1-3 (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for
Diffusion Probabilistic Model Sampling in Around 10 Steps", sec. 3.3, Algorithms 1-2).

The probability-flow ODE of any Gaussian chain, written in lam = log(alpha / sigma) with the
noise prediction eps(x, lam) = (x - alpha D(x)) / sigma, has the exact solution (eq. 3.4)

    x_s = (alpha_s / alpha_t) x_t - alpha_s int_{lam_t}^{lam_s} e^{-lam} eps(x_lam, lam) dlam.

DPM-Solver-k expands eps in lam to order k - 1 and evaluates the weights exactly; the
derivatives come from k - 1 inner evaluations at lam_t + r h inside the step (h = lam_s -
lam_t). With eps_t at the start:

    order 1   x_s = (a_s / a_t) x - s_s (e^h - 1) eps_t            (= DDIM, Prop. 4.1)
    order 2   u   = (a_u / a_t) x - s_u (e^{r h} - 1) eps_t,  r = 1/2                (eq. 3.7)
              x_s = (a_s / a_t) x - s_s (e^h - 1) eps_t - s_s (e^h - 1) / (2 r) (eps(u) - eps_t)
    order 3   u1 at r1 = 1/3 as above; D1 = eps(u1) - eps_t;                      (Alg. 2)
              u2  = (a_2 / a_t) x - s_2 (e^{r2 h} - 1) eps_t - s_2 (r2 / r1) (phi_1(r2 h) - 1) D1,  r2 = 2/3
              x_s = (a_s / a_t) x - s_s (e^h - 1) eps_t - (s_s / r2) (phi_1(h) - 1) D2,  D2 = eps(u2) - eps_t

with phi_1(z) = (e^z - 1) / z (a, s: alpha, sigma). Third order needs r2 = 2/3 to leading
order; r1 is free. Inner levels lie on the chain of the step's end points
(``_exponential.level_between``).

``steps`` counts outer steps: the grid has ``steps + 1`` levels and each step but the last
costs ``order`` evaluations. The step onto the clean level (sigma = 0, lam = +inf) can only be
first order (the inner points would sit at infinite lam); it returns alpha_0 times the x0
estimate, as DDIM does. NFE = order * steps, or order * (steps - 1) + 1 on a grid that ends
clean. A first level with alpha = 0 (zero terminal SNR) is left by a DDIM step, the exact
limit there (``_exponential.zero_snr_start``); the solver proper starts at the next level.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import torch

from fundiff import Level, Sampler, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, in_range

from ._exponential import lam, lincomb, level_between, phi, zero_snr_start

#: inner-evaluation fractions r of each order (Lu et al. 2022, Algorithms 1-2)
FRACTIONS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def eps_of(x: torch.Tensor, x0: torch.Tensor, level: Level) -> torch.Tensor:
    """eps = (x - alpha x0) / sigma."""
    return lincomb(((1.0 / level.sigma, x), (-level.alpha / level.sigma, x0)))


def singlestep(denoise, x: torch.Tensor, x0: torch.Tensor, t: Level, s: Level, inner: Sequence[Level]) -> torch.Tensor:
    """One DPM-Solver step from t to the noisy level s with ``len(inner)`` inner evaluations.

    ``x0`` is D(x, t); ``inner`` are the levels of the inner evaluations (strictly between t
    and s), which fix r = (lam_u - lam_t) / h; its length sets the order (1 + len(inner)).
    """
    h = lam(s) - lam(t)
    eps_t = eps_of(x, x0, t)
    a = s.alpha / t.alpha
    e = -s.sigma * math.expm1(h)
    if not inner:
        return lincomb(((a, x), (e, eps_t)))
    if len(inner) == 1:
        u = inner[0]
        r = (lam(u) - lam(t)) / h
        x_u = lincomb(((u.alpha / t.alpha, x), (-u.sigma * math.expm1(r * h), eps_t)))
        d = eps_of(x_u, denoise(x_u, u), u) - eps_t
        return lincomb(((a, x), (e, eps_t), (e / (2.0 * r), d)))
    if len(inner) == 2:
        u1, u2 = inner
        r1 = (lam(u1) - lam(t)) / h
        r2 = (lam(u2) - lam(t)) / h
        x_1 = lincomb(((u1.alpha / t.alpha, x), (-u1.sigma * math.expm1(r1 * h), eps_t)))
        d1 = eps_of(x_1, denoise(x_1, u1), u1) - eps_t
        # phi_1(z) - 1 = z phi_2(z), accurate for small z
        x_2 = lincomb(((u2.alpha / t.alpha, x), (-u2.sigma * math.expm1(r2 * h), eps_t), (-u2.sigma * (r2 / r1) * r2 * h * phi(2, r2 * h), d1)))
        d2 = eps_of(x_2, denoise(x_2, u2), u2) - eps_t
        return lincomb(((a, x), (e, eps_t), (-(s.sigma / r2) * h * phi(2, h), d2)))
    raise ValueError(f"DPM-Solver steps have at most 2 inner evaluations, got {len(inner)}")


def inner_levels(t: Level, s: Level, fractions: Sequence[float]) -> list[Level]:
    """Levels at lam_t + r h for each r, on the chain of t and s."""
    return [level_between(t, s, t.logsnr + r * (s.logsnr - t.logsnr)) for r in fractions]


class _PerStep:
    """``evaluations_per_step``: the instance's order; on the class, the default order's (3)."""

    def __get__(self, instance, owner):
        return 3 if instance is None else instance.order


@attrs.frozen(kw_only=True)
class DPMSolver(Sampler):
    """Singlestep DPM-Solver-1/2/3 in noise-prediction form; ``steps`` outer steps, ``order`` evaluations each."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    evaluations_per_step = _PerStep()
    steps: int = attrs.field(default=20, validator=at_least(1), metadata=doc("outer steps; NFE = order * steps (one less per inner point on a grid ending clean: the last step is first order)"))
    order: int = attrs.field(default=3, validator=in_range(1, 3), metadata=doc("1 (= DDIM), 2 (inner point at r = 1/2) or 3 (r = 1/3, 2/3)"))

    def sample(self, denoise, x, levels, noise=None, callback=None):
        x, levels, offset = zero_snr_start(denoise, x, levels, callback)
        fractions = FRACTIONS[self.order]
        plan = [(levels[i], levels[i + 1], [] if levels[i + 1].is_clean else inner_levels(levels[i], levels[i + 1], fractions)) for i in range(len(levels) - 1)]
        for i, (t, s, inner) in enumerate(plan):
            x0 = denoise(x, t)
            x = x0 * s.alpha if s.is_clean else singlestep(denoise, x, x0, t, s, inner)
            if callback is not None:
                callback(i + offset, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpm-solver", DPMSolver)
