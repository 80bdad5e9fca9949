"""Parity with k-diffusion (Crowson's reference implementations of the EDM-style samplers).

k-diffusion works in sigma space: x = x0 + sigma eps, a model returns the denoised x0, and a
sampler walks a decreasing array of sigmas ending at 0. That is fundiff's `ve` chain with
levels logSNR = -2 log sigma, so every sampler below must reproduce k-diffusion's samples on
the same sigma grid (Karras et al. 2022's rho = 7 grid, k-diffusion's own
``get_sigmas_karras``), from the same start, with the same exact float64 model (the
Gaussian-mixture posterior mean), and for the stochastic ones with the same noise: fundiff's
draws are recorded and replayed to k-diffusion's ``noise_sampler`` in the order they were
made.

Only ``k_diffusion/sampling.py`` is loaded (``fundiff.parity.kdiffusion_sampling``: the
package's ``__init__`` pulls in training and evaluation modules with many dependencies). Skipped when k-diffusion is not installed
(``scripts/setup.sh`` installs it without dependencies for the test run).

Tolerances: both sides run in float64 with the same operations up to reassociation, so the
difference is rounding: about ROUNDINGS units of float64 epsilon per step, amplified at most by
the ratio of consecutive sigmas (< 4 on this grid) over 10 steps: bound 1e-11 of the scale.
LMS included: k-diffusion integrates its Lagrange basis
polynomials with ``scipy.integrate.quad``, whose 21-point Gauss-Kronrod rule is exact for
polynomials of degree below 31, so it too differs from fundiff's closed form by rounding
only. Measured: 2e-15 to 8e-15 for every case.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from fundiff import Level, rng
from fundiff.parity import kdiffusion_sampling
from fundiff_plugins.denoisers.gmm_oracle import MixtureDenoiser

pytestmark = pytest.mark.parity

STEPS = 10
SIGMA_MIN, SIGMA_MAX = 0.02, 80.0


@pytest.fixture(scope="module")
def kd():
    module = kdiffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    return module


@pytest.fixture(scope="module")
def model(registry):
    """The exact float64 x0 of an 8-mode ring mixture, as k-diffusion's model(x, sigma) and
    as fundiff's denoise(x, level) on the ve chain."""
    weights, means, stds = registry.build("data", "gmm", modes=8, radius=2.0, std=0.5).mixture()
    mixture = MixtureDenoiser(weights, means, stds, None, None)

    def x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
        full = lambda v: torch.full((x.shape[0], 1), v, dtype=torch.float64)  # noqa: E731
        return mixture.posterior_mean(x, full(1.0), full(sigma))

    return x0


def _grid(kd, registry) -> tuple[torch.Tensor, list[Level]]:
    sigmas = kd.get_sigmas_karras(STEPS, SIGMA_MIN, SIGMA_MAX).to(torch.float64)
    chain = registry.build("chain", "ve")
    levels = [chain.level(-2.0 * math.log(s)) if s > 0 else chain.level(math.inf) for s in sigmas.tolist()]
    return sigmas, levels


class _RecordingNoise:
    """fundiff's noise source (per-sample Philox draws), remembering each draw in order."""

    def __init__(self, n: int):
        self.stream = rng.NoiseStream(7, torch.arange(n), (2,), dtype=torch.float64)
        self.draws: list[torch.Tensor] = []

    def sample(self, draw: int) -> torch.Tensor:
        z = self.stream.normal(draw)
        self.draws.append(z)
        return z


CASES = {
    # fundiff sampler (name, params) -> k-diffusion function and keyword arguments
    "euler": (("euler", {}), ("sample_euler", {})),
    "euler-ancestral": (("euler-ancestral", {"eta": 1.0}), ("sample_euler_ancestral", {"eta": 1.0})),
    "heun": (("heun", {}), ("sample_heun", {})),
    "heun-churn": (
        ("heun", {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 50.0}),
        ("sample_heun", {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ),
    "dpm2": (("dpm2", {}), ("sample_dpm_2", {})),
    "lms": (("lms", {"order": 4}), ("sample_lms", {"order": 4})),
    "dpmpp-2s-ancestral": (("dpmpp-2s-ancestral", {"eta": 1.0}), ("sample_dpmpp_2s_ancestral", {"eta": 1.0})),
    "dpmpp-2m": (("dpmpp-2m", {}), ("sample_dpmpp_2m", {})),
    "dpmpp-2m-sde": (("dpmpp-2m-sde", {"eta": 1.0}), ("sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "midpoint"})),
    "dpmpp-2m-sde-heun": (
        ("dpmpp-2m-sde", {"eta": 1.0, "solver_type": "heun"}),
        ("sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}),
    ),
    "dpmpp-3m-sde": (("dpmpp-3m-sde", {"eta": 1.0}), ("sample_dpmpp_3m_sde", {"eta": 1.0})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_samples_as_kdiffusion(kd, registry, model, case):
    (ours_name, ours_params), (theirs_name, theirs_params) = CASES[case]
    sigmas, levels = _grid(kd, registry)
    n = 256
    x = rng.normal(3, rng.STREAM_PRIOR, 0, torch.arange(n), (2,)) * SIGMA_MAX
    noise = _RecordingNoise(n)
    sampler = registry.build("sampler", ours_name, **ours_params)
    ours = sampler.sample(lambda y, level: model(y, level.sigma), x.clone(), levels, noise)

    replay = iter(noise.draws)

    def noise_sampler(sigma, sigma_next):
        return next(replay)

    kwargs = dict(theirs_params)
    if "noise_sampler" in inspect.signature(getattr(kd, theirs_name)).parameters:
        kwargs["noise_sampler"] = noise_sampler

    def denoised(y, sigma):
        return model(y, float(sigma.reshape(-1)[0]))

    if theirs_name == "sample_heun" and theirs_params.get("s_churn"):
        # k-diffusion's Heun draws churn noise with torch.randn_like at every step and uses it
        # where S_tmin <= sigma <= S_tmax; fundiff draws only there: replay ours at those steps
        original = torch.randn_like
        churned = iter([theirs_params["s_tmin"] <= s <= theirs_params["s_tmax"] for s in sigmas[:-1].tolist()])
        torch.randn_like = lambda t, **kw: next(replay) if next(churned) else torch.zeros_like(t)  # type: ignore[assignment]
        try:
            theirs = getattr(kd, theirs_name)(denoised, x.clone(), sigmas, disable=True, **kwargs)
        finally:
            torch.randn_like = original
    else:
        theirs = getattr(kd, theirs_name)(denoised, x.clone(), sigmas, disable=True, **kwargs)
    assert next(replay, None) is None, "k-diffusion used fewer noise draws than fundiff made"
    scale = 1.0 + float(theirs.abs().max())
    tol = 1e-11
    diff = float((ours - theirs).abs().max())
    assert diff < tol * scale, f"{case}: max |fundiff - k-diffusion| = {diff:.3g} (bound {tol * scale:.3g})"
