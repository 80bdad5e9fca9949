"""Exponential-integrator samplers (DPM-Solver family, UniPC, DEIS) against the exact
denoiser of a Gaussian mixture, in float64 (no training).

Tolerances: ``U`` is float64's machine epsilon. Identities between two samplers hold up to
the rounding of a few operations per step, bounded by ``ROUNDINGS * U`` times the sum of the
magnitudes of the terms each update adds (the update's own condition number). Convergence
slopes are measured on a grid uniform in logSNR from -14 to 4 on the VP chain, N = 48, 96,
192 steps, against a float64 reference (singlestep DPM-Solver-3 with 768 steps, whose own
error, estimated from 384 steps, is 1/30 or less of every error measured, which moves a
fitted slope by at most 2 * (1/30) / ln 2 / 2 ~ 0.05).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fundiff import Level, noiselevel, rng
from fundiff.testing import ROUNDINGS, U, check_sampler
from fundiff_plugins.denoisers.gmm_oracle import MixtureDenoiser

NAMES = ("dpm-solver", "dpm-solver-fast", "dpm-solver-adaptive", "dpmpp-2m", "dpmpp-3m", "unipc", "deis")
LO, HI = -14.0, 4.0  # logSNR range of the convergence grids
NS = (48, 96, 192)


def vp(logsnr: float) -> Level:
    alpha, sigma = noiselevel.vp_alpha_sigma(logsnr)
    return Level(logsnr, alpha, sigma if logsnr != math.inf else 0.0)


def grid(n: int, lo: float = LO, hi: float = HI, clean: bool = False) -> list[Level]:
    levels = [vp(lo + (hi - lo) * i / n) for i in range(n + 1)]
    return levels + [vp(math.inf)] if clean else levels


@pytest.fixture(scope="module")
def oracle(registry):
    """denoise(x, level): E[x0 | x] for an 8-mode ring mixture (std 0.5), float64."""
    weights, means, stds = registry.build("data", "gmm", modes=8, radius=2.0, std=0.5).mixture()
    model = MixtureDenoiser(weights, means, stds, None, None)

    def denoise(x: torch.Tensor, level: Level) -> torch.Tensor:
        full = lambda v: torch.full((x.shape[0], 1), v, dtype=torch.float64)  # noqa: E731
        return model.posterior_mean(x.to(torch.float64), full(level.alpha), full(level.sigma)).to(x.dtype)

    return denoise


def start(n: int, seed: int = 0) -> torch.Tensor:
    return rng.normal(seed, rng.STREAM_PRIOR, 0, torch.arange(n), (2,))


@pytest.fixture(scope="module")
def reference(registry, oracle):
    """The float64 PF-ODE solution from ``start(64)`` over ``grid``, and its estimated error."""
    x = start(64)
    fine = registry.build("sampler", "dpm-solver", order=3).sample(oracle, x, grid(768))
    coarse = registry.build("sampler", "dpm-solver", order=3).sample(oracle, x, grid(384))
    # third order: the 768-step error is ~ |coarse - fine| / (2^3 - 1)
    return x, fine, float((coarse - fine).abs().max()) / 7.0


# --------------------------------------------------------------------------------------
# Conformance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_conformance(registry, name):
    """fundiff.testing.check_sampler: shapes, dtype, reproducibility, per-sample independence
    (not for the adaptive solver, whose error estimate is a maximum over the batch) and the
    sanity band with an exact Gaussian denoiser."""
    sampler = registry.build("sampler", name, steps=12)
    check_sampler(sampler, per_sample=name != "dpm-solver-adaptive")


@pytest.mark.parametrize(
    "name,params",
    [("dpm-solver", {"order": 3}), ("dpm-solver-fast", {}), ("dpmpp-2m", {}), ("dpmpp-3m", {}), ("unipc", {"order": 3}), ("deis", {"variant": "lambdaAB"})],
)
def test_float32_follows_float64(registry, oracle, name, params):
    """The samplers keep the input dtype, and float32 gives the float64 result up to float32
    rounding: 20 steps of a few operations each, at most ~1e-5 of the data scale (~3)."""
    sampler = registry.build("sampler", name, steps=20, **params)
    levels = grid(20, clean=True)
    x = start(256)
    out64 = sampler.sample(oracle, x, levels)
    out32 = sampler.sample(oracle, x.float(), levels)
    assert out32.dtype == torch.float32
    assert float((out32.double() - out64).abs().max()) < 1e-5 * 3.0


# --------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------

FIRST_STEP_IS_DDIM = [
    ("dpm-solver", {"order": 1}),
    ("dpmpp-2m", {}),
    ("dpmpp-3m", {}),
    ("unipc", {"order": 2, "corrector": False}),
    ("deis", {"order": 1, "variant": "rhoAB"}),
    ("deis", {"order": 3, "variant": "lambdaAB"}),
]


@pytest.mark.parametrize("name,params", FIRST_STEP_IS_DDIM, ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={w}" for k, w in v.items()))
@given(lam_t=st.floats(-12.0, 10.0), gap=st.floats(1e-3, 6.0), seed=st.integers(0, 2**32 - 1))
def test_first_step_is_ddim(registry, oracle, name, params, lam_t, gap, seed):
    """One step from level t to s equals DDIM (eta = 0): first-order DPM-Solver is DDIM
    (Lu et al. 2022, Prop. 4.1), and so is the first (history-free) step of DPM-Solver++(2M)
    and (3M) (Lu et al. 2022b, eq. 8 with D frozen), of UniP (Zhao et al. 2023, p = 1) and of
    DEIS (Zhang and Chen 2023, order 1 is DDIM). The two forms differ by rounding only:
    ROUNDINGS * U times the magnitudes of the terms DDIM adds, |alpha_s x0| + sigma_s |eps|
    with |eps| <= (|x| + alpha_t |x0|) / sigma_t, plus those of the noise-prediction form,
    (alpha_s / alpha_t) |x| + sigma_s (e^h - 1) |eps|."""
    t, s = vp(lam_t), vp(lam_t + gap)
    x = t.alpha * 2.0 * start(32, seed) + t.sigma * start(32, seed + 1)
    ddim = registry.build("sampler", "ddim", steps=1).sample(oracle, x, [t, s])
    other = registry.build("sampler", name, steps=1, **params).sample(oracle, x, [t, s])
    x0 = oracle(x, t)
    eps_scale = (x.abs() + t.alpha * x0.abs()) / t.sigma
    h = 0.5 * gap
    scale = s.alpha * x0.abs() + s.sigma * eps_scale + (s.alpha / t.alpha) * x.abs() + s.sigma * math.expm1(h) * eps_scale
    assert ((other - ddim).abs() <= ROUNDINGS * U * scale).all(), float((other - ddim).abs().max())


def test_unip2_bh2_is_dpmpp_2m(registry, oracle):
    """UniP-2 with B(h) = e^h - 1 and no corrector is DPM-Solver++(2M) (Zhao et al. 2023,
    sec. 3.3: the predictor's a_1 = 1/2 gives (2M)'s extrapolation 1/(2r)) over a whole
    trajectory ending clean. Rounding: ~10 operations per step over 30 steps, each bounded by
    U times the terms' magnitude (x ~ 3, coefficients alpha_s / alpha_t <= 1.1e3 at the
    first step) gives ROUNDINGS * U * 30 * 1e3 * 3 ~ 1e-9."""
    levels = grid(30, -14.0, 6.0, clean=True)
    x = start(256)
    a = registry.build("sampler", "unipc", order=2, variant="bh2", corrector=False, lower_order_final=False).sample(oracle, x, levels)
    b = registry.build("sampler", "dpmpp-2m").sample(oracle, x, levels)
    assert float((a - b).abs().max()) < ROUNDINGS * U * 30 * 1e3 * 3



@pytest.mark.parametrize("name", NAMES)
def test_zero_terminal_snr_start(registry, oracle, name):
    """A grid starting at alpha = 0 (logSNR = -inf, zero terminal SNR, Lin et al. 2024): the
    first step is the exact limit, DDIM's x_s = alpha_s D + (sigma_s / sigma_t) x, for every
    sampler here (noise-prediction forms divide by alpha; multistep weights see an infinite
    step), and the rest of the run stays finite. Compared on a two-level grid, where it is
    the whole run: equal to rounding of two products (2 U relative, ROUNDINGS U allowed)."""
    x = start(64)
    two = [vp(-math.inf), vp(-2.0)]
    ddim = registry.build("sampler", "ddim", steps=1).sample(oracle, x, two)
    ours = registry.build("sampler", name, steps=1).sample(oracle, x, two)
    assert ((ours - ddim).abs() <= ROUNDINGS * U * (1.0 + ddim.abs())).all()
    levels = [vp(-math.inf)] + grid(12, -10.0, 6.0, clean=True)
    out = registry.build("sampler", name, steps=13).sample(oracle, x, levels)
    assert torch.isfinite(out).all()

# --------------------------------------------------------------------------------------
# Convergence orders
# --------------------------------------------------------------------------------------

ORDERS = [
    # (name, params, expected global order, measured slope on this grid when written)
    ("dpm-solver", {"order": 1}, 1, 0.99),
    ("dpm-solver", {"order": 2}, 2, 2.03),
    ("dpm-solver", {"order": 3}, 3, 2.89),
    ("dpmpp-2m", {}, 2, 2.00),
    ("dpmpp-3m", {}, 3, 3.62),
    ("unipc", {"order": 1, "lower_order_final": False}, 2, 1.96),
    ("unipc", {"order": 2, "lower_order_final": False}, 3, 3.02),
    ("unipc", {"order": 2, "variant": "bh1", "lower_order_final": False}, 3, 3.07),
    ("unipc", {"order": 3, "lower_order_final": False}, 3, 3.02),
    ("deis", {"order": 2}, 2, 1.90),
    ("deis", {"order": 3}, 3, 2.78),
    ("deis", {"order": 3, "variant": "lambdaAB"}, 3, 3.01),
]


@pytest.mark.parametrize("name,params,order,measured", ORDERS, ids=[f"{n}-{i}" for i, (n, *_rest) in enumerate(ORDERS)])
def test_convergence_order(registry, oracle, reference, name, params, order, measured):
    """Global error against the float64 reference PF-ODE solution falls as h^order.

    Orders: DPM-Solver-k is k-th order (Lu et al. 2022, Thm. 3.2); DPM-Solver++(2M) second
    (Lu et al. 2022b, Thm. 5.1); (3M) third (its quadratic extrapolation integrated with the
    Taylor-exact weights, see dpmpp_3m.py); UniPC-p with the corrector p + 1 (Zhao et al.
    2023, Thm. 3.2) -- except p = 3, whose warm-up steps (UniPC-1, UniPC-2, local errors
    O(h^3), O(h^4)) cap the global order of a fixed grid at 3; DEIS with k points k-th (Zhang
    and Chen 2023, sec. 4). The slope is log2 of the error ratio per halving of h, fitted
    over N = 48 -> 192 (a 4x range). Bound: within [order - 0.3, order + 0.7]: the slope
    differs from its limit by O(h) terms (the multistep warm-up, variable derivatives) and
    exceeds it where the h^order term's coefficient is small next to the h^(order+1) one
    (measured values on this grid in ORDERS; 3M measured 3.19 and 3.62 for two start draws);
    a method one order lower misses the band."""
    x, ref, ref_error = reference
    sampler = registry.build("sampler", name, **params)
    errors = [float((sampler.sample(oracle, x, grid(n)) - ref).abs().max()) for n in NS]
    assert ref_error < errors[-1] / 30, (ref_error, errors)
    slope = math.log2(errors[0] / errors[-1]) / math.log2(NS[-1] / NS[0])
    assert order - 0.3 <= slope <= order + 0.7, (errors, slope)


def test_unipc_corrector_improves_on_the_predictor(registry, oracle, reference):
    """UniC lowers the error of UniP at every N for p = 1, 2, 3 (Zhao et al. 2023, Table 1:
    the corrector adds an order at no extra evaluation)."""
    x, ref, _ = reference
    for order in (1, 2, 3):
        for n in NS:
            errs = [
                float((registry.build("sampler", "unipc", order=order, corrector=c, lower_order_final=False).sample(oracle, x, grid(n)) - ref).abs().max())
                for c in (True, False)
            ]
            assert errs[0] < errs[1], (order, n, errs)


def test_dpmpp_3m_weights_are_third_order():
    """With an x-independent data prediction D(lam) the 3M step is a quadrature rule for
    sigma_s int e^lam D dlam. D = u^3 (1 + sin u), u = lam - lam_0, is flat at the start, so
    the first- and second-order warm-up steps err by O(h^4) and the rule's own order shows:
    the error falls 8x per halving (third order). k-diffusion's and diffusers' (3M) put half
    this weight on the second difference (h phi_3(-h) instead of 2 h phi_3(-h)); the same
    quadrature with their weight measured ratios 3.95 and 3.93 (N = 64, 128, 256) when this
    was written, i.e. second order."""
    import numpy as np

    from fundiff_plugins.samplers._exponential import lam
    from fundiff_plugins.samplers.dpmpp_3m import DPMSolverPP3M

    lam0 = -4.0

    def value(level):
        u = lam(level) - 0.5 * lam0
        return u**3 * (1.0 + math.sin(u))

    def exact(levels):
        nodes, weights = np.polynomial.legendre.leggauss(30)
        a, b, total = lam(levels[0]), lam(levels[-1]), 0.0
        for k in range(40):
            lo, hi = a + (b - a) * k / 40, a + (b - a) * (k + 1) / 40
            v = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
            total += float(np.sum(0.5 * (hi - lo) * weights * np.exp(v) * np.array([value(vp(2 * w)) for w in v])))
        return levels[-1].sigma * total

    errors = []
    for n in (64, 128, 256):
        levels = grid(n, lam0, 4.0)
        out = DPMSolverPP3M(steps=n).sample(lambda x, level: torch.full_like(x, value(level)), torch.zeros(1, 1, dtype=torch.float64), levels)
        errors.append(abs(float(out) - exact(levels)))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(r > 6.0 for r in ratios), (errors, ratios)


def test_dpm_solver_fast_beats_ddim(registry, oracle, reference):
    """DPM-Solver-fast at NFE = 96 (31 third-order steps, then 2 + 1) against DDIM at the same
    NFE on the same logSNR-uniform grid (the grid of the paper's fast variant, sec. 3.4):
    measured 3.5e-4 vs 4.2e-2; asserted 50x smaller (a first-order method cannot be)."""
    x, ref, _ = reference
    fast = float((registry.build("sampler", "dpm-solver-fast", steps=96).sample(oracle, x, grid(96)) - ref).abs().max())
    ddim = float((registry.build("sampler", "ddim", steps=96).sample(oracle, x, grid(96)) - ref).abs().max())
    assert fast < ddim / 50, (fast, ddim)


def test_dpm_solver_fast_order_mix():
    """The order mix of Lu et al. 2022, sec. 3.4, spends exactly the NFE budget."""
    from fundiff_plugins.samplers.dpm_solver_fast import fast_orders

    assert fast_orders(6, False) == [3, 2, 1]
    assert fast_orders(7, False) == [3, 3, 1]
    assert fast_orders(8, False) == [3, 3, 2]
    assert fast_orders(8, True) == [3, 3, 1, 1]  # onto a clean level: first order
    assert all(sum(fast_orders(n, c)) == n for n in range(1, 40) for c in (False, True))


@pytest.mark.parametrize("tol", [1e-3, 1e-4])
def test_adaptive_meets_its_tolerance(registry, oracle, reference, tol):
    """DPM-Solver-23's local error control (Lu et al. 2022, Appendix C) keeps the global
    error of the whole trajectory below its tolerance on this problem (measured 9e-5 at
    1e-3 with 153 NFE, 1.5e-5 at 1e-4 with 252 NFE); a tighter tolerance costs more NFE and
    gives a smaller error. Local control does not bound the global error in general; the
    margin here is ~10x and ~7x."""
    x, ref, _ = reference
    calls = []

    def counted(y, level):
        calls.append(1)
        return oracle(y, level)

    sampler = registry.build("sampler", "dpm-solver-adaptive", rtol=tol, atol=tol)
    loose = registry.build("sampler", "dpm-solver-adaptive", rtol=10 * tol, atol=10 * tol)
    out = sampler.sample(counted, x, [grid(1)[0], grid(1)[-1]])
    nfe = len(calls)
    calls.clear()
    out_loose = loose.sample(counted, x, [grid(1)[0], grid(1)[-1]])
    err, err_loose = float((out - ref).abs().max()), float((out_loose - ref).abs().max())
    assert err < tol, (err, nfe)
    assert nfe > len(calls) and err < err_loose, (nfe, len(calls), err, err_loose)


def test_adaptive_max_steps_is_an_error(registry, oracle):
    """Reaching the cap on attempted steps raises and names the tolerances."""
    sampler = registry.build("sampler", "dpm-solver-adaptive", rtol=1e-9, atol=1e-9, max_steps=3)
    with pytest.raises(RuntimeError, match="rtol"):
        sampler.sample(oracle, start(8), grid(4))


# --------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("which", ["dpmpp-2m", "unipc"])
def test_parity_with_diffusers(registry, oracle, which):
    """fundiff against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) and
    UniPCMultistepScheduler (bh2, order 2, corrector) on diffusers' own 15-step grid of the
    linear schedule (its float32 sigmas, converted to levels), same float64 model (the
    oracle as an eps-prediction) and the same start.

    Tolerances: UniPC's step runs in the sample's dtype once its sigmas are float64, so the
    two differ by float64 rounding amplified by 1/alpha ~ 160 at the first level: 1e-9 of the
    scale. diffusers' DPM-Solver step casts the sample to float32 (``sample.to(torch.float32)``
    in ``DPMSolverMultistepScheduler.step``), so there the bound is float32 rounding: ~15
    steps of a few roundings at 6e-8: 2e-5 of the scale."""
    diffusers = pytest.importorskip("diffusers")
    config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2, prediction_type="epsilon", lower_order_final=True, final_sigmas_type="zero")
    if which == "dpmpp-2m":
        scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **config)
        ours = registry.build("sampler", "dpmpp-2m")
        tol = 2e-5
    else:
        scheduler = diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, disable_corrector=[], **config)
        ours = registry.build("sampler", "unipc", order=2, variant="bh2", corrector=True, lower_order_final=True)
        tol = 1e-9
    # the same beta schedule: diffusers' float32 alphas_cumprod against ours (float32 product rounding)
    schedule = registry.build("schedule", "linear")
    assert torch.allclose(scheduler.alphas_cumprod.double(), schedule.alphas_cumprod().to(torch.float64), rtol=1e-4, atol=0)
    scheduler.set_timesteps(15)
    scheduler.sigmas = scheduler.sigmas.double()
    levels = [vp(math.inf) if s == 0 else Level(-2.0 * math.log(s), 1.0 / math.sqrt(1.0 + s * s), s / math.sqrt(1.0 + s * s)) for s in scheduler.sigmas.tolist()]
    x = start(512)
    ours_out = ours.sample(oracle, x, levels)
    theirs = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        level = levels[i]
        eps = (theirs - level.alpha * oracle(theirs, level)) / level.sigma
        theirs = scheduler.step(eps, t, theirs).prev_sample
    scale = 1.0 + float(ours_out.abs().max())
    assert theirs.dtype == torch.float64
    assert float((ours_out - theirs).abs().max()) < tol * scale
