"""Shared pieces of the stochastic samplers (not a design: no entry point, nothing registered).

``noise_field()`` is the ``noise`` parameter of the SDE samplers: ``fresh`` draws each step's
noise from the recipe's noise type (``noise.sample(draw)``, per-sample streams), ``brownian``
takes normalised increments of a per-sample Brownian tree (:mod:`fundiff.brownian`), so that
grids of different sizes follow the same Brownian path. A tree is Gaussian, so
``brownian_needs_gaussian`` refuses it with a noise type that is not i.i.d. Gaussian.
"""

from __future__ import annotations

import math

import attrs

from fundiff import noiselevel
from fundiff.components import GAUSSIAN_NOISE
from fundiff.config import doc, one_of


def noise_field():
    return attrs.field(
        default="fresh",
        validator=one_of("fresh", "brownian"),
        metadata=doc("per-step noise: fresh draws of the recipe's noise type, or brownian (one Brownian-tree path per sample, Gaussian)"),
    )


def brownian_needs_gaussian(sampler, components) -> list[str]:
    noise = components.get("noise")
    if sampler.noise == "brownian" and noise is not None and GAUSSIAN_NOISE not in type(noise).provides:
        return [
            f"sampler noise 'brownian' draws Gaussian Brownian increments, but the recipe's noise type "
            f"{type(noise).__name__} does not provide '{GAUSSIAN_NOISE}'; use noise: fresh, or a Gaussian noise type"
        ]
    return []




#: a level between two grid levels, on their chain (fundiff.noiselevel.level_between)
inner_level = noiselevel.level_between


def phi2(x: float) -> float:
    """1 - (1 - e^-x) / x = x/2! - x^2/3! + ... (k-diffusion's ``phi_2`` of the (2M, 3M) SDE
    samplers, argument h_eta = (1 + eta) h); the series below |x| < 1 avoids the cancellation."""
    if abs(x) < 1.0:
        return _alternating_series(x, 2)
    return 1.0 + math.expm1(-x) / x


def phi3(x: float) -> float:
    """phi2(x) / x - 1/2 = -x/3! + x^2/4! - ... (k-diffusion's ``phi_3``)."""
    if abs(x) < 1.0:
        return -_alternating_series(x, 3)
    return phi2(x) / x - 0.5


def _alternating_series(x: float, start: int) -> float:
    """sum_{j >= 1} (-1)^(j + 1) x^j / (j + start - 1)!"""
    total, term, j = 0.0, x / math.factorial(start), 1
    while True:
        total += term
        j += 1
        term *= -x / (j + start - 1)
        if abs(term) <= 1e-17 * abs(total) or term == 0.0:
            return total


def refuse_zero_terminal_snr(name: str, components, why: str) -> list[str]:
    """A problem when the recipe's schedule reaches zero SNR (logSNR(1) = -inf, alpha = 0)."""
    schedule = components.get("schedule")
    if schedule is not None and schedule.reaches_zero_snr():
        return [
            f"sampler '{name}' cannot start at zero terminal SNR (schedule {type(schedule).__name__} has logSNR = -inf "
            f"at t = 1): {why}; use euler-ancestral, dpmpp-2m-sde or dpmpp-3m-sde, or a schedule with a finite end"
        ]
    return []
