"""A black-box adaptive solver of the probability-flow ODE, and the data log-likelihood it
gives (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", sec. 4.3 and appendix D.2; Chen et al. 2018 and Grathwohl et al. 2019, FFJORD,
for the instantaneous change of variables with Hutchinson's trace estimator).

The ODE. For any Gaussian chain, y = x~ = x / alpha and s~ = sigma / alpha = exp(-rho),
rho = lambda / 2, turn the PF-ODE into (Karras et al. 2022, eq. 4)

    variable "lambda":  dy / drho = D(alpha y; rho) - y          (default)
    variable "sigma":   dy / ds~  = (y - D(alpha y; s~)) / s~

with D the x0 estimate. The solver is Dormand-Prince 5(4) (Dormand and Prince 1980) with
local extrapolation, error control per ``rtol`` and ``atol`` (RMS norm over the batch,
Hairer et al. II.4) and the standard step-size controller, written in torch. In rho the
ODE's scales are even (the state changes by O(1) per unit of rho over the whole range), so
it needs fewer steps than in s~, which spans many decades.

Steps and levels. The solver chooses its own steps: ``steps`` only sets the grid the
pipeline passes, whose first and last levels are the start and the end (the grid between
them is ignored). The number of denoiser evaluations follows from rtol and atol (6 per
accepted or rejected step, plus 2 to choose the first step), so ``evaluations_per_step``
is not defined (None); ``max_steps`` caps accepted plus rejected steps. ``callback(i, x,
x0)`` is called after each accepted step. To reach the clean level (sigma = 0, rho = inf)
the solver integrates up to logSNR ``final_logsnr`` and returns the x0 estimate there; the
remaining noise s~ = exp(-final_logsnr / 2) (3e-7 at the default 30) changes that estimate
by O(s~^2). Off-grid levels take (alpha, sigma) from the grid's chain (VP or VE exactly, see
``_pfode.level_maker``).

Batches. The error norm runs over the whole batch, so the steps (and a sample's result,
within the tolerance) depend on the batch a sample is in; per-sample reproducibility holds
to about rtol, not bit for bit. The norm needs one device synchronisation per step.

Likelihood. :func:`log_likelihood` integrates the same ODE from the data (treated as the
state at logSNR ``data_logsnr``) to the terminal level together with the divergence,

    d/drho log p_rho(y(rho)) = -tr(d g / d y),   g = D - y,  tr(dg/dy) = tr(dD/dy) - dim,

so log p_data(x0) = log p_T(y_T) + integral from rho_0 to rho_T of tr(dg/dy) drho, with
p_T the chain's prior (a scaled standard normal, ``chain.prior(level, z) = c z``) carried
to y = x / alpha. The trace is exact (dim backward passes, for small data) or Hutchinson's
unbiased estimate v^T (dD/dy) v with Rademacher probes v, fixed along the path and drawn
per sample from :mod:`fundiff.rng` (stream ``PROBE_STREAM``, draw = probe index), so a
point's estimate does not depend on its batch beyond the solver tolerance.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import attrs
import torch

from fundiff import Sampler, hookimpl, rng
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, greater_than, one_of

from ._exponential import zero_snr_start
from ._pfode import dopri5, level_maker, sigma_tilde

#: the fundiff.rng stream of the Hutchinson probes (third-party range)
PROBE_STREAM = 1100
#: highest logSNR the likelihood starts from when the schedule's data end is higher (or infinite)
MAX_DATA_LOGSNR = 30.0


@attrs.frozen(kw_only=True)
class ODE(Sampler):
    """Adaptive Dormand-Prince 5(4) solver of the probability-flow ODE (deterministic)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    #: decided by rtol / atol, not by ``steps``
    evaluations_per_step = None
    #: the error norm runs over the batch: a sample's steps depend on its batch (within rtol)
    couples_batch = True

    rtol: float = attrs.field(default=1e-5, validator=greater_than(0.0), metadata=doc("relative tolerance of the error control"))
    atol: float = attrs.field(default=1e-5, validator=greater_than(0.0), metadata=doc("absolute tolerance (in units of x / alpha)"))
    variable: str = attrs.field(default="lambda", validator=one_of("lambda", "sigma"), metadata=doc("integrate in logSNR / 2 or in sigma / alpha"))
    float64: bool = attrs.field(default=False, metadata=doc("integrate in float64 whatever the input dtype"))
    max_steps: int = attrs.field(default=10000, validator=at_least(1), metadata=doc("cap on accepted plus rejected solver steps"))
    final_logsnr: float = attrs.field(default=30.0, metadata=doc("logSNR where the solve onto the clean level stops and returns x0"))

    def _time(self, logsnr: float) -> float:
        return 0.5 * logsnr if self.variable == "lambda" else math.exp(-0.5 * logsnr)

    def _logsnr(self, tau: float) -> float:
        return 2.0 * tau if self.variable == "lambda" else -2.0 * math.log(tau)

    def sample(self, denoise, x, levels, noise=None, callback=None):
        # from a zero-terminal-SNR level (alpha = 0, x / alpha infinite) take the exact first
        # step, x_s = alpha_s D + (sigma_s / sigma_t) x, then continue on the rest of the grid
        x, levels, _ = zero_snr_start(denoise, x, levels, callback)
        if len(levels) < 2:
            return x
        first, last = levels[0], levels[-1]
        if not (first.alpha > 0 and first.sigma > 0):
            raise ValueError("ode needs a first level with alpha > 0 and sigma > 0 (x / alpha must be finite)")
        make = level_maker(levels)
        end_logsnr = max(self.final_logsnr, first.logsnr) if last.sigma == 0.0 else last.logsnr
        dtype = torch.float64 if self.float64 else x.dtype
        y = x.to(dtype) * (1.0 / first.alpha)

        def f(state, tau):
            (y,) = state
            level = make(self._logsnr(tau))
            d = denoise(level.alpha * y, level).to(dtype)
            return (d - y,) if self.variable == "lambda" else ((y - d) * (1.0 / sigma_tilde(level)),)

        on_step = None
        if callback is not None:

            def on_step(n, tau, state, slope):
                level = make(self._logsnr(tau))
                x0 = state[0] + slope[0] if self.variable == "lambda" else state[0] - sigma_tilde(level) * slope[0]
                callback(n, (level.alpha * state[0]).to(x.dtype), x0.to(x.dtype))

        (y,), _ = dopri5(
            f, (y,), self._time(first.logsnr), self._time(end_logsnr), rtol=self.rtol, atol=self.atol, max_steps=self.max_steps, on_step=on_step
        )
        if last.sigma == 0.0:
            end = make(end_logsnr)
            out = last.alpha * denoise(end.alpha * y, end).to(dtype)
        else:
            out = last.alpha * y
        return out.to(x.dtype)

    def log_likelihood(self, denoise, x0, schedule, chain, **kwargs) -> torch.Tensor:
        """:func:`log_likelihood` with this solver's rtol, atol and max_steps."""
        kwargs.setdefault("rtol", self.rtol)
        kwargs.setdefault("atol", self.atol)
        kwargs.setdefault("max_steps", self.max_steps)
        return log_likelihood(denoise, x0, schedule, chain, **kwargs)


