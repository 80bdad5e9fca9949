"""Noise schedules: the conformance check on every registered schedule, and the built-in
discrete schedules against their papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fundiff
from fundiff.testing import check_schedule

U = float(torch.finfo(torch.float64).eps)
R = 64

_REGISTRY = fundiff.Registry.discover()
SCHEDULES = _REGISTRY.names("schedule")


@pytest.mark.parametrize("name", SCHEDULES)
def test_registered_schedule_conforms(registry, name):
    """Every registered schedule, with its default parameters, passes check_schedule:
    lambda(t) finite and strictly decreasing on [t_min, 1], t_from_logsnr its inverse, and
    a discrete schedule's continuous map on its alphas_cumprod grid."""
    check_schedule(registry.build("schedule", name))


def test_linear_matches_ddpm(registry):
    """DDPM's linear schedule (Ho et al. 2020, sec. 4): beta_t from 1e-4 to 0.02 over
    T = 1000 steps, alpha_bar_t = prod_{s<=t} (1 - beta_s). Relative tolerance T R U: each
    of the T factors of the product rounds once in either computation."""
    schedule = registry.build("schedule", "linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ref = torch.cumprod(1.0 - betas, 0)
    assert torch.equal(schedule.betas(), betas)
    assert schedule.num_steps == 1000 and schedule.t_min == 1 / 1000
    ac = schedule.alphas_cumprod()
    assert ((ac - ref).abs() <= 1000 * R * U * ref).all()
    assert abs(ac[-1].item() - 4.0358e-5) < 1e-8  # the well-known alpha_bar_T of DDPM


def improved_ddpm_alphas_cumprod(num_steps: int, offset: float, max_beta: float) -> list[float]:
    """Improved DDPM's reference (Nichol and Dhariwal 2021, eq. 17 and their
    betas_for_alpha_bar): beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta) with
    f(t) = cos(((t + s) / (1 + s)) pi / 2)^2, then alpha_bar = cumprod(1 - beta)."""

    def f(t: float) -> float:
        return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2

    out, prod = [], 1.0
    for i in range(num_steps):
        beta = min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta)
        prod *= 1 - beta
        out.append(prod)
    return out


def _cosine_tolerance(ref: torch.Tensor, num_steps: int, betas: torch.Tensor) -> torch.Tensor:
    """Relative tolerance of alpha_bar_k against the plain-float reference: each step's beta
    comes from 1 - f ratio, whose rounding is U / beta relative in beta and U in (1 - beta);
    summed over k steps, plus the product's own k roundings: R U (k + sum_{i<=k} U-terms)."""
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return R * U * (k + torch.cumsum(1.0 / (1.0 - betas), 0)) * ref


def test_cosine_matches_improved_ddpm(registry):
    """The cosine schedule (Nichol and Dhariwal 2021, eq. 17) with s = 0.008, T = 1000 and
    betas clipped at 0.999: alphas_cumprod equals their betas_for_alpha_bar reference; the
    last beta is the clipped one (f(1) = 0 would make it 1)."""
    schedule = registry.build("schedule", "cosine")
    ref = torch.tensor(improved_ddpm_alphas_cumprod(1000, 0.008, 0.999), dtype=torch.float64)
    betas = schedule.betas()
    ac = schedule.alphas_cumprod()
    assert ((ac - ref).abs() <= _cosine_tolerance(ref, 1000, betas)).all()
    assert betas[-1].item() == 0.999 and betas.max().item() == 0.999
    assert (betas[:-1] < 0.999).all()


@given(
    beta_start=st.floats(1e-5, 0.05),
    extra=st.floats(0.0, 0.5),
    num_steps=st.integers(2, 2000),
)
@example(beta_start=1e-4, extra=0.0199, num_steps=1000)
@example(beta_start=1e-5, extra=0.0, num_steps=2)
@example(beta_start=0.05, extra=0.5, num_steps=2000)
def test_linear_any_parameters(registry, beta_start, extra, num_steps):
    """For any valid (beta_start <= beta_end < 1, T >= 2) the linear schedule conforms and its
    alphas_cumprod is the cumulative product of 1 - linspace(beta_start, beta_end, T)."""
    beta_end = beta_start + extra
    schedule = registry.build("schedule", "linear", beta_start=beta_start, beta_end=beta_end, num_steps=num_steps)
    check_schedule(schedule, num_points=257)
    ref = torch.cumprod(1.0 - torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64), 0)
    tiny = torch.finfo(torch.float64).tiny  # alpha_bar may underflow to subnormals: absolute floor
    assert ((schedule.alphas_cumprod() - ref).abs() <= num_steps * R * U * ref + tiny).all()


@given(
    offset=st.floats(0.0, 0.5),
    max_beta=st.floats(0.5, 0.9999),
    num_steps=st.integers(2, 2000),
)
@example(offset=0.008, max_beta=0.999, num_steps=1000)
@example(offset=0.0, max_beta=0.9999, num_steps=2)
@example(offset=0.5, max_beta=0.5, num_steps=2000)
def test_cosine_any_parameters(registry, offset, max_beta, num_steps):
    """For any offset s in [0, 1), clip in (0, 1) and T >= 2 the cosine schedule conforms and
    matches improved DDPM's betas_for_alpha_bar reference, clipping included."""
    schedule = registry.build("schedule", "cosine", offset=offset, max_beta=max_beta, num_steps=num_steps)
    check_schedule(schedule, num_points=257)
    betas = schedule.betas()
    ref = torch.tensor(improved_ddpm_alphas_cumprod(num_steps, offset, max_beta), dtype=torch.float64)
    assert ((schedule.alphas_cumprod() - ref).abs() <= _cosine_tolerance(ref, num_steps, betas)).all()
    assert betas.max().item() <= max_beta


def test_invalid_parameters_are_refused(registry):
    """Parameters outside their domain are refused at build time with the parameter's path."""
    with pytest.raises(fundiff.RecipeError, match="beta_end"):
        registry.build("schedule", "linear", beta_start=0.02, beta_end=0.01)
    with pytest.raises(fundiff.RecipeError, match="schedule.num_steps"):
        registry.build("schedule", "cosine", num_steps=1)
    with pytest.raises(fundiff.RecipeError, match="schedule.max_beta"):
        registry.build("schedule", "cosine", max_beta=1.0)
