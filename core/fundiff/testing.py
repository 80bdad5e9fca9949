"""``fundiff.testing``: conformance checks and hypothesis strategies for component authors.

A plugin author tests a new component with one line::

    from fundiff.testing import check_component

    def test_my_schedule():
        check_component("schedule", MySchedule())

Every ``check_*`` function raises :class:`AssertionError` with a message that names the
component, the property that failed, where (which noise level, which element) and by how
much; it returns ``None`` when the component conforms. They run in float64 on the CPU, draw
their test data from :mod:`fundiff.rng` (so they are deterministic) and take well under a
second each.

Tolerances are derived, not tuned. ``U`` is float64's machine epsilon (2.2e-16). A
conversion between what a network predicts and x0 loses at most a few roundings per
operation, amplified by the conditioning of the map at that noise level: recovering x0 from
an eps prediction divides by alpha and multiplies the noise by sigma / alpha, recovering it
from an x0-like prediction at high SNR amplifies by alpha / sigma. :func:`roundoff_bound`
states that bound once; the checks use it with ``ROUNDINGS`` roundings per conversion. A
real error (a wrong sign, a missing factor) is of order one and far above these bounds, which
stay below 1e-8 for |logSNR| <= 15.

Statistical checks (noise moments, chain perturbation moments) use ``Z_SCORE`` standard
errors from the central limit theorem; with the fixed seeds used here they are
deterministic, and a correct component would fail one with probability ~1e-9 per bound.

The hypothesis strategies (:func:`logsnrs`, :func:`levels`, :func:`seeds`, :func:`shapes`)
import hypothesis lazily, so importing this module does not need it.

This module names no design: it only knows the component protocols and the core math.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from . import noiselevel, rng
from .components import (
    CATEGORICAL_STATE,
    GAUSSIAN_MARGINALS,
    KIND_BASES,
    MANIFOLD_STATE,
    Chain,
    DataSet,
    DataSpec,
    DiscreteSchedule,
    Noise,
    Parameterization,
    Sampler,
    Schedule,
    Spacing,
    Weighting,
)
from .noiselevel import Level

__all__ = [
    "COVERED_KINDS",
    "ROUNDINGS",
    "U",
    "Z_SCORE",
    "check_chain",
    "check_component",
    "check_data",
    "check_fsdp",
    "check_noise",
    "check_parameterization",
    "check_parameterization_agreement",
    "check_stateful_weighting",
    "check_sampler",
    "check_sampler_fused_agreement",
    "check_schedule",
    "check_spacing",
    "check_weighting",
    "check_weighting_equivalence",
    "conditioning",
    "gaussian_posterior_mean",
    "integrate_pf_ode",
    "integrate_reverse_sde",
    "levels",
    "logsnrs",
    "roundoff_bound",
    "seeds",
    "shapes",
    "target_log_weight",
    "trainer_losses",
]

#: float64 machine epsilon
U = float(torch.finfo(torch.float64).eps)
#: smallest normal float64: below it relative precision is lost (alpha_bar of long schedules underflows)
_TINY = float(torch.finfo(torch.float64).tiny)
#: roundings budgeted per conversion (a handful of flops, each at most U, twice for a round trip)
ROUNDINGS = 64
#: standard errors allowed by statistical checks (two-sided p ~ 2e-9 per bound)
Z_SCORE = 6.0
#: the random stream the kit draws its own test data from (a third-party id, see fundiff.rng)
_KIT_STREAM = 1000
#: default logSNR range of the checks
LOGSNR_RANGE = (-15.0, 15.0)


# --------------------------------------------------------------------------------------
# Hypothesis strategies (hypothesis imported lazily)
# --------------------------------------------------------------------------------------


def logsnrs(min: float = -15.0, max: float = 15.0):
    """Strategy: finite float logSNR values in [min, max]."""
    from hypothesis import strategies as st

    return st.floats(min_value=min, max_value=max, allow_nan=False, allow_infinity=False)


def levels(chain: Chain, min: float = -15.0, max: float = 15.0, min_gap: float = 1e-6):
    """Strategy: pairs ``(s, t)`` of :class:`fundiff.Level` with s less noisy than t.

    logSNR_s - logSNR_t >= ``min_gap`` (s < t in time), both in [min, max], built with
    ``chain.level``.
    """
    from hypothesis import strategies as st

    if not max - min > min_gap:
        raise ValueError(f"levels: need max - min > min_gap, got [{min}, {max}] and gap {min_gap}")

    @st.composite
    def pairs(draw):
        lam_t = draw(st.floats(min_value=min, max_value=max - min_gap, allow_nan=False))
        lam_s = draw(st.floats(min_value=lam_t + min_gap, max_value=max, allow_nan=False))
        return chain.level(lam_s), chain.level(lam_t)

    return pairs()


def seeds():
    """Strategy: valid fundiff seeds, integers in [0, 2^64)."""
    from hypothesis import strategies as st

    return st.integers(min_value=0, max_value=2**64 - 1)


def shapes(max_dims: int = 3, max_side: int = 5):
    """Strategy: per-sample shapes, tuples of 1..max_dims sides in [1, max_side]."""
    from hypothesis import strategies as st

    return st.lists(st.integers(min_value=1, max_value=max_side), min_size=1, max_size=max_dims).map(tuple)


# --------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------


def conditioning(alpha, sigma):
    """The amplification of relative rounding errors by a conversion at (alpha, sigma).

    ``(1 + alpha/sigma + sigma/alpha) * (1 + alpha + sigma)``: going from an output to x0
    (or back) multiplies by at most sigma/alpha (eps-like outputs at low SNR) or
    alpha/sigma (x0-like outputs at high SNR); the second factor covers outputs that carry
    alpha or sigma as a scale (v = alpha eps - sigma x0 on a chain whose sigma exceeds 1).
    Works on floats and tensors.
    """
    return (1 + alpha / sigma + sigma / alpha) * (1 + alpha + sigma)


def roundoff_bound(alpha, sigma, scale, roundings: int = ROUNDINGS):
    """Bound on the absolute float64 error of a conversion: ``roundings * U * conditioning * scale``.

    ``scale`` is the magnitude of the inputs (e.g. max |x0| + max |eps|).
    """
    return roundings * U * conditioning(alpha, sigma) * scale


def _name(component: Any) -> str:
    return type(component).__name__


def _fail(component: Any, message: str) -> None:
    raise AssertionError(f"{_name(component)}: {message}")


def _first_mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, labels: Sequence[str]) -> str:
    """Describe the worst violations of |actual - expected| <= tol (per row)."""
    err = (actual - expected).abs()
    excess = err - tol
    flat = excess.reshape(excess.shape[0], -1).amax(1) if excess.ndim > 1 else excess
    rows = torch.nonzero(flat > 0).flatten()[:3].tolist()
    parts = []
    for r in rows:
        e = err[r].max().item()
        t = tol[r].max().item() if tol.ndim and tol.numel() > 1 else float(tol.max())
        parts.append(f"{labels[r]}: error {e:.3g} > tolerance {t:.3g}")
    return "; ".join(parts) + (f" ({int((flat > 0).sum())} of {len(flat)} cases fail)" if len(rows) else "")


def _kit_normal(seed: int, draw: int, n: int, shape: Sequence[int]) -> torch.Tensor:
    return rng.normal(seed, _KIT_STREAM, draw, torch.arange(n), tuple(shape))


def _kit_uniform(seed: int, draw: int, n: int) -> torch.Tensor:
    return rng.uniform(seed, _KIT_STREAM, draw, torch.arange(n))


def _is_tensor(value: Any, component: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(component, f"{what} must return a torch.Tensor, got {type(value).__name__}")
    return value


def _vp_alpha_sigma(lam: torch.Tensor):
    return noiselevel.vp_alpha_sigma(lam)


def _ve_alpha_sigma(lam: torch.Tensor):
    return noiselevel.ve_alpha_sigma(lam)


def _alpha_sigma_families(chain: Optional[Chain]):
    """(label, alpha_sigma) pairs: the chain's, or two chains of the core math (VP and alpha = 1)."""
    if chain is not None:
        return [(_name(chain), chain.alpha_sigma)]
    return [("alpha^2 + sigma^2 = 1", _vp_alpha_sigma), ("alpha = 1", _ve_alpha_sigma)]


class _LinearLogSNRSchedule(Schedule):
    """A schedule for checks that need one: logSNR falls linearly from +15 at t = 0 to -15 at t = 1."""

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return 15.0 - 30.0 * torch.as_tensor(t, dtype=torch.float64)

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        return (15.0 - torch.as_tensor(logsnr, dtype=torch.float64)) / 30.0