def rademacher_probes(seed: int, sample_ids: torch.Tensor, shape, count: int) -> list[torch.Tensor]:
    """``count`` float64 tensors of +-1, shape (B, *shape), row i a function of (seed, id_i, probe)."""
    return [torch.where(rng.uniform(seed, PROBE_STREAM, k, sample_ids, shape) < 0.5, -1.0, 1.0) for k in range(count)]


def log_likelihood(
    denoise: Callable,
    x0: torch.Tensor,
    schedule,
    chain,
    *,
    probes: int = 1,
    exact_trace: bool = False,
    seed: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10000,
    data_logsnr: Optional[float] = None,
    terminal_logsnr: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-example log-density (nats) of data ``x0`` (B, *shape) under the PF-ODE model.

    ``denoise(x, level) -> x0`` (the recipe's network through its parameterization, or any
    callable, differentiable in x); ``schedule`` and ``chain`` give the levels. The ODE runs
    in rho = lambda / 2 from ``data_logsnr`` (default: the schedule's lambda at t_min, at
    most ``MAX_DATA_LOGSNR``) down to ``terminal_logsnr`` (default: lambda(1)), where the
    chain's prior N(0, c^2 I) is evaluated. Treating x0 as the state at data_logsnr ignores
    the noise left there: O(dim s~^2 / data variance) nats. The prior's mismatch with the
    true terminal marginal is the other approximation: at most alpha_T |x_T| max|x0| nats
    per point to first order in alpha_T.

    ``exact_trace``: tr(dD/dy) from dim backward passes (small data); otherwise the mean of
    ``probes`` Hutchinson estimates with Rademacher probes from stream ``PROBE_STREAM``, keyed
    by ``seed`` and ``sample_ids`` (default 0 .. B - 1). The state and the log-density are
    float64; ``denoise`` sees ``dtype`` (default: x0's). Bits per dimension: -result / (dim
    log 2).
    """
    if probes < 1 and not exact_trace:
        raise ValueError(f"probes must be >= 1, got {probes}")
    batch = x0.shape[0]
    shape = tuple(x0.shape[1:])
    dim = math.prod(shape)
    dtype = dtype or x0.dtype
    if data_logsnr is None:
        data_logsnr = min(schedule.logsnr_at(float(schedule.t_min)), MAX_DATA_LOGSNR)
    if terminal_logsnr is None:
        terminal_logsnr = schedule.logsnr_at(1.0)
    if not (math.isfinite(data_logsnr) and math.isfinite(terminal_logsnr) and terminal_logsnr < data_logsnr):
        raise ValueError(
            f"log_likelihood needs finite levels with terminal_logsnr < data_logsnr, got {terminal_logsnr} and {data_logsnr}"
        )
    terminal = chain.level(terminal_logsnr)
    if not terminal.alpha > 0:
        raise ValueError("log_likelihood needs alpha > 0 at the terminal level (a zero-terminal-SNR schedule has no finite x / alpha)")
    ids = torch.arange(batch) if sample_ids is None else torch.as_tensor(sample_ids, dtype=torch.int64)
    vs = None if exact_trace else [v.to(x0.device) for v in rademacher_probes(seed, ids, shape, probes)]

    def f(state, rho):
        y, _ = state
        level = chain.level(2.0 * rho)
        with torch.enable_grad():
            y_in = y.detach().requires_grad_(True)
            d = denoise((level.alpha * y_in).to(dtype), level).to(torch.float64)
            trace = torch.zeros(batch, dtype=torch.float64, device=y.device)
            if exact_trace:
                flat = d.reshape(batch, dim)
                for j in range(dim):
                    (grad,) = torch.autograd.grad(flat[:, j].sum(), y_in, retain_graph=True)
                    trace = trace + grad.reshape(batch, dim)[:, j]
            else:
                for v in vs:
                    (grad,) = torch.autograd.grad(d, y_in, grad_outputs=v, retain_graph=True)
                    trace = trace + (grad * v).reshape(batch, dim).sum(1)
                trace = trace / len(vs)
        return (d.detach() - y, trace - dim)

    y0 = x0.detach().to(torch.float64)
    start = (y0, torch.zeros(batch, dtype=torch.float64, device=x0.device))
    (y_t, delta), _ = dopri5(f, start, 0.5 * data_logsnr, 0.5 * terminal_logsnr, rtol=rtol, atol=atol, max_steps=max_steps)
    # the chain's prior for x_T = alpha_T y_T: N(0, c^2 I) with c from prior(level, z) = c z
    one = torch.ones(1, dtype=torch.float64)
    c = float(chain.prior(terminal, one)[0])
    if not (c > 0 and abs(float(chain.prior(terminal, 2.0 * one)[0]) - 2.0 * c) <= 1e-12 * c):
        raise ValueError("log_likelihood needs a chain whose prior is a scaled standard normal, prior(level, z) = c z")
    scale = c / terminal.alpha  # y_T = x_T / alpha_T ~ N(0, scale^2 I)
    z = (y_t / scale).reshape(batch, dim)
    log_prior = -0.5 * (z * z).sum(1) - dim * (math.log(scale) + 0.5 * math.log(2.0 * math.pi))
    return log_prior + delta


@hookimpl
def fundiff_register_samplers(register):
    register("ode", ODE)
