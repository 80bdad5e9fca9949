"""ParaDiGMS (Shih et al. 2023): Picard iteration over a sliding window of DDIM steps,
against sequential DDIM (eta = 0) on the same grid with the exact mixture denoiser (the
``oracle`` fixture of test_samplers_exponential.py), in float64.

Grid: uniform in logSNR from -10 to 8 on the VP chain, then the clean level.
"""

from __future__ import annotations

import pytest
import torch
from test_samplers_exponential import grid, oracle, start  # noqa: F401  (oracle is a fixture)

from fundiff.errors import FundiffError
from fundiff.testing import ROUNDINGS, U, check_sampler

STEPS = 100  # grid(99, clean=True): 99 noisy steps and the final one onto the clean level


def levels(steps: int = STEPS):
    return grid(steps - 1, -10.0, 8.0, clean=True)


@pytest.fixture(scope="module")
def sequential(registry, oracle):  # noqa: F811
    """Sequential DDIM (eta = 0) from start(256) over the 100-step grid."""
    x = start(256)
    return x, registry.build("sampler", "ddim").sample(oracle, x, levels())


def test_conformance(registry):
    """fundiff.testing.check_sampler: shapes, dtype, reproducibility and the sanity band with
    an exact Gaussian denoiser; per-sample independence is not checked (couples_batch: the
    window slides past positions settled for the whole batch)."""
    sampler = registry.build("sampler", "paradigms", steps=12, window=4)
    assert type(sampler).couples_batch
    check_sampler(sampler)


def test_zero_tolerance_is_sequential_ddim(registry, oracle, sequential):  # noqa: F811
    """tolerance = 0: a position settles only when its guess stops changing bit for bit, and
    after p sweeps from one start the first p positions are the sequential trajectory
    (x_{j+1} = x_j + d_j(x_j) is one DDIM step), so the result is sequential DDIM up to the
    rounding of writing a x + b D as x + ((a - 1) x + b D): a few U per step times the
    terms' magnitude (|x| <= 4 here, |a| <= 1), accumulated over the steps:
    ROUNDINGS * U * STEPS * 4 = 5.7e-12 (measured 4.9e-15). It needs at most STEPS sweeps
    (max_sweeps = STEPS must not be exceeded; measured 63 with W = 8: float64 Picard iterates
    also reach a bit-exact fixed point before the window forces them)."""
    x, ddim = sequential
    sampler = registry.build("sampler", "paradigms", window=8, tolerance=0.0, max_sweeps=STEPS)
    out, sweeps = sampler.sample_with_sweeps(oracle, x, levels())
    assert sweeps <= STEPS
    assert float((out - ddim).abs().max()) <= ROUNDINGS * U * STEPS * 4.0


@pytest.mark.parametrize("window", [8, 32])
@pytest.mark.parametrize("tolerance", [1e-6, 1e-4, 1e-3, 1e-2])
def test_tolerance_bounds_distance_to_ddim(registry, oracle, sequential, window, tolerance):  # noqa: F811
    """Each position is accepted once its last Picard update is at most tolerance * max|x|
    per sample; Picard's remaining error is then at most rho / (1 - rho) times that update
    (rho: the window's contraction, the sum of |a_i - 1 + b_i dD/dx| over the window, small
    on a fine grid), and the mixture's PF-ODE does not amplify it over the trajectory here.
    So the result lies within tolerance * max|x| of sequential DDIM. Measured, as fractions of
    that bound (max|x| = 3.18): W = 8: 0.002, 0.004, 0.006, 0.011 for tolerance 1e-6, 1e-4,
    1e-3, 1e-2; W = 32: 0.016, 0.020, 0.021, 0.031 (a wider window accepts larger updates)."""
    x, ddim = sequential
    out = registry.build("sampler", "paradigms", window=window, tolerance=tolerance).sample(oracle, x, levels())
    scale = float(ddim.abs().max())
    assert float((out - ddim).abs().max()) <= tolerance * scale


def test_sweeps_well_below_steps(registry, oracle, sequential):  # noqa: F811
    """Parallel rounds: on the 100-step grid the defaults (W = 8, tolerance = 1e-3) settle in
    26 sweeps and W = 32 in 11 (measured; tolerance 0 takes 63 and 30), against 100 sequential rounds; each sweep makes at
    most W evaluations (the independent ones of one window)."""
    x, _ = sequential
    for window, most in ((8, STEPS // 3), (32, STEPS // 6)):
        calls = []

        def counted(y, level, calls=calls):  # bound now: one list per window
            calls.append(level)
            return oracle(y, level)

        sampler = registry.build("sampler", "paradigms", window=window)
        _, sweeps = sampler.sample_with_sweeps(counted, x, levels())
        assert sweeps <= most, (window, sweeps)
        assert STEPS <= len(calls) <= window * sweeps


def test_callback_reports_each_step_once(registry, oracle):  # noqa: F811
    """callback(i, x, x0) is called for steps 0 .. steps - 1 in order as the window slides
    past them, and the last state reported is the result."""
    x = start(16)
    seen = []
    out = registry.build("sampler", "paradigms", window=4).sample(
        oracle, x, levels(20), callback=lambda i, y, x0: seen.append((i, y))
    )
    assert [i for i, _ in seen] == list(range(20))
    assert torch.equal(seen[-1][1], out)


def test_max_sweeps_reached_is_a_user_error(registry, oracle):  # noqa: F811
    """Fewer sweeps than the run needs: a FundiffError naming max_sweeps and tolerance."""
    sampler = registry.build("sampler", "paradigms", window=8, tolerance=0.0, max_sweeps=3)
    with pytest.raises(FundiffError, match="max_sweeps.*tolerance"):
        sampler.sample(oracle, start(8), levels(20))