class _CoreVPChain(Chain):
    """The variance-preserving marginals of the core math, for checks that need a chain."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    def alpha_sigma(self, logsnr):
        return noiselevel.vp_alpha_sigma(logsnr)

    def level(self, logsnr: float) -> Level:
        alpha, sigma = noiselevel.vp_alpha_sigma(float(logsnr))
        return Level(float(logsnr), alpha, sigma)

    def prior(self, level, noise):
        return noise


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def check_schedule(schedule: Schedule, *, num_points: int = 1001) -> None:
    """Check a schedule's contract.

    * ``logsnr`` on ``num_points`` evenly spaced t in [t_min, 1] returns float64, finite
      and strictly decreasing values; ``logsnr_at`` agrees with it.
    * ``t_from_logsnr`` inverts it: |t(lambda(t)) - t| <= R U (1 + |lambda|) / |lambda'(t)| +
      R U, the rounding of lambda carried through the inverse's slope (lambda' from
      finite differences on the grid, the smaller neighbour taken), and
      |lambda(t(lambda)) - lambda| <= R U (1 + |lambda| + |lambda'|).
    * For a :class:`fundiff.DiscreteSchedule`: T betas in (0, 1), float64;
      ``alphas_cumprod`` is their running product of (1 - beta) to T * R * U relative; the
      continuous map sits on the grid, sigmoid(lambda(k / T)) = alpha_bar_k, within
      R U (T + 1 + |lambda|) relative (T roundings of the product, the rounding of lambda),
      plus the smallest normal float64 absolute (alpha_bar may underflow into subnormals).
    """
    r = ROUNDINGS
    t_min = float(schedule.t_min)
    if not (0.0 <= t_min < 1.0):
        _fail(schedule, f"t_min must be in [0, 1), got {t_min}")
    t = torch.linspace(t_min, 1.0, num_points, dtype=torch.float64)
    lam = _is_tensor(schedule.logsnr(t), schedule, "logsnr")
    if lam.dtype != torch.float64 or lam.shape != t.shape:
        _fail(schedule, f"logsnr(t) must keep float64 and the shape {tuple(t.shape)}, got {lam.dtype} {tuple(lam.shape)}")
    # Zero terminal SNR (Lin et al. 2024): lambda(1) = -inf exactly is allowed; everything
    # else must be finite, and the checks below run on [t_min, 1).
    zero_terminal_snr = bool(lam[-1] == -math.inf)
    if zero_terminal_snr:
        t, lam = t[:-1], lam[:-1]
    bad = ~torch.isfinite(lam)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        _fail(schedule, f"logsnr is not finite on [t_min, 1]: logsnr({t[i].item():.6g}) = {lam[i].item()}")
    step = lam[1:] - lam[:-1]
    if not (step < 0).all():
        i = int(torch.nonzero(step >= 0)[0])
        _fail(
            schedule,
            f"logsnr must be strictly decreasing: logsnr({t[i].item():.6g}) = {lam[i].item():.17g} "
            f"<= logsnr({t[i + 1].item():.6g}) = {lam[i + 1].item():.17g}",
        )
    for ti in (t_min, 0.5 * (t_min + 1.0), 1.0):
        host = schedule.logsnr_at(ti)
        ref = float(schedule.logsnr(torch.tensor(ti, dtype=torch.float64)))
        if host == ref:  # also covers lambda(1) = -inf
            continue
        if not isinstance(host, float) or abs(host - ref) > r * U * (1 + abs(ref)):
            _fail(schedule, f"logsnr_at({ti}) = {host!r} disagrees with logsnr(tensor) = {ref!r}")

    # local slope |dlambda/dt|: the smaller of the two neighbouring difference quotients
    quotient = (-step) / (t[1:] - t[:-1])
    slope = torch.minimum(torch.cat([quotient[:1], quotient]), torch.cat([quotient, quotient[-1:]]))
    t_back = _is_tensor(schedule.t_from_logsnr(lam), schedule, "t_from_logsnr")
    tol_t = r * U * (1 + lam.abs()) / slope + r * U
    if ((t_back - t).abs() > tol_t).any():
        labels = [f"t = {v:.6g} (logsnr {l:.6g})" for v, l in zip(t.tolist(), lam.tolist())]
        _fail(schedule, "t_from_logsnr(logsnr(t)) != t: " + _first_mismatch(t_back, t, tol_t, labels))
    lam_back = schedule.logsnr(t_back)
    tol_lam = r * U * (1 + lam.abs() + slope)
    if ((lam_back - lam).abs() > tol_lam).any():
        labels = [f"logsnr {l:.6g}" for l in lam.tolist()]
        _fail(schedule, "logsnr(t_from_logsnr(lambda)) != lambda: " + _first_mismatch(lam_back, lam, tol_lam, labels))

    if isinstance(schedule, DiscreteSchedule):
        steps = schedule.num_steps
        betas = _is_tensor(schedule.betas(), schedule, "betas")
        if betas.dtype != torch.float64 or betas.shape != (steps,):
            _fail(schedule, f"betas() must be float64 of shape ({steps},), got {betas.dtype} {tuple(betas.shape)}")
        below_one = betas < 1
        if zero_terminal_snr:  # the last step destroys all signal: beta_T = 1 exactly
            below_one[-1] = bool(betas[-1] == 1.0)
        if not ((betas > 0) & below_one).all():
            _fail(schedule, f"every beta must be in (0, 1) (beta_T = 1 only for zero terminal SNR); got min {betas.min().item()}, max {betas.max().item()}")
        ac = schedule.alphas_cumprod()
        ref = torch.cumprod(1.0 - betas, 0)
        tol = r * U * steps * ref + _TINY
        if ((ac - ref).abs() > tol).any():
            labels = [f"alpha_bar_{k + 1}" for k in range(steps)]
            _fail(schedule, "alphas_cumprod != cumprod(1 - betas): " + _first_mismatch(ac, ref, tol, labels))
        grid_t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        grid_lam = schedule.logsnr(grid_t)
        on_grid = torch.sigmoid(grid_lam)
        tol = r * U * (steps + 1 + grid_lam.abs()) * ref + _TINY
        if ((on_grid - ref).abs() > tol).any():
            labels = [f"k = {k + 1} (t = k/T)" for k in range(steps)]
            _fail(schedule, "sigmoid(logsnr(k/T)) != alphas_cumprod[k-1]: " + _first_mismatch(on_grid, ref, tol, labels))


# --------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------


def check_chain(chain: Chain, *, logsnr_range: tuple[float, float] = LOGSNR_RANGE, seed: int = 0) -> None:
    """Check a chain's contract.

    * ``alpha_sigma`` on a float64 logSNR grid returns float64 tensors of the same shape,
      finite, alpha >= 0 and sigma > 0; ``level(lambda)`` carries the same lambda and the same
      alpha, sigma within R U relative (host and tensor math may round differently).
    * Chains that provide ``"gaussian-marginals"``: log(alpha^2 / sigma^2) = lambda within
      R U (1 + |lambda|) (a log of a ratio rounded to a few U), and ``level(inf)`` is clean.
    * ``perturb`` has the marginal's moments: for a fixed x0 and standard normal noise,
      the sample mean of x_t is alpha x0 and its variance sigma^2, within ``Z_SCORE``
      standard errors (sigma / sqrt(n) for the mean; sqrt((m4 - var^2) / n) for the
      variance, m4 the sample fourth central moment).
    * ``prior`` returns a finite tensor shaped like its noise.
    * Chains that provide ``"categorical-state"`` get the categorical checks instead of the
      moments (:func:`_check_categorical_chain`).
    * Chains without ``"gaussian-marginals"`` whose state has no check of its own here
      (coupled systems, products) get shape and finiteness checks of ``encode``, ``perturb``,
      ``prior`` and ``decode`` on their ``state_spec`` instead of the moments
      (:func:`_check_state_shapes`).
    """
    r = ROUNDINGS
    lam = torch.linspace(logsnr_range[0], logsnr_range[1], 61, dtype=torch.float64)
    out = chain.alpha_sigma(lam)
    if not (isinstance(out, tuple) and len(out) == 2):
        _fail(chain, f"alpha_sigma must return a pair (alpha, sigma), got {type(out).__name__}")
    alpha, sigma = out
    for what, v in (("alpha", alpha), ("sigma", sigma)):
        v = _is_tensor(v, chain, f"alpha_sigma's {what}")
        if v.dtype != torch.float64 or v.shape != lam.shape:
            _fail(chain, f"alpha_sigma's {what} must be float64 of shape {tuple(lam.shape)}, got {v.dtype} {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            _fail(chain, f"alpha_sigma's {what} is not finite on logsnr in {logsnr_range}")
    if not ((alpha >= 0).all() and (sigma > 0).all()):
        _fail(chain, "alpha_sigma must give alpha >= 0 and sigma > 0 at finite logsnr")
    for i, value in enumerate(lam.tolist()):
        level = chain.level(value)
        if not isinstance(level, Level):
            _fail(chain, f"level() must return a fundiff.Level, got {type(level).__name__}")
        if level.logsnr != value:
            _fail(chain, f"level({value}).logsnr = {level.logsnr}")
        for what, host, ref in (("alpha", level.alpha, alpha[i].item()), ("sigma", level.sigma, sigma[i].item())):
            if abs(host - ref) > r * U * abs(ref):
                _fail(chain, f"level({value}).{what} = {host!r} but alpha_sigma gives {ref!r}")
    if GAUSSIAN_MARGINALS in type(chain).provides:
        back = noiselevel.logsnr_from_alpha_sigma(alpha, sigma)
        tol = r * U * (1 + lam.abs())
        if ((back - lam).abs() > tol).any():
            labels = [f"logsnr {v:.6g}" for v in lam.tolist()]
            _fail(chain, "log(alpha^2 / sigma^2) != logsnr: " + _first_mismatch(back, lam, tol, labels))
        clean = chain.level(math.inf)
        if not clean.is_clean:
            _fail(chain, f"level(inf) must be the clean level (sigma = 0), got {clean}")
        _check_dlog_alpha(chain, lam)

    if CATEGORICAL_STATE in type(chain).provides:
        # one-hot states: the Gaussian moments below do not apply
        _check_categorical_chain(chain, seed)
        return
    if MANIFOLD_STATE in type(chain).provides:
        # a manifold state: its maps instead of the Gaussian moments below
        _check_manifold_chain(chain, seed)
        return
    if GAUSSIAN_MARGINALS not in type(chain).provides:
        # other states (coupled systems, products): the moments are the chain's own
        _check_state_shapes(chain, seed)
        return

    # perturbation moments
    n, dim = 20000, 2
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    noise = rng.NoiseStream(seed, torch.arange(n), (dim,), stream=_KIT_STREAM, dtype=torch.float64).normal(0)
    for value in (logsnr_range[0] / 3, 0.0, logsnr_range[1] / 3):
        a, s = chain.alpha_sigma(torch.full((n,), value, dtype=torch.float64))
        x_t = chain.perturb(x0.expand(n, dim), noise, a[:, None], s[:, None])
        x_t = _is_tensor(x_t, chain, "perturb")
        if x_t.shape != (n, dim) or not torch.isfinite(x_t).all():
            _fail(chain, f"perturb must return finite values shaped like x0, got {tuple(x_t.shape)}")
        a0, s0 = a[0].item(), s[0].item()
        mean, var = x_t.mean(0), x_t.var(0)
        m4 = ((x_t - mean) ** 4).mean(0)
        se_mean = s0 / math.sqrt(n)
        se_var = ((m4 - var**2).clamp(min=0) / n).sqrt()
        for j in range(dim):
            if abs(mean[j].item() - a0 * x0[j].item()) > Z_SCORE * se_mean + r * U * (abs(a0 * x0[j].item()) + s0):
                _fail(chain, f"perturb at logsnr {value:g}: mean of x_t[{j}] is {mean[j].item():.6g}, expected alpha x0 = {a0 * x0[j].item():.6g} (+- {Z_SCORE * se_mean:.3g})")
            if abs(var[j].item() - s0**2) > Z_SCORE * se_var[j].item() + r * U * s0**2:
                _fail(chain, f"perturb at logsnr {value:g}: variance of x_t[{j}] is {var[j].item():.6g}, expected sigma^2 = {s0**2:.6g} (+- {Z_SCORE * se_var[j].item():.3g})")
    terminal = chain.level(logsnr_range[0])
    prior = _is_tensor(chain.prior(terminal, noise[:16]), chain, "prior")
    if prior.shape != noise[:16].shape or not torch.isfinite(prior).all():
        _fail(chain, f"prior must return finite values shaped like its noise {tuple(noise[:16].shape)}, got {tuple(prior.shape)}")


def _check_state_shapes(chain: Chain, seed: int) -> None:
    """For chains without Gaussian marginals (whose moments only their own tests can state):
    ``perturb`` of an encoded (n, 4) data batch at three levels and ``prior`` at the noisiest
    return finite tensors shaped like the chain's state, and ``decode`` gives the data shape."""
    n = 64
    spec = chain.state_spec(DataSpec(shape=(4,)))
    x0 = chain.encode(torch.linspace(-1.0, 1.0, 4 * n, dtype=torch.float64).reshape(n, 4))
    noise = rng.NoiseStream(seed, torch.arange(n), spec.shape, stream=_KIT_STREAM, dtype=torch.float64).normal(0)
    if tuple(x0.shape[1:]) != tuple(spec.shape):
        _fail(chain, f"encode must return the state shape {tuple(spec.shape)} (state_spec), got {tuple(x0.shape[1:])}")
    for value in (LOGSNR_RANGE[0] / 3, 0.0, LOGSNR_RANGE[1] / 3):
        a, s = chain.alpha_sigma(torch.full((n,), value, dtype=torch.float64))
        x_t = _is_tensor(chain.perturb(x0, noise, a[:, None], s[:, None]), chain, "perturb")
        if x_t.shape != x0.shape or not torch.isfinite(x_t).all():
            _fail(chain, f"perturb at logsnr {value:g} must return finite values shaped like the state {tuple(x0.shape)}, got {tuple(x_t.shape)}")
    prior = _is_tensor(chain.prior(chain.level(LOGSNR_RANGE[0]), noise), chain, "prior")
    if prior.shape != noise.shape or not torch.isfinite(prior).all():
        _fail(chain, f"prior must return finite values shaped like its noise {tuple(noise.shape)}, got {tuple(prior.shape)}")
    if tuple(chain.decode(prior).shape) != (n, 4):
        _fail(chain, f"decode must return the data shape (n, 4), got {tuple(chain.decode(prior).shape)}")


#: step of the finite difference that checks d log alpha / d lambda
_DLOG_ALPHA_STEP = 1e-3


def _check_dlog_alpha(chain: Chain, lam: torch.Tensor) -> None:
    """``dlog_alpha_dlogsnr`` (the drift of ``forward_sde``; chains override it with a closed
    form) against the five-point central difference of log alpha from ``alpha_sigma``,
    (-l(+2h) + 8 l(+h) - 8 l(-h) + l(-2h)) / (12 h) with h = 1e-3. Its truncation error is
    h^4 / 30 |(log alpha)^(5)| <= h^4 for fifth derivatives up to 30 (the built-in chains' are
    below 1), its rounding error (18 / 12 h) R U |log alpha|; a wrong closed form is off by
    a fraction of f itself (f <= 1/2 on the built-in chains), far above both."""
    h = _DLOG_ALPHA_STEP
    offsets = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64) * h
    stencil = lam[:, None] + offsets[None, :]
    alpha, _ = chain.alpha_sigma(stencil)
    usable = (alpha > 0).all(dim=1)
    log_alpha = torch.log(alpha.clamp(min=_TINY))
    fd = (-log_alpha[:, 3] + 8.0 * log_alpha[:, 2] - 8.0 * log_alpha[:, 1] + log_alpha[:, 0]) / (12.0 * h)
    for i, value in enumerate(lam.tolist()):
        if not bool(usable[i]):
            continue
        exact = chain.dlog_alpha_dlogsnr(value)
        tol = h**4 + 1.5 * ROUNDINGS * U * (1.0 + log_alpha[i].abs().max().item()) / h
        if not abs(exact - fd[i].item()) <= tol:
            _fail(
                chain,
                f"dlog_alpha_dlogsnr({value:g}) = {exact!r} but a finite difference of log alpha from alpha_sigma "
                f"gives {fd[i].item()!r} (+- {tol:.2g})",
            )


def integrate_reverse_sde(
    chain: Chain,
    denoise: Callable[[torch.Tensor, Level], torch.Tensor],
    x: torch.Tensor,
    levels: Sequence[Level],
    normal: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Euler-Maruyama for the chain's reverse SDE (``chain.reverse_sde``) in tau = -lambda.

    ``levels`` are noisy levels of increasing logSNR (the first the noisiest); ``denoise(x,
    level)`` is the x0 estimate and ``normal(i)`` the standard normal draw of step i. A step
    from lambda_i to lambda_{i+1} = lambda_i + h goes back by h in tau:
    x <- x - h (f x - g^2 score) + g sqrt(h) z (Song et al. 2021, eq. 6 discretised). First
    order in h; a fixed-step reference for chain authors, not a production sampler."""
    for i in range(len(levels) - 1):
        t, s = levels[i], levels[i + 1]
        h = s.logsnr - t.logsnr
        drift, g = chain.reverse_sde(x, denoise(x, t), t)
        x = x - h * drift + g * math.sqrt(h) * normal(i)
    return x


def integrate_pf_ode(
    chain: Chain, denoise: Callable[[torch.Tensor, Level], torch.Tensor], x: torch.Tensor, levels: Sequence[Level]
) -> torch.Tensor:
    """Heun's method (explicit trapezoidal rule, second order) for the chain's probability-flow
    ODE dx / dtau = ``chain.pf_ode`` (Song et al. 2021, eq. 13), stepping in tau = -lambda
    along the noisy ``levels`` of increasing logSNR: with h = lambda_{i+1} - lambda_i,
    k1 = v(x, lambda_i), k2 = v(x - h k1, lambda_{i+1}), x <- x - h (k1 + k2) / 2."""
    for i in range(len(levels) - 1):
        t, s = levels[i], levels[i + 1]
        h = s.logsnr - t.logsnr
        k1 = chain.pf_ode(x, denoise(x, t), t)
        guess = x - h * k1
        k2 = chain.pf_ode(guess, denoise(guess, s), s)
        x = x - 0.5 * h * (k1 + k2)
    return x


# --------------------------------------------------------------------------------------
# Parameterizations
# --------------------------------------------------------------------------------------


def check_parameterization(
    param: Parameterization,
    chain: Optional[Chain] = None,
    *,
    logsnr_range: tuple[float, float] = LOGSNR_RANGE,
    seed: int = 0,
    shape: Sequence[int] = (8,),
) -> None:
    """Check a parameterization's contract in float64 at 61 logSNRs spanning ``logsnr_range``.

    With x0, eps ~ N(0, I) (x0 scaled by 2), x_t = alpha x0 + sigma eps and a perturbed
    x0_hat = x0 + N(0, I):

    * ``to_x0(from_x0(x0)) == x0`` and ``to_x0(target(x0, eps)) == x0``;
    * ``from_x0(x0) == target(x0, eps)`` (the ideal network output is the target);
    * ``log_x0_mse_factor(alpha, sigma)`` (alpha, sigma of shape (B,)) equals the measured
      log(||from_x0(x0_hat) - target||^2 / ||x0_hat - x0||^2) per sample;
    * ``input_scale`` is finite and positive.

    Tolerance: :func:`roundoff_bound` with scale max|x0| + max|x0_hat| + max|eps| per
    sample for the conversions; for the log ratio, twice the relative error of the
    difference (its rounding bound over the measured difference's RMS) plus R U (1 +
    |lambda|) for the log. Without ``chain`` the checks run on two families of the core
    math, alpha^2 + sigma^2 = 1 and alpha = 1, since the contract says a parameterization
    uses (alpha, sigma) alone.

    A parameterization that requires ``"categorical-state"`` gets the categorical checks
    instead (:func:`_check_categorical_parameterization`).
    """
    if CATEGORICAL_STATE in type(param).requires:
        _check_categorical_parameterization(param, chain, logsnr_range, seed)
        return
    lam = torch.linspace(logsnr_range[0], logsnr_range[1], 61, dtype=torch.float64)
    n = lam.numel()
    shape = tuple(shape)
    x0 = 2.0 * _kit_normal(seed, 0, n, shape)
    eps = _kit_normal(seed, 1, n, shape)
    x0_hat = x0 + _kit_normal(seed, 2, n, shape)
    dims = len(shape) + 1
    scale = (x0.abs().flatten(1).amax(1) + x0_hat.abs().flatten(1).amax(1) + eps.abs().flatten(1).amax(1))
    for family, alpha_sigma in _alpha_sigma_families(chain):
        alpha, sigma = alpha_sigma(lam)
        a, s = noiselevel.append_dims(alpha, dims), noiselevel.append_dims(sigma, dims)
        x_t = a * x0 + s * eps
        tol = noiselevel.append_dims(roundoff_bound(alpha, sigma, scale), dims)
        labels = [f"{family}, logsnr {v:.6g}" for v in lam.tolist()]

        def run(what: str, fn: Callable[[], Any]) -> torch.Tensor:
            value = _is_tensor(fn(), param, what)
            if value.shape != x0.shape or value.dtype != torch.float64:
                _fail(param, f"{what} must keep the shape {tuple(x0.shape)} and float64, got {tuple(value.shape)} {value.dtype}")
            if not torch.isfinite(value).all():
                _fail(param, f"{what} is not finite ({family})")
            return value

        out = run("from_x0", lambda: param.from_x0(x0, x_t, a, s))
        target = run("target", lambda: param.target(x0, eps, x_t, a, s))
        back = run("to_x0", lambda: param.to_x0(out, x_t, a, s))
        if ((back - x0).abs() > tol).any():
            _fail(param, "to_x0(from_x0(x0)) != x0: " + _first_mismatch(back, x0, tol, labels))
        back = run("to_x0", lambda: param.to_x0(target, x_t, a, s))
        if ((back - x0).abs() > tol).any():
            _fail(param, "to_x0(target(x0, eps)) != x0: " + _first_mismatch(back, x0, tol, labels))
        out_scale = noiselevel.append_dims(out.abs().flatten(1).amax(1) + target.abs().flatten(1).amax(1), dims)
        tol_out = tol * (1 + out_scale / noiselevel.append_dims(scale, dims))
        if ((out - target).abs() > tol_out).any():
            _fail(param, "from_x0(x0) != target(x0, eps) (the ideal output must be the target): " + _first_mismatch(out, target, tol_out, labels))

        out_hat = run("from_x0", lambda: param.from_x0(x0_hat, x_t, a, s))
        diff = (out_hat - target).flatten(1)
        num = (diff**2).sum(1)
        den = ((x0_hat - x0).flatten(1) ** 2).sum(1)
        measured = torch.log(num / den)
        claimed = param.log_x0_mse_factor(alpha, sigma)
        claimed = torch.as_tensor(claimed, dtype=torch.float64)
        try:
            claimed = claimed.expand(n)
        except RuntimeError:
            _fail(param, f"log_x0_mse_factor(alpha, sigma) for alpha of shape ({n},) must broadcast to ({n},), got {tuple(claimed.shape)}")
        rms = (num / diff.shape[1]).sqrt()
        rel = tol.flatten(1).amax(1) * (1 + out_scale.flatten() / scale) / rms
        tol_log = 2 * rel + ROUNDINGS * U * (1 + lam.abs())
        if not ((measured - claimed).abs() <= tol_log).all():
            _fail(
                param,
                "log_x0_mse_factor != log(||out_hat - target||^2 / ||x0_hat - x0||^2): "
                + _first_mismatch(claimed, measured, tol_log, labels),
            )
        c_in = torch.as_tensor(param.input_scale(a, s), dtype=torch.float64)
        if not (torch.isfinite(c_in).all() and (c_in > 0).all()):
            _fail(param, f"input_scale must be finite and > 0 ({family})")


# --------------------------------------------------------------------------------------
# Equivalences between parameterizations and weightings (properties for hypothesis)
# --------------------------------------------------------------------------------------


def _equivalence_cases(chain, logsnr, logsnr_range, seed, shape):
    """(family label, lam, alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale, tol, dims) per family."""
    if logsnr is None:
        lam = torch.linspace(logsnr_range[0], logsnr_range[1], 61, dtype=torch.float64)
    else:
        lam = torch.as_tensor(list(logsnr) if not isinstance(logsnr, (int, float)) else [logsnr], dtype=torch.float64)
    n = lam.numel()
    shape = tuple(shape)
    x0 = 2.0 * _kit_normal(seed, 0, n, shape)
    eps = _kit_normal(seed, 1, n, shape)
    x0_hat = x0 + _kit_normal(seed, 2, n, shape)
    dims = len(shape) + 1
    scale = x0.abs().flatten(1).amax(1) + x0_hat.abs().flatten(1).amax(1) + eps.abs().flatten(1).amax(1)
    for family, alpha_sigma in _alpha_sigma_families(chain):
        alpha, sigma = alpha_sigma(lam)
        a, s = noiselevel.append_dims(alpha, dims), noiselevel.append_dims(sigma, dims)
        x_t = a * x0 + s * eps
        tol = roundoff_bound(alpha, sigma, scale)
        labels = [f"{family}, logsnr {v:.17g}" for v in lam.tolist()]
        yield labels, lam, alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale, tol, dims


def check_parameterization_agreement(
    p: Parameterization,
    q: Parameterization,
    chain: Optional[Chain] = None,
    *,
    logsnr: Optional[Sequence[float]] = None,
    logsnr_range: tuple[float, float] = LOGSNR_RANGE,
    seed: int = 0,
    shape: Sequence[int] = (8,),
) -> None:
    """Check that two parameterizations describe the same denoiser (float64).

    With x0, eps, x_t and a perturbed estimate x0_hat as in :func:`check_parameterization`, at
    the logSNRs ``logsnr`` (default: 61 spanning ``logsnr_range``), for (alpha, sigma) of
    ``chain`` (default: both core families):

    * Q's target follows from P's ideal output: Q.from_x0(P.to_x0(P.target(x0, eps))) equals
      Q.target(x0, eps), within :func:`roundoff_bound` times 2 (1 + |Q's output| / scale);
    * D(x) is the same through P and Q: a network output o of P, re-expressed for Q as
      Q.from_x0(P.to_x0(o)), gives the same x0 through Q.to_x0, for o = P.from_x0(x0_hat);
      and P.to_x0(P.from_x0(x0_hat)) = Q.to_x0(Q.from_x0(x0_hat)) = x0_hat, within twice the
      round-off bound (two conversions) in x0 units.

    Pass ``logsnr=[lam]`` and ``seed``/``shape`` from hypothesis to check any noise level.
    """
    for labels, lam, alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale, tol, dims in _equivalence_cases(chain, logsnr, logsnr_range, seed, shape):
        tol = noiselevel.append_dims(tol, dims)
        sc = noiselevel.append_dims(scale, dims)
        who = f"{_name(p)} vs {_name(q)}"
        q_target = q.target(x0, eps, x_t, a, s)
        via_p = q.from_x0(p.to_x0(p.target(x0, eps, x_t, a, s), x_t, a, s), x_t, a, s)
        q_scale = noiselevel.append_dims(q_target.abs().flatten(1).amax(1), dims)
        tol_q = 2 * tol * (1 + q_scale / sc)
        if not ((via_p - q_target).abs() <= tol_q).all():
            raise AssertionError(f"{who}: Q.target != Q.from_x0(P.to_x0(P.target)): " + _first_mismatch(via_p, q_target, tol_q, labels))
        out_p = p.from_x0(x0_hat, x_t, a, s)
        d_p = p.to_x0(out_p, x_t, a, s)
        d_q = q.to_x0(q.from_x0(d_p, x_t, a, s), x_t, a, s)
        if not ((d_p - d_q).abs() <= 2 * tol).all():
            raise AssertionError(f"{who}: D(x) through P != through Q for the same network output: " + _first_mismatch(d_q, d_p, 2 * tol, labels))
        d_q_direct = q.to_x0(q.from_x0(x0_hat, x_t, a, s), x_t, a, s)
        for what, d in (("P", d_p), ("Q", d_q_direct)):
            if not ((d - x0_hat).abs() <= tol).all():
                raise AssertionError(f"{who}: {what}.to_x0({what}.from_x0(x0_hat)) != x0_hat: " + _first_mismatch(d, x0_hat, tol, labels))


def target_log_weight(weighting: Weighting, param: Parameterization, logsnr, alpha, sigma) -> torch.Tensor:
    """log of the weight the trainer puts on ``param``'s own target MSE:
    log w(lambda) - log_x0_mse_factor(alpha, sigma) (compare with a paper's per-target formula)."""
    log_w = torch.as_tensor(weighting.log_x0_weight(logsnr, alpha, sigma), dtype=torch.float64)
    return log_w - torch.as_tensor(param.log_x0_mse_factor(alpha, sigma), dtype=torch.float64)


def trainer_losses(weighting: Weighting, param: Parameterization, out, x0, eps, x_t, logsnr, alpha, sigma) -> torch.Tensor:
    """The trainer's per-example loss for network output ``out`` (B, ...) and per-sample
    logSNR, alpha, sigma of shape (B,), as ``fundiff.Pipeline`` computes it (without the
    per-sample log weight of ``weighting.draw``, which does not depend on the parameterization):
    exp(log w - log factor) * mean((out - target)^2)."""
    dims = out.ndim
    a, s = noiselevel.append_dims(alpha, dims), noiselevel.append_dims(sigma, dims)
    target = param.target(x0, eps, x_t, a, s)
    weight = torch.exp(target_log_weight(weighting, param, logsnr, alpha, sigma))
    return weight * ((out - target) ** 2).flatten(1).mean(1)


def check_weighting_equivalence(
    weighting: Weighting,
    parameterizations: Sequence[Parameterization],
    chain: Optional[Chain] = None,
    *,
    logsnr: Optional[Sequence[float]] = None,
    logsnr_range: tuple[float, float] = LOGSNR_RANGE,
    seed: int = 0,
    shape: Sequence[int] = (8,),
) -> None:
    """Check that a weighting is one objective whatever the network predicts.

    For each parameterization P and the same x0 estimate x0_hat (P's network output
    P.from_x0(x0_hat)), the trainer's loss (:func:`trainer_losses`) equals
    w(lambda) * mean((x0_hat - x0)^2): the weighting's stated x0-unit form. So all
    parameterizations give the same number, and a weighting's per-target forms (e.g.
    min(SNR, gamma) / SNR on the eps-MSE, min(SNR, gamma) / (SNR + 1) on the v-MSE) are the
    x0 form divided by each target's MSE factor.

    Relative tolerance per sample: twice the relative rounding of the output difference (its
    round-off bound, in output units, over the difference's RMS) plus R U (1 + |lambda| +
    |log w|) for the log weights and their exp. Logsnrs and families as in
    :func:`check_parameterization_agreement`.
    """
    for labels, lam, alpha, sigma, a, s, x0, eps, x0_hat, x_t, scale, tol, dims in _equivalence_cases(chain, logsnr, logsnr_range, seed, shape):
        log_w = torch.as_tensor(weighting.log_x0_weight(lam, alpha, sigma), dtype=torch.float64).expand(lam.shape)
        reference = torch.exp(log_w) * ((x0_hat - x0) ** 2).flatten(1).mean(1)
        for param in parameterizations:
            out = param.from_x0(x0_hat, x_t, a, s)
            target = param.target(x0, eps, x_t, a, s)
            loss = trainer_losses(weighting, param, out, x0, eps, x_t, lam, alpha, sigma)
            diff = (out - target).flatten(1)
            rms = (diff**2).mean(1).sqrt()
            out_scale = out.abs().flatten(1).amax(1) + target.abs().flatten(1).amax(1)
            rel = 2 * tol * (1 + out_scale / scale) / rms + ROUNDINGS * U * (1 + lam.abs() + log_w.abs())
            ratio = loss / reference
            if not ((ratio - 1).abs() <= rel).all():
                raise AssertionError(
                    f"{_name(weighting)} with {_name(param)}: trainer loss / (w * x0-MSE) != 1: "
                    + _first_mismatch(ratio, torch.ones_like(ratio), rel, labels)
                )


def check_stateful_weighting(weighting: Weighting, schedule: Optional[Schedule] = None, *, seed: int = 0, n: int = 256, steps: int = 40) -> None:
    """Check the contract of a weighting's ``build_module()`` (for weightings that learn).

    The module passes :func:`check_weighting`; ``draw`` returns float64 logSNRs of shape (B,)
    and a per-sample log weight that is None or finite of shape (B,); after ``steps`` rounds
    of draw + ``update(logsnr, losses)`` with synthetic losses (larger at high noise) it still
    passes, and a fresh module loaded with its ``state_dict`` draws exactly the same values
    (what a resumed run relies on). Weightings without a module pass trivially.
    """
    module = weighting.build_module()
    if module is None:
        return
    if not isinstance(module, torch.nn.Module) or not callable(getattr(module, "update", None)):
        _fail(weighting, "build_module() must return a torch.nn.Module with an update(logsnr, losses) method")
    schedule = schedule or _LinearLogSNRSchedule()
    check_weighting(module, schedule, seed=seed)
    for step in range(steps):
        u = _kit_uniform(seed, 10 + step, n)
        logsnr, extra = module.draw(u, schedule)
        if logsnr.shape != u.shape or logsnr.dtype != torch.float64:
            _fail(weighting, f"module draw must return float64 logSNR of shape {tuple(u.shape)}, got {logsnr.dtype} {tuple(logsnr.shape)}")
        if extra is not None and (extra.shape != u.shape or not torch.isfinite(extra).all()):
            _fail(weighting, "module draw's per-sample log weight must be None or finite of shape (B,)")
        losses = torch.exp(-0.25 * logsnr.detach()) * (1.0 + _kit_uniform(seed, 500 + step, n))
        module.update(logsnr.detach(), losses)
    check_weighting(module, schedule, seed=seed)
    fresh = weighting.build_module()
    fresh.load_state_dict(module.state_dict())
    u = _kit_uniform(seed, 999, n)
    first, again = module.draw(u, schedule), fresh.draw(u, schedule)
    if not torch.equal(first[0], again[0]) or (first[1] is not None and not torch.equal(first[1], again[1])):
        _fail(weighting, "a module restored from state_dict() draws differently from the original")


# --------------------------------------------------------------------------------------
# Weightings
# --------------------------------------------------------------------------------------


def check_weighting(
    weighting: Weighting, schedule: Optional[Schedule] = None, chain: Optional[Chain] = None, *, seed: int = 0, n: int = 4096
) -> None:
    """Check a weighting's contract against a schedule (default: logSNR linear from 15 to -15).

    * ``sample_logsnr(u, schedule)`` for ``n`` Philox uniforms plus the extreme uniforms
      Philox can produce (2^-33 and 1 - 2^-33) returns float64 of shape (B,), finite, inside
      [lambda(1), lambda(t_min)] (within R U (1 + |lambda|) for the rounding of an inverse
      CDF), and the same values for the same u;
    * ``log_x0_weight(lambda, alpha, sigma)`` is finite with a finite exp on that sample and
      on a grid spanning the schedule's range ((alpha, sigma) from ``chain``, default VP).
    """
    schedule = schedule or _LinearLogSNRSchedule()
    chain = chain or _CoreVPChain()
    u = torch.cat([_kit_uniform(seed, 0, n), torch.tensor([2.0**-33, 0.5, 1.0 - 2.0**-33], dtype=torch.float64)])
    lam = _is_tensor(weighting.sample_logsnr(u.clone(), schedule), weighting, "sample_logsnr")
    if lam.shape != u.shape or lam.dtype != torch.float64:
        _fail(weighting, f"sample_logsnr must return float64 of shape {tuple(u.shape)}, got {lam.dtype} {tuple(lam.shape)}")
    if not torch.isfinite(lam).all():
        i = int(torch.nonzero(~torch.isfinite(lam))[0])
        _fail(weighting, f"sample_logsnr(u = {u[i].item()!r}) = {lam[i].item()} is not finite")
    lo = schedule.logsnr_at(1.0)
    hi = schedule.logsnr_at(schedule.t_min)
    slack = ROUNDINGS * U * (1 + lam.abs())
    outside = (lam < lo - slack) | (lam > hi + slack)
    if outside.any():
        i = int(torch.nonzero(outside)[0])
        _fail(weighting, f"sample_logsnr(u = {u[i].item()!r}) = {lam[i].item()} is outside the schedule's range [{lo}, {hi}]")
    again = weighting.sample_logsnr(u.clone(), schedule)
    if not torch.equal(lam, again):
        _fail(weighting, "sample_logsnr is not a function of u (two calls with the same u differ)")
    if lo == -math.inf:  # zero terminal SNR: span the range the weighting actually draws
        lo = float(lam.min())
    grid = torch.linspace(lo, hi, 257, dtype=torch.float64)
    for what, values in (("sampled logsnr", lam), ("a grid over the schedule's range", grid)):
        alpha, sigma = chain.alpha_sigma(values)
        log_w = torch.as_tensor(weighting.log_x0_weight(values, alpha, sigma), dtype=torch.float64)
        try:
            log_w = log_w.expand(values.shape)
        except RuntimeError:
            _fail(weighting, f"log_x0_weight must broadcast to the logsnr's shape {tuple(values.shape)}, got {tuple(log_w.shape)}")
        bad = ~torch.isfinite(log_w) | ~torch.isfinite(torch.exp(log_w))
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            _fail(weighting, f"log_x0_weight on {what}: weight at logsnr {values[i].item():.6g} is not finite (log w = {log_w[i].item()})")


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


def gaussian_posterior_mean(x_t: torch.Tensor, level: Level, mean: torch.Tensor, std: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, std^2 I) and x_t = alpha x0 + sigma eps.

    x_t ~ N(alpha mean, v I) with v = alpha^2 std^2 + sigma^2, and the posterior mean is
    mean + (alpha std^2 / v) (x_t - alpha mean) (a Gaussian prior times a Gaussian likelihood).
    """
    v = level.alpha**2 * std**2 + level.sigma**2
    return mean + (level.alpha * std**2 / v) * (x_t - level.alpha * mean)


def check_sampler(
    sampler: Sampler,
    chain: Optional[Chain] = None,
    *,
    logsnr_range: tuple[float, float] = (-10.0, 10.0),
    batch: int = 512,
    shape: Sequence[int] = (3,),
    seed: int = 0,
    per_sample: Optional[bool] = None,
) -> None:
    """Check a sampler with an exact denoiser for Gaussian data, x0 ~ N(m, s^2 I).

    The levels are ``sampler.steps`` logSNRs evenly spaced from ``logsnr_range[0]`` up to
    ``logsnr_range[1]`` and then the clean level (``chain.level``; default: the core VP
    math), and the start is drawn from the exact marginal N(alpha m, alpha^2 s^2 + sigma^2)
    at the first level, so only the sampler's own error remains.

    * the result is finite, float64, shaped like the start; ``denoise`` was called with
      :class:`fundiff.Level` objects; ``callback(i, x, x0)`` gets tensors of that shape;
    * reproducible: the same noise streams give identical results; a sampler that accepts
      ``noise=None`` (a deterministic one) gives identical results on two calls;
    * ``per_sample``: sample i's result does not depend on the batch it is in (set False for
      samplers whose step control couples the batch); compared to R U times the data scale;
    * a sanity band when ending on the clean level: the sample mean is within s/2 of m and
      the sample std within [s/2, 3s/2]. A correct sampler is far inside it at 50 steps; a
      sampler that returns its start (mean 0-ish, std 1) or diverges is far outside.

    A sampler that requires ``"manifold-state"`` is checked with a ``chain`` that provides it on
    data at one point of the manifold (:func:`_check_manifold_sampler`); with another ``chain``
    without ``"gaussian-marginals"`` (coupled systems, products) only the contract is checked,
    on the chain's own state (:func:`_check_state_sampler`). A sampler that requires
    ``"categorical-state"`` is checked on categorical data with a ``chain`` that provides it
    (:func:`_check_categorical_sampler`).
    """
    if per_sample is None:  # samplers that adapt one step size to the whole batch opt out
        per_sample = not getattr(type(sampler), "couples_batch", False)
    if MANIFOLD_STATE in type(sampler).requires:
        _check_manifold_sampler(sampler, chain, batch, seed, per_sample)
        return
    if CATEGORICAL_STATE in type(sampler).requires:
        _check_categorical_sampler(sampler, chain, logsnr_range, batch, seed, per_sample)
        return
    if chain is not None and GAUSSIAN_MARGINALS not in type(chain).provides:
        _check_state_sampler(sampler, chain, logsnr_range, batch, seed, per_sample)
        return
    chain = chain or _CoreVPChain()
    shape = tuple(shape)
    m = torch.linspace(-1.0, 1.5, math.prod(shape), dtype=torch.float64).reshape(shape)
    s_data = 0.3
    steps = sampler.steps
    lams = torch.linspace(logsnr_range[0], logsnr_range[1], steps, dtype=torch.float64).tolist()
    grid = [chain.level(v) for v in lams] + [chain.level(math.inf)]
    seen_types: set[type] = set()

    def denoise(x: torch.Tensor, level: Level) -> torch.Tensor:
        seen_types.add(type(level))
        return gaussian_posterior_mean(x, level, m, s_data)

    def start(ids: torch.Tensor) -> torch.Tensor:
        z = rng.NoiseStream(seed, ids, shape, stream=rng.STREAM_PRIOR, dtype=torch.float64).normal(0)
        first = grid[0]
        return first.alpha * m + math.sqrt(first.alpha**2 * s_data**2 + first.sigma**2) * z

    def run(ids: torch.Tensor, callback=None, with_noise: bool = True) -> torch.Tensor:
        noise = rng.NoiseStream(seed, ids, shape, stream=rng.STREAM_SAMPLER, dtype=torch.float64) if with_noise else None
        return sampler.sample(denoise, start(ids), grid, noise, callback)

    ids = torch.arange(batch)
    calls: list[tuple[int, tuple, tuple]] = []

    def callback(i, x, x0):
        calls.append((i, tuple(x.shape), tuple(x0.shape)))

    out = _is_tensor(run(ids, callback), sampler, "sample")
    expected = (batch, *shape)
    if out.shape != expected or out.dtype != torch.float64:
        _fail(sampler, f"sample must return the start's shape {expected} and dtype float64, got {tuple(out.shape)} {out.dtype}")
    if not torch.isfinite(out).all():
        _fail(sampler, "sample returned non-finite values with an exact Gaussian denoiser")
    if seen_types != {Level}:
        _fail(sampler, f"denoise must be called with fundiff.Level objects, got {seen_types or 'no calls'}")
    if not calls:
        _fail(sampler, "callback was never called")
    if any(c[1] != expected or c[2] != expected for c in calls):
        _fail(sampler, f"callback(i, x, x0) must get tensors of shape {expected}, got {calls[0]}")
    again = run(ids)
    if not torch.equal(out, again):
        _fail(sampler, f"not reproducible: two runs with the same noise streams differ by {(out - again).abs().max().item():.3g}")
    try:
        det = run(ids, with_noise=False)
    except (ValueError, TypeError):
        det = None  # a stochastic sampler that needs a noise stream
    if det is not None:
        det2 = run(ids, with_noise=False)
        if not torch.equal(det, det2) or not torch.isfinite(det).all():
            _fail(sampler, "deterministic run (noise=None) is not reproducible or not finite")
    if per_sample:
        sub = torch.tensor([batch - 1, 0, batch // 2])
        part = run(sub)
        tol = ROUNDINGS * U * (1 + out.abs().max().item())
        if (part - out[sub]).abs().max().item() > tol:
            _fail(sampler, f"sample i depends on its batch: ids {sub.tolist()} alone differ from the full batch by {(part - out[sub]).abs().max().item():.3g}")
    if grid[-1].is_clean:
        mean = out.mean(0)
        std = out.std(0)
        if (mean - m).abs().max().item() > 0.5 * s_data or not ((std > 0.5 * s_data) & (std < 1.5 * s_data)).all():
            _fail(
                sampler,
                f"with an exact denoiser for N(m, {s_data}^2) data the samples have mean error "
                f"{(mean - m).abs().max().item():.3g} and std in [{std.min().item():.3g}, {std.max().item():.3g}]; "
                f"outside the sanity band (mean within {0.5 * s_data}, std in [{0.5 * s_data}, {1.5 * s_data}])",
            )


def _check_repeatable(sampler: Sampler, run: Callable[..., torch.Tensor], ids: torch.Tensor, out: torch.Tensor, per_sample: bool, tol: float) -> None:
    """Shared by the state, manifold and categorical sampler checks: ``run(ids)`` again gives
    ``out`` exactly, and with ``per_sample`` samples drawn alone (last, first, middle) equal
    their rows of the batch to ``tol``."""
    if not torch.equal(run(ids), out):
        _fail(sampler, "not reproducible: two runs with the same random streams differ")
    if per_sample:
        batch = ids.numel()
        sub = torch.tensor([batch - 1, 0, batch // 2])
        if (run(sub) - out[sub]).abs().max().item() > tol:
            _fail(sampler, f"sample i depends on its batch: ids {sub.tolist()} alone differ from the full batch")


def _check_state_sampler(sampler: Sampler, chain: Chain, logsnr_range: tuple[float, float], batch: int, seed: int, per_sample: bool) -> None:
    """The part of :func:`check_sampler` for chains whose state is neither Gaussian nor
    categorical: the contract without an accuracy band (what ``denoise`` means there is the
    chain's, so an exact denoiser is the chain's own tests' business).

    The grid is ``sampler.steps`` logSNRs evenly spaced over ``logsnr_range`` and the clean
    level, from ``chain.level``; the start is ``chain.initial_state`` on the state of (4,)
    data (``chain.state_spec``) and ``denoise`` returns the encoded data point 0. Checked:
    finite float64 results shaped like the start; ``denoise`` called with
    :class:`fundiff.Level` objects and ``callback(i, x, x0)`` with state-shaped tensors;
    identical results on a second run with the same streams; with ``per_sample``, sample i
    alone equals sample i in the batch (to R U).
    """
    shape = tuple(chain.state_spec(DataSpec(shape=(4,))).shape)
    point = chain.encode(torch.zeros(1, 4, dtype=torch.float64))
    lams = torch.linspace(logsnr_range[0], logsnr_range[1], sampler.steps, dtype=torch.float64).tolist()
    grid = [chain.level(v) for v in lams] + [chain.level(math.inf)]
    seen_types: set[type] = set()

    def denoise(x: torch.Tensor, level: Level) -> torch.Tensor:
        seen_types.add(type(level))
        return point.expand(x.shape[0], *shape)

    def run(ids: torch.Tensor, callback=None) -> torch.Tensor:
        start = chain.initial_state(grid[0], _KitSource(seed, ids, shape, rng.STREAM_PRIOR))
        return sampler.sample(denoise, start, grid, _KitSource(seed, ids, shape, rng.STREAM_SAMPLER), callback)

    ids = torch.arange(batch)
    calls: list[tuple[int, tuple, tuple]] = []
    out = _is_tensor(run(ids, lambda i, x, x0: calls.append((i, tuple(x.shape), tuple(x0.shape)))), sampler, "sample")
    expected = (batch, *shape)
    if out.shape != expected or out.dtype != torch.float64 or not torch.isfinite(out).all():
        _fail(sampler, f"sample must return finite float64 values of the start's shape {expected}, got {out.dtype} {tuple(out.shape)}")
    if seen_types != {Level}:
        _fail(sampler, f"denoise must be called with fundiff.Level objects, got {seen_types or 'no calls'}")
    if not calls or any(c[1] != expected or c[2] != expected for c in calls):
        _fail(sampler, f"callback(i, x, x0) must be called with tensors of shape {expected}, got {calls[:1] or 'no calls'}")
    _check_repeatable(sampler, run, ids, out, per_sample, tol=ROUNDINGS * U * (1 + out.abs().max().item()))


class _KitSource:
    """A noise source for categorical states: ``sample(draw)`` standard normals and
    ``uniform(draw)`` uniforms of the state's shape, per sample id."""

    def __init__(self, seed: int, ids: torch.Tensor, shape: Sequence[int], stream: int):
        self.stream = rng.NoiseStream(seed, ids, tuple(shape), stream=stream, dtype=torch.float64)

    def sample(self, draw: int) -> torch.Tensor:
        return self.stream.normal(draw)

    def uniform(self, draw: int) -> torch.Tensor:
        return self.stream.uniform(draw)


# --------------------------------------------------------------------------------------
# Manifold states (components that provide or require "manifold-state")
# --------------------------------------------------------------------------------------
#
# A manifold chain keeps its state on a manifold embedded in the state tensor and exposes
# its maps to samplers through ``level.chain``: ``exp_map(x, v)``, ``project_tangent(x,
# v)``, ``score(x, x0_hat, level)`` (the model's score from the denoiser's output, which a
# score parameterization makes x0_hat = x + sigma^2 s at alpha = 1), ``denoised(x, score,
# level)`` (exp_x(sigma^2 s)), ``kernel_score(x_t, x0, sigma)`` (the perturbation kernel's
# score), ``walk(x0, sigma, noise)`` (a draw from that kernel), ``distance(x, y)``
# (geodesic, per sample), ``manifold_error(x)`` (per-sample distance from the manifold) and
# ``uniform_state(u)``. The kit's checks use states of 3-vectors (``state_spec`` of (3,) data).

#: the kit's manifold states: data of this shape
_MANIFOLD_SHAPE = (3,)
#: the level of the kit's small-noise checks (sigma = exp(-lambda / 2) = 0.05 on alpha = 1 chains)
_MANIFOLD_SMALL_LOGSNR = -2.0 * math.log(0.05)


def _manifold_problem(chain: Chain, x: torch.Tensor, tol: float) -> Optional[str]:
    """None when every state of ``x`` lies on the chain's manifold within ``tol``, else what is wrong."""
    if not torch.isfinite(x).all():
        return "non-finite values"
    error = chain.manifold_error(x)
    if error.shape != x.shape[:1]:
        return f"manifold_error must return one value per sample, shape {tuple(x.shape[:1])}, got {tuple(error.shape)}"
    if error.max().item() > tol:
        return f"a state is {error.max().item():.3g} off the manifold (allowed {tol:.3g})"
    return None


def _check_manifold_chain(chain: Chain, seed: int) -> None:
    """The maps of a chain that provides ``"manifold-state"`` (list above), in float64 on
    n = 512 states of 3-vectors, with tolerance R U:

    * ``initial_state`` (from the kit's uniforms), ``encode`` of normal 3-vectors, ``prior``
      (from normals), ``exp_map``,
      ``walk`` at sigma in {0.05, 1, 3} and ``perturb`` return states on the manifold
      (``manifold_error`` <= R U);
    * ``project_tangent`` is idempotent, ``exp_map(x, 0) = x``, and the exponential map is a
      unit-speed geodesic: ``distance(x, exp_map(x, v)) = |v|`` for tangent |v| <= 1 (below
      the injectivity radius of the built-in manifolds, pi), within R U (1 + |v|);
    * ``decode`` returns states of the data's shape;
    * ``kernel_score`` and ``score`` are tangent (``project_tangent`` leaves them within
      R U |s|), and ``score(x, x + sigma^2 v, level) = v`` for tangent v, within
      R U (|x| + sigma^2 |v|) / sigma^2 (the rounding of the difference x0_hat - x);
    * Varadhan's limit at sigma = 0.05: ``denoised`` with the kernel score takes the walk's
      states x_t back towards x0, sigma^2 grad log p(x_t | x0) ~ log_{x_t}(x0): the mean
      distance to x0 after it is below 0.1 of the mean distance before.
    """
    n, r = 512, ROUNDINGS
    shape = tuple(chain.state_spec(DataSpec(shape=_MANIFOLD_SHAPE)).shape)
    ids = torch.arange(n)
    source = rng.NoiseStream(seed, ids, shape, stream=_KIT_STREAM, dtype=torch.float64)  # normals and uniforms
    terminal = chain.level(LOGSNR_RANGE[0])

    def on_manifold(x: torch.Tensor, what: str) -> torch.Tensor:
        x = _is_tensor(x, chain, what)
        if tuple(x.shape) != (n, *shape):
            _fail(chain, f"{what} must return states of shape {(n, *shape)}, got {tuple(x.shape)}")
        problem = _manifold_problem(chain, x, r * U * (1.0 + x.abs().max().item()))
        if problem:
            _fail(chain, f"{what}: {problem}")
        return x

    x = on_manifold(chain.initial_state(terminal, source), "initial_state")
    on_manifold(chain.encode(source.sample(4)), "encode")
    if tuple(chain.decode(x).shape[1:]) != _MANIFOLD_SHAPE:
        _fail(chain, f"decode must return the data shape {_MANIFOLD_SHAPE}, got {tuple(chain.decode(x).shape[1:])}")
    on_manifold(chain.prior(terminal, source.sample(1)), "prior")
    v = chain.project_tangent(x, source.sample(2))
    again = chain.project_tangent(x, v)
    if (again - v).abs().max().item() > r * U * (1.0 + v.abs().max().item()):
        _fail(chain, "project_tangent is not idempotent: projecting a tangent vector again changes it")
    if (on_manifold(chain.exp_map(x, torch.zeros_like(v)), "exp_map(x, 0)") - x).abs().max().item() > r * U * (1.0 + x.abs().max().item()):
        _fail(chain, "exp_map(x, 0) must return x")
    length = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    unit = v / length.clamp(min=_TINY)
    speeds = torch.linspace(0.01, 1.0, n, dtype=torch.float64)[:, None]
    y = on_manifold(chain.exp_map(x, speeds * unit), "exp_map")
    gap = (_is_tensor(chain.distance(x, y), chain, "distance") - speeds[:, 0]).abs().max().item()
    if gap > r * U * 2.0:
        _fail(chain, f"exp_map is not a unit-speed geodesic: distance(x, exp_map(x, v)) differs from |v| <= 1 by {gap:.3g}")
    small = chain.level(_MANIFOLD_SMALL_LOGSNR)
    for sigma in (small.sigma, 1.0, 3.0):
        x_t = on_manifold(chain.walk(x, torch.full((n,), sigma, dtype=torch.float64), source), f"walk at sigma {sigma:g}")
        s = _is_tensor(chain.kernel_score(x_t, x, torch.full((n,), sigma, dtype=torch.float64)), chain, "kernel_score")
        if s.shape != x_t.shape or not torch.isfinite(s).all():
            _fail(chain, f"kernel_score at sigma {sigma:g} must return finite tangent vectors shaped like the state")
        if (chain.project_tangent(x_t, s) - s).abs().max().item() > r * U * (1.0 + s.abs().max().item()):
            _fail(chain, f"kernel_score at sigma {sigma:g} is not tangent (project_tangent changes it)")
    alpha, sigma = chain.alpha_sigma(torch.full((n,), small.logsnr, dtype=torch.float64))
    on_manifold(chain.perturb(x, source.sample(3), alpha[:, None], sigma[:, None]), "perturb")
    level = chain.level(2.0 * math.log(2.0))  # sigma = 0.5
    recovered = _is_tensor(chain.score(x, x + level.sigma**2 * v, level), chain, "score")
    tol = r * U * (x.abs().max().item() + level.sigma**2 * v.abs().max().item()) / level.sigma**2
    if (recovered - v).abs().max().item() > tol:
        _fail(chain, f"score(x, x + sigma^2 v, level) must recover the tangent v, off by {(recovered - v).abs().max().item():.3g}")
    x_t = chain.walk(x, torch.full((n,), small.sigma, dtype=torch.float64), source)
    score = chain.kernel_score(x_t, x, torch.full((n,), small.sigma, dtype=torch.float64))
    back = on_manifold(chain.denoised(x_t, score, small), "denoised")
    before, after = chain.distance(x_t, x).mean().item(), chain.distance(back, x).mean().item()
    if not after < 0.1 * before:
        _fail(chain, f"at sigma {small.sigma:g} the kernel score does not point back to x0: exp_x(sigma^2 score) is {after:.3g} from x0 on average, x_t {before:.3g}")


def _check_manifold_sampler(sampler: Sampler, chain: Optional[Chain], batch: int, seed: int, per_sample: bool) -> None:
    """The part of :func:`check_sampler` for samplers that require ``"manifold-state"``, with
    a ``chain`` that provides it (maps above), on states of 3-vectors.

    The data are one point m of the manifold, so the exact score at every level is the
    perturbation kernel's, ``chain.kernel_score(x, m, sigma)``, and the exact denoiser is
    x + sigma^2 times it (the score parameterization). The levels are ``sampler.steps``
    logSNRs evenly spaced from sigma = 4 (where the perturbed point is uniform on the
    built-in manifolds within 1e-6) to sigma = 0.02, then the clean level, from
    ``chain.level``; the start is ``chain.initial_state``. Checked: finite float64 results
    shaped like the start; every state and x0 handed to ``callback`` on the manifold
    (``manifold_error`` <= R U); identical results on a second run with the same streams;
    with ``per_sample``, sample i alone equals sample i in the batch (to R U); and a sanity
    band: the mean geodesic distance of the samples to m is below 0.1 (a sampler that
    returns its uniform start is about 1.6 or more away, one that ignores the score too).
    """
    if chain is None or MANIFOLD_STATE not in type(chain).provides:
        raise ValueError(f"{_name(sampler)} requires '{MANIFOLD_STATE}': pass chain= a chain that provides it")
    shape = tuple(chain.state_spec(DataSpec(shape=_MANIFOLD_SHAPE)).shape)
    lams = torch.linspace(-2.0 * math.log(4.0), -2.0 * math.log(0.02), sampler.steps, dtype=torch.float64).tolist()
    grid = [chain.level(v) for v in lams] + [chain.level(math.inf)]
    point = chain.initial_state(grid[0], rng.NoiseStream(seed, torch.tensor([10**6]), shape, stream=_KIT_STREAM, dtype=torch.float64))
    seen_types: set[type] = set()

    def denoise(x: torch.Tensor, level: Level) -> torch.Tensor:
        seen_types.add(type(level))
        sigma = torch.full((x.shape[0],), level.sigma, dtype=torch.float64)
        return x + level.sigma**2 * chain.kernel_score(x, point.expand_as(x), sigma)

    def run(ids: torch.Tensor, callback=None) -> torch.Tensor:
        start = chain.initial_state(grid[0], rng.NoiseStream(seed, ids, shape, stream=rng.STREAM_PRIOR, dtype=torch.float64))
        return sampler.sample(denoise, start, grid, rng.NoiseStream(seed, ids, shape, stream=rng.STREAM_SAMPLER, dtype=torch.float64), callback)

    problems: list[str] = []

    def callback(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        for what, value in (("x", x), ("x0", x0)):
            problem = None if tuple(value.shape) == (batch, *shape) else f"shape {tuple(value.shape)}"
            problem = problem or _manifold_problem(chain, value, ROUNDINGS * U * (1.0 + value.abs().max().item()))
            if problem and not problems:
                problems.append(f"callback({i}, x, x0): {what}: {problem}")

    ids = torch.arange(batch)
    out = _is_tensor(run(ids, callback), sampler, "sample")
    expected = (batch, *shape)
    if out.shape != expected or out.dtype != torch.float64 or not torch.isfinite(out).all():
        _fail(sampler, f"sample must return finite float64 values of the start's shape {expected}, got {out.dtype} {tuple(out.shape)}")
    if seen_types != {Level}:
        _fail(sampler, f"denoise must be called with fundiff.Level objects, got {seen_types or 'no calls'}")
    if problems:
        _fail(sampler, f"every intermediate state must lie on the manifold: {problems[0]}")
    problem = _manifold_problem(chain, out, ROUNDINGS * U * (1.0 + out.abs().max().item()))
    if problem:
        _fail(sampler, f"the samples must lie on the manifold: {problem}")
    _check_repeatable(sampler, run, ids, out, per_sample, tol=ROUNDINGS * U * (1 + out.abs().max().item()))
    mean_distance = chain.distance(out, point.expand_as(out)).mean().item()
    if not mean_distance < 0.1:
        _fail(sampler, f"with the exact score of data at one point m, the samples are {mean_distance:.3g} from m on average (sanity band: < 0.1)")


# --------------------------------------------------------------------------------------
# Step selection
# --------------------------------------------------------------------------------------


def check_spacing(
    spacing: Spacing,
    schedule: Optional[Schedule] = None,
    chain: Optional[Chain] = None,
    *,
    steps: Sequence[int] = (1, 2, 3, 10, 50),
) -> None:
    """Check a spacing's contract on a schedule (default: logSNR linear from 15 to -15) and a
    chain (default: the core VP math), for each number of ``steps``.

    * ``levels(schedule, chain, steps)`` returns a list of ``steps + 1`` :class:`fundiff.Level`
      objects holding Python floats (host-side: no device tensors in the sampling loop);
    * strictly increasing logSNR (from noisy to clean), the last level clean (logSNR +inf,
      sigma 0), every other one noisy (sigma > 0) and within the schedule's range
      [lambda(1), lambda(t_min)] up to R U (1 + |lambda|), where the model was trained;
    * every level is the chain's: alpha and sigma equal ``chain.level(logSNR)``'s within R U
      relative;
    * deterministic: a second call returns the same levels.
    """
    schedule = schedule or _LinearLogSNRSchedule()
    chain = chain or _CoreVPChain()
    lo = schedule.logsnr_at(1.0)
    hi = schedule.logsnr_at(float(schedule.t_min))
    for n in steps:
        grid = spacing.levels(schedule, chain, n)
        where = f"with {n} steps"
        if not isinstance(grid, list) or len(grid) != n + 1:
            _fail(spacing, f"levels must return a list of steps + 1 = {n + 1} levels {where}, got {type(grid).__name__} of length {len(grid) if hasattr(grid, '__len__') else '?'}")
        for i, level in enumerate(grid):
            if not isinstance(level, Level) or not all(type(v) is float for v in (level.logsnr, level.alpha, level.sigma)):
                _fail(spacing, f"level {i} {where} must be a fundiff.Level of Python floats, got {level!r}")
        logsnrs = [level.logsnr for level in grid]
        if any(not b > a for a, b in zip(logsnrs, logsnrs[1:])):
            i = next(i for i, (a, b) in enumerate(zip(logsnrs, logsnrs[1:])) if not b > a)
            _fail(spacing, f"logSNR must increase strictly {where}: level {i} has {logsnrs[i]!r}, level {i + 1} has {logsnrs[i + 1]!r}")
        if not (grid[-1].logsnr == math.inf and grid[-1].is_clean):
            _fail(spacing, f"the last level must be clean (logSNR inf, sigma 0) {where}, got {grid[-1]!r}")
        for i, level in enumerate(grid[:-1]):
            if not level.sigma > 0:
                _fail(spacing, f"level {i} {where} is clean before the last level: {level!r}")
            slack = ROUNDINGS * U * (1 + abs(level.logsnr)) if math.isfinite(level.logsnr) else 0.0
            if not (lo - slack <= level.logsnr <= hi + slack):
                _fail(spacing, f"level {i} {where} has logSNR {level.logsnr!r}, outside the schedule's range [{lo}, {hi}]")
        for i, level in enumerate(grid):
            ref = chain.level(level.logsnr)
            for what, a, b in (("alpha", level.alpha, ref.alpha), ("sigma", level.sigma, ref.sigma)):
                if abs(a - b) > ROUNDINGS * U * abs(b):
                    _fail(spacing, f"level {i} {where}: {what} {a!r} differs from chain.level(logSNR).{what} {b!r}")
        again = spacing.levels(schedule, chain, n)
        if again != grid:
            _fail(spacing, f"levels is not deterministic {where}: two calls differ")


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def check_noise(noise: Noise, *, batch: int = 8192, shape: Sequence[int] = (4, 4), seed: int = 0) -> None:
    """Check a noise type's contract.

    * ``sample(stream, draw)`` returns a finite tensor of shape (batch, *shape) in the
      stream's dtype (float64 and float32 are both tried);
    * the same draw gives the same numbers; another draw, or another seed, different ones;
    * zero mean and unit variance per element: over n = batch * prod(shape) values the mean
      is within ``Z_SCORE`` / sqrt(n) of 0 and the variance within ``Z_SCORE`` sqrt((m4 -
      1) / n) of 1, m4 the sample fourth central moment (the CLT standard errors);
    * per-sample streams: sample i's noise is the same in any batch, at any position
      (``fundiff.NoiseStream`` with a different set of sample ids).
    """
    shape = tuple(shape)

    def draw(ids, draw_index, *, s=seed, dtype=torch.float64):
        stream = rng.NoiseStream(s, ids, shape, stream=_KIT_STREAM, dtype=dtype)
        return _is_tensor(noise.sample(stream, draw_index), noise, "sample")

    ids = torch.arange(batch)
    z = draw(ids, 0)
    if z.shape != (batch, *shape) or z.dtype != torch.float64:
        _fail(noise, f"sample must return shape {(batch, *shape)} in the stream's dtype float64, got {tuple(z.shape)} {z.dtype}")
    if not torch.isfinite(z).all():
        _fail(noise, "sample returned non-finite values")
    z32 = draw(ids[:8], 0, dtype=torch.float32)
    if z32.dtype != torch.float32 or z32.shape != (8, *shape):
        _fail(noise, f"sample must follow the stream's dtype (float32), got {z32.dtype}")
    if not torch.equal(z, draw(ids, 0)):
        _fail(noise, "the same stream and draw gave different numbers")
    if torch.equal(z, draw(ids, 1)):
        _fail(noise, "draw 0 and draw 1 gave the same numbers")
    if torch.equal(z, draw(ids, 0, s=seed + 1)):
        _fail(noise, "seeds differing by one gave the same numbers")
    n = z.numel()
    mean = z.mean().item()
    var = z.var().item()
    m4 = ((z - mean) ** 4).mean().item()
    if abs(mean) > Z_SCORE / math.sqrt(n):
        _fail(noise, f"mean {mean:.4g} over {n} values is more than {Z_SCORE} standard errors ({Z_SCORE / math.sqrt(n):.3g}) from 0")
    se_var = math.sqrt(max(m4 - 1.0, 0.0) / n)
    if abs(var - 1.0) > Z_SCORE * se_var:
        _fail(noise, f"variance {var:.4g} over {n} values is more than {Z_SCORE} standard errors ({Z_SCORE * se_var:.3g}) from 1")
    sub = torch.tensor([batch - 1, 0, 7, batch // 2])
    part = draw(sub, 0)
    if not torch.equal(part, z[sub]):
        _fail(noise, f"sample i depends on its batch: ids {sub.tolist()} drawn alone differ from the full batch")


# --------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------


def check_data(data: DataSet) -> None:
    """Check a data set's contract.

    ``load()`` returns float32, finite ``x`` of shape (N, *spec.shape) with N >= 1, the same
    spec as ``spec()``, labels None or int64 (N,) in [0, num_classes), and the same data when
    loaded twice.
    """
    spec = data.spec()
    loaded = data.load()
    if loaded.spec != spec:
        _fail(data, f"load().spec {loaded.spec} differs from spec() {spec}")
    x = _is_tensor(loaded.x, data, "load().x")
    if x.dtype != torch.float32 or x.ndim != len(spec.shape) + 1 or tuple(x.shape[1:]) != tuple(spec.shape) or x.shape[0] < 1:
        _fail(data, f"x must be float32 of shape (N, *{tuple(spec.shape)}), got {x.dtype} {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        _fail(data, "x has non-finite values")
    if loaded.labels is not None:
        labels = loaded.labels
        if labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
            _fail(data, f"labels must be int64 of shape ({x.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
        if spec.num_classes > 0 and not ((labels >= 0) & (labels < spec.num_classes)).all():
            _fail(data, f"labels must be in [0, {spec.num_classes})")
    again = data.load()
    if not torch.equal(again.x, x):
        _fail(data, "load() is not deterministic for fixed parameters")


# --------------------------------------------------------------------------------------
# Categorical states (components that provide or require "categorical-state")
# --------------------------------------------------------------------------------------
#
# A categorical chain's state is one-hot over M classes along axis 1 of a batch. The reverse
# step a categorical sampler draws from is the chain's, reached through ``level.chain``:
# ``posterior(x_t, x0, s, t)`` (probabilities of x_s; x0 one-hot or a predicted
# distribution), ``x0_distribution(probs)`` (a prediction as a distribution over the data
# classes) and ``sample_categorical(probs, u)`` (one-hot draws at uniforms u).

#: data classes and positions of the kit's categorical test data
_CATEGORICAL_SHAPE = (3, 5)


def _one_hot_problem(x: torch.Tensor, num_classes: int) -> Optional[str]:
    """None when ``x`` is one-hot over ``num_classes`` classes along axis 1, else what is wrong."""
    if x.ndim < 2 or x.shape[1] != num_classes:
        return f"shape {tuple(x.shape)} has not {num_classes} classes on axis 1"
    if not bool(((x == 0) | (x == 1)).all()):
        return "values other than 0 and 1"
    if not bool((x.sum(1) == 1).all()):
        return "positions without exactly one class"
    return None


def _kit_one_hot(seed: int, draw: int, n: int, num_classes: int, positions: int) -> torch.Tensor:
    """(n, num_classes, positions) float64 one-hot with uniformly random classes."""
    classes = (_kit_uniform_shaped(seed, draw, n, (positions,)) * num_classes).long().clamp(max=num_classes - 1)
    return torch.nn.functional.one_hot(classes, num_classes).movedim(-1, 1).to(torch.float64)


def _kit_uniform_shaped(seed: int, draw: int, n: int, shape: Sequence[int]) -> torch.Tensor:
    return rng.uniform(seed, _KIT_STREAM, draw, torch.arange(n), tuple(shape))


def _check_categorical_chain(chain: Chain, seed: int) -> None:
    """The part of :func:`check_chain` for chains that provide ``"categorical-state"``.

    On one-hot data with K = 3 classes at 5 positions: ``state_spec`` keeps the positions and
    has at least K classes; ``encode`` gives one-hot states and ``decode`` undoes it exactly;
    ``perturb`` (with (alpha, sigma) from ``alpha_sigma``) returns one-hot states, leaves x0
    unchanged at the clean level ``level(inf)``, and the fraction of positions that keep their
    class does not grow as lambda falls (-2 .. 2, within ``Z_SCORE`` binomial standard
    errors of a difference); ``prior`` and ``initial_state`` return one-hot states. A chain
    with ``posterior``: q(x_s | x_t, x0) is a distribution at every position (non-negative,
    summing to 1 within R U M) and averages back to the marginal over x_t ~ q(x_t | x0) (the
    law of total probability: its mean over 20000 draws matches the frequencies of
    ``perturb`` at s within ``Z_SCORE`` standard errors of a difference of two means of
    [0, 1] variables, Z sqrt(2) / (2 sqrt(n))), and at s = t it is the point mass at x_t, at
    the clean level s the point mass at x0 (within R U M)."""
    from .components import DataSpec

    k, positions = _CATEGORICAL_SHAPE
    state = chain.state_spec(DataSpec(shape=(k, positions)))
    m = state.shape[0]
    if tuple(state.shape[1:]) != (positions,) or m < k:
        _fail(chain, f"state_spec of one-hot data of shape {(k, positions)} must keep the positions and >= {k} classes, got {tuple(state.shape)}")
    n = 20000
    x0 = _kit_one_hot(seed, 20, n, k, positions)
    encoded = _is_tensor(chain.encode(x0), chain, "encode")
    problem = _one_hot_problem(encoded, m)
    if problem:
        _fail(chain, f"encode of one-hot data must give one-hot states over {m} classes: {problem}")
    decoded = _is_tensor(chain.decode(encoded), chain, "decode")
    if decoded.shape != x0.shape or not torch.equal(decoded.to(x0.dtype), x0):
        _fail(chain, "decode(encode(x0)) must give back the one-hot data x0")

    def perturb_at(logsnr: float, draw: int) -> torch.Tensor:
        alpha, sigma = chain.alpha_sigma(torch.full((n,), logsnr, dtype=torch.float64))
        noise = rng.NoiseStream(seed, torch.arange(n), (m, positions), stream=_KIT_STREAM, dtype=torch.float64).normal(draw)
        x_t = _is_tensor(chain.perturb(encoded, noise, alpha[:, None, None], sigma[:, None, None]), chain, "perturb")
        problem = _one_hot_problem(x_t, m)
        if problem:
            _fail(chain, f"perturb at logsnr {logsnr:g} must return one-hot states: {problem}")
        return x_t

    clean = chain.level(math.inf)
    if not clean.is_clean:
        _fail(chain, f"level(inf) must be the clean level (sigma = 0), got {clean}")
    if not torch.equal(perturb_at(math.inf, 21), encoded):
        _fail(chain, "perturb at the clean level (logsnr = inf) must leave x0 unchanged")
    kept = []
    for draw, value in enumerate((2.0, 0.0, -2.0)):
        kept.append((perturb_at(value, 22 + draw) * encoded).sum(1).mean().item())
    tol = Z_SCORE * math.sqrt(2.0 * 0.25 / (n * positions))
    if any(later > earlier + tol for earlier, later in zip(kept, kept[1:])):
        _fail(chain, f"the fraction of positions that keep their class must not grow with noise; at logsnr 2, 0, -2 it is {kept}")
    terminal = chain.level(-2.0)
    source = _KitSource(seed, torch.arange(16), (m, positions), _KIT_STREAM)
    for what, value in (("prior", lambda: chain.prior(terminal, source.sample(0))), ("initial_state", lambda: chain.initial_state(terminal, source))):
        problem = _one_hot_problem(_is_tensor(value(), chain, what), m)
        if problem:
            _fail(chain, f"{what} must return one-hot states over {m} classes: {problem}")
    if not hasattr(chain, "posterior"):
        return
    s, t = chain.level(1.0), chain.level(-1.0)
    post = _is_tensor(chain.posterior(perturb_at(t.logsnr, 30), encoded, s, t), chain, "posterior")
    if post.shape != encoded.shape or not bool((post >= 0).all()):
        _fail(chain, f"posterior must give non-negative probabilities shaped like the state {tuple(encoded.shape)}")
    worst = (post.sum(1) - 1).abs().max().item()
    if worst > ROUNDINGS * U * m:
        _fail(chain, f"posterior probabilities must sum to 1 at every position, off by {worst:.3g}")
    mean_post, freq = post.mean(0), perturb_at(s.logsnr, 31).mean(0)
    tol = Z_SCORE * math.sqrt(2.0) * 0.5 / math.sqrt(n)
    if ((mean_post - freq).abs() > tol).any():
        _fail(
            chain,
            "posterior does not average back to the marginal q(x_s | x0) over x_t ~ q(x_t | x0): largest gap "
            f"{(mean_post - freq).abs().max().item():.3g} (allowed {tol:.3g})",
        )
    x_t = perturb_at(t.logsnr, 32)
    for what, level, expected in (("s = t", t, x_t), ("the clean level s", clean, encoded)):
        worst = (chain.posterior(x_t, encoded, level, t) - expected).abs().max().item()
        if worst > ROUNDINGS * U * m:
            _fail(chain, f"posterior at {what} must be the point mass at {'x_t' if level is t else 'x0'}, off by {worst:.3g}")


def _check_categorical_parameterization(param: Parameterization, chain: Optional[Chain], logsnr_range: tuple[float, float], seed: int) -> None:
    """The part of :func:`check_parameterization` for parameterizations that require
    ``"categorical-state"`` (the network output is read as a distribution over the classes
    on axis 1). At 61 levels in ``logsnr_range`` (alpha, sigma from ``chain.alpha_sigma``,
    default alpha = sigmoid(lambda), sigma = sigmoid(-lambda)), for outputs 3 N(0, 1) over
    M = 3 classes at 4 positions and one-hot x_t:

    * ``to_x0`` gives float64 probabilities shaped like the output: non-negative, summing to 1
      at every position within R U M;
    * ``to_x0(from_x0(p)) == p`` for p = those probabilities and for one-hot p, within R U
      (1 + max |log p|) (a log and an exp per element);
    * ``input_scale`` is finite and positive.
    """
    if chain is not None and CATEGORICAL_STATE not in type(chain).provides:
        raise ValueError(f"{_name(param)} requires '{CATEGORICAL_STATE}': check it with a chain that provides it, not {_name(chain)}")
    lam = torch.linspace(logsnr_range[0], logsnr_range[1], 61, dtype=torch.float64)
    alpha, sigma = chain.alpha_sigma(lam) if chain is not None else (torch.sigmoid(lam), torch.sigmoid(-lam))
    n, m, positions = lam.numel(), 3, 4
    a, s = noiselevel.append_dims(alpha, 3), noiselevel.append_dims(sigma, 3)
    out = 3.0 * _kit_normal(seed, 40, n, (m, positions))
    x_t = _kit_one_hot(seed, 41, n, m, positions)
    probs = _is_tensor(param.to_x0(out, x_t, a, s), param, "to_x0")
    if probs.shape != out.shape or probs.dtype != torch.float64 or not torch.isfinite(probs).all():
        _fail(param, f"to_x0 must give finite float64 probabilities shaped like the output {tuple(out.shape)}, got {tuple(probs.shape)} {probs.dtype}")
    worst = (probs.sum(1) - 1).abs().max().item()
    if not bool((probs >= 0).all()) or worst > ROUNDINGS * U * m:
        _fail(param, f"to_x0 must give a distribution over axis 1 at every position (sums off by {worst:.3g})")
    for what, p in (("predicted probabilities", probs), ("one-hot x0", x_t)):
        back = _is_tensor(param.to_x0(param.from_x0(p, x_t, a, s), x_t, a, s), param, "to_x0(from_x0)")
        tol = ROUNDINGS * U * (1 + torch.log(p.clamp(min=_TINY)).abs().max().item())
        if back.shape != p.shape or (back - p).abs().max().item() > tol:
            _fail(param, f"to_x0(from_x0(p)) != p for {what}: off by {(back - p).abs().max().item():.3g} (allowed {tol:.3g})")
    c_in = torch.as_tensor(param.input_scale(a, s), dtype=torch.float64)
    if not (torch.isfinite(c_in).all() and (c_in > 0).all()):
        _fail(param, "input_scale must be finite and > 0")


def _check_categorical_sampler(sampler: Sampler, chain: Optional[Chain], logsnr_range: tuple[float, float], batch: int, seed: int, per_sample: bool) -> None:
    """The part of :func:`check_sampler` for samplers that require ``"categorical-state"``.

    The data are one point: one-hot over K = 3 classes at 5 positions. Its exact x0
    prediction is that point at every x_t (the posterior of a point mass is the point mass),
    so a correct categorical sampler that ends on the clean level returns exactly that point
    for every sample, from any start. The levels are ``sampler.steps`` logSNRs evenly spaced
    over ``logsnr_range`` and then the clean level, from ``chain.level``; the start is
    ``chain.initial_state``. Checked: one-hot float64 results shaped like the start; every
    sample equals the data point; ``denoise`` called with :class:`fundiff.Level` objects and
    ``callback(i, x, x0)`` with state-shaped tensors; identical results on a second run with
    the same streams; with ``per_sample``, sample i alone equals sample i in the batch.
    """
    from .components import DataSpec

    if chain is None or CATEGORICAL_STATE not in type(chain).provides:
        raise ValueError(f"{_name(sampler)} requires '{CATEGORICAL_STATE}': pass chain= a chain that provides it")
    k, positions = _CATEGORICAL_SHAPE
    m = chain.state_spec(DataSpec(shape=(k, positions))).shape[0]
    point = chain.encode(torch.nn.functional.one_hot(torch.tensor([[0, 2, 1, 2, 0]]), k).movedim(-1, 1).to(torch.float64))
    lams = torch.linspace(logsnr_range[0], logsnr_range[1], sampler.steps, dtype=torch.float64).tolist()
    grid = [chain.level(v) for v in lams] + [chain.level(math.inf)]
    seen_types: set[type] = set()

    def denoise(x: torch.Tensor, level: Level) -> torch.Tensor:
        seen_types.add(type(level))
        return point.expand(x.shape[0], -1, -1)

    def run(ids: torch.Tensor, callback=None) -> torch.Tensor:
        start = chain.initial_state(grid[0], _KitSource(seed, ids, (m, positions), rng.STREAM_PRIOR))
        return sampler.sample(denoise, start, grid, _KitSource(seed, ids, (m, positions), rng.STREAM_SAMPLER), callback)

    ids = torch.arange(batch)
    calls: list[tuple[int, tuple, tuple]] = []
    out = _is_tensor(run(ids, lambda i, x, x0: calls.append((i, tuple(x.shape), tuple(x0.shape)))), sampler, "sample")
    expected = (batch, m, positions)
    if out.shape != expected or out.dtype != torch.float64:
        _fail(sampler, f"sample must return the start's shape {expected} and dtype float64, got {tuple(out.shape)} {out.dtype}")
    problem = _one_hot_problem(out, m)
    if problem:
        _fail(sampler, f"sample must return one-hot states: {problem}")
    if seen_types != {Level}:
        _fail(sampler, f"denoise must be called with fundiff.Level objects, got {seen_types or 'no calls'}")
    if not calls or any(c[1] != expected or c[2] != expected for c in calls):
        _fail(sampler, f"callback(i, x, x0) must be called with tensors of shape {expected}, got {calls[:1] or 'no calls'}")
    wrong = (out != point).any(1).sum().item()
    if wrong:
        _fail(sampler, f"with the exact prediction of one-point data, {wrong} of {batch * positions} sampled positions differ from the point")
    _check_repeatable(sampler, run, ids, out, per_sample, tol=0.0)  # categorical draws: exactly equal


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

_CHECKS: dict[str, Callable[..., None]] = {
    "data": check_data,
    "schedule": check_schedule,
    "chain": check_chain,
    "noise": check_noise,
    "parameterization": check_parameterization,
    "weighting": check_weighting,
    "sampler": check_sampler,
    "spacing": check_spacing,
}
#: component kinds :func:`check_component` has checks for
COVERED_KINDS: tuple[str, ...] = tuple(_CHECKS)


def check_component(kind: str, component: Any, **context: Any) -> None:
    """Run the conformance check for ``kind`` on ``component``.

    ``context`` is passed on: ``chain=`` for parameterizations and samplers, ``schedule=``
    and ``chain=`` for weightings and spacings. Raises :class:`ValueError` for a kind the kit has no
    check for (see ``COVERED_KINDS``) and :class:`AssertionError` when the component is not
    an instance of the kind's base class or fails its check.
    """
    if kind not in KIND_BASES:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(KIND_BASES)}")
    if kind not in _CHECKS:
        raise ValueError(f"fundiff.testing has no check for kind {kind!r}; covered: {', '.join(COVERED_KINDS)}")
    base = KIND_BASES[kind]
    if not isinstance(component, base):
        raise AssertionError(f"{_name(component)} is not a fundiff.{base.__name__} (kind {kind!r})")
    _CHECKS[kind](component, **context)


# --------------------------------------------------------------------------------------
# Denoiser networks under FSDP (train.parallel: fsdp)
# --------------------------------------------------------------------------------------


def check_fsdp(network: torch.nn.Module, *inputs: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Check that a denoiser network trains under ``train.parallel: fsdp``.

    A copy of ``network`` is sharded as the trainer shards it
    (:func:`fundiff.distributed.shard`: its :func:`~fundiff.distributed.shard_units`, then
    the root) on the current process group, or on a one-process gloo group made for the
    check; its output on ``inputs`` (e.g. ``x, logsnr, labels``) and the gradients of the
    mean squared output must equal the plain copy's, and unsharding must give back the
    weights exactly. A unit whose parameters are used outside its own ``forward`` fails here
    (a sharded parameter meets a whole tensor); give the network an ``fsdp_units()`` method
    returning the modules that may be sharded on their own. With one process, sharding and
    the gradient reduce-scatter are copies, so output and gradients differ from the plain
    copy's by the order of float32 sums at most: ``rtol`` and ``atol`` bound that.
    """
    import copy
    import os
    import shutil
    import tempfile

    import torch.distributed as dist

    from . import distributed

    made_group, store = False, None
    if not dist.is_initialized():
        store = tempfile.mkdtemp(prefix="fundiff-fsdp-check-")
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(store, 'store')}", rank=0, world_size=1)
        made_group = True
    try:
        plain, sharded = copy.deepcopy(network), copy.deepcopy(network)
        skeleton = distributed.shard(sharded)
        expected, actual = plain(*inputs), sharded(*inputs)
        if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
            _fail(network, f"sharded output differs from the plain network's by {float((actual - expected).abs().max()):.3g}")
        expected.square().mean().backward()
        actual.square().mean().backward()
        grads = dict(plain.named_parameters())
        for name, param in sharded.named_parameters():
            if (param.grad is None) != (grads[name].grad is None):
                _fail(network, f"parameter {name} gets a gradient in only one of the plain and the sharded network")
            if param.grad is None:
                continue
            full = param.grad.full_tensor() if distributed.is_sharded(param.grad) else param.grad
            if not torch.allclose(full, grads[name].grad, rtol=rtol, atol=atol):
                _fail(network, f"sharded gradient of {name} differs by {float((full - grads[name].grad).abs().max()):.3g}")
        back = distributed.unshard(sharded, skeleton, next(iter(grads.values())).device)
        restored = back.state_dict()
        for name, tensor in plain.state_dict().items():
            if not torch.equal(restored[name], tensor):
                _fail(network, f"unsharding does not give back {name} exactly")
    finally:
        if made_group:
            dist.destroy_process_group()
            shutil.rmtree(store, ignore_errors=True)


def check_sampler_fused_agreement(
    sampler: Sampler,
    chain: Optional[Chain] = None,
    *,
    logsnr_range: tuple[float, float] = (-8.0, 8.0),
    batch: int = 5,
    shape: Sequence[int] = (3, 5, 7),
    seed: int = 0,
    scale: float = 3.0,
) -> None:
    """Check that a sampler gives the same samples through the fused executor
    (:mod:`fundiff.fused`, backend "triton") as through the reference (backend "torch").

    The denoiser is exact for Gaussian data, guided like classifier-free guidance with weight
    ``scale`` between two data means (the conditional and the unconditional branch), and
    offers its combine to fused steps (``denoise.deferred``); the noise source is a
    :class:`fundiff.NoiseStream` (in-kernel Philox on the fused path). The fused samples
    must be no further from a float64 reference run than 3 times the float32 reference
    run's error, plus 5e-6 per step for the in-kernel noise's float32 Box-Muller (see
    docs/fused-steps.md). A sampler that does not use the executor passes trivially.

    Needs a CUDA device, or ``TRITON_INTERPRET=1`` set before the first fused step of the
    process (Triton's interpreter on CPU tensors); raises FundiffError otherwise.
    """
    from . import fused
    from .errors import FundiffError

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not fused.interpreting():
        raise FundiffError("check_sampler_fused_agreement needs CUDA or TRITON_INTERPRET=1 (set before the first fused step)")
    chain = chain or _CoreVPChain()
    steps = sampler.steps
    lo, hi = logsnr_range
    levels = [chain.level(lo + (hi - lo) * i / max(steps - 1, 1)) for i in range(steps)] + [chain.level(math.inf)]
    ids = torch.arange(batch) + 1000 * seed
    mean_c, mean_u, std = 0.6, -0.3, 0.5

    def run(backend: str, dtype: torch.dtype) -> torch.Tensor:
        x = rng.NoiseStream(seed, ids, shape, stream=rng.STREAM_PRIOR, device=device, dtype=dtype).normal(0)
        noise = rng.NoiseStream(seed, ids, shape, stream=rng.STREAM_SAMPLER, device=device, dtype=dtype)

        def branches(x_t: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
            return gaussian_posterior_mean(x_t, level, torch.tensor(mean_c, dtype=dtype, device=device), std), gaussian_posterior_mean(
                x_t, level, torch.tensor(mean_u, dtype=dtype, device=device), std
            )

        def denoise(x_t: torch.Tensor, level: Level) -> torch.Tensor:
            x0_c, x0_u = branches(x_t, level)
            return torch.lerp(x0_u, x0_c, scale)

        def deferred(x_t: torch.Tensor, level: Level) -> fused.Prediction:
            return fused.Prediction(branches=branches(x_t, level), weights=(scale, 1.0 - scale))

        denoise.deferred = deferred  # type: ignore[attr-defined]
        with torch.no_grad(), fused.use_backend(backend):
            return sampler.sample(denoise, x, levels, noise)

    exact = run("torch", torch.float64)
    err_reference = float((run("torch", torch.float32).double() - exact).abs().max())
    err_fused = float((run("triton", torch.float32).double() - exact).abs().max())
    bound = 3.0 * err_reference + 5e-6 * steps * max(1.0, max(level.sigma for level in levels))
    if not err_fused <= bound:
        _fail(sampler, f"the fused path's samples are {err_fused:.3g} from the float64 reference run, more than {bound:.3g} (3 times the float32 reference's {err_reference:.3g} plus the in-kernel noise allowance)")
