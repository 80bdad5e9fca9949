"""Adaptive step-size DPM-Solver-23 (Lu et al. 2022, sec. 3.4 and Appendix C, "DPM-Solver-23"
with its step-size controller).

Each attempted step of size h (in lam = logSNR / 2) costs three evaluations, at lam_t and at
lam_t + h/3, lam_t + 2h/3, and yields two solutions: x_low, DPM-Solver-2 with its inner point
at r = 1/3, and x_high, DPM-Solver-3 (r1 = 1/3, r2 = 2/3), which share those evaluations
(``dpm_solver.singlestep``). Their difference estimates the local error of x_low:

    delta = max(atol, rtol * max(|x_low|, |x_prev|))      (elementwise; x_prev: last x_low)
    E     = max over samples of the RMS over elements of (x_low - x_high) / delta

The step is accepted when E <= 1 (the state moves on with x_high), rejected otherwise, and
the next size is h <- min(accept_safety * h * E^(-1/3), remaining interval) (Lu et al. use
theta = 0.9 and the exponent 1 / order of the lower solver plus one).

What the grid means here: integration starts at the grid's first level and ends at its last
noisy level; the levels in between are not visited, so ``steps`` only sets (through the
spacing) where the ODE part ends. A grid that ends clean then takes the usual final step onto
it: alpha_0 times the x0 estimate (one more evaluation). ``max_steps`` caps the attempted
steps (accepted and rejected); reaching it is an error that names the tolerances.

The accept/reject decision reads one scalar per attempted step back from the device: the
only host-device synchronisation in the family, inherent to error control. E is a maximum
over the batch, so the steps taken, hence each sample, depend on the rest of the batch
(unlike the fixed-grid samplers); callbacks report accepted steps. A first level with
alpha = 0 (zero terminal SNR) is left by a DDIM step, the exact limit there.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Sampler, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, greater_than, in_range

from ._exponential import lam, level_between, zero_snr_start
from .dpm_solver import singlestep


@attrs.frozen(kw_only=True)
class DPMSolverAdaptive(Sampler):
    """DPM-Solver-23 with error control: step sizes in logSNR chosen from rtol / atol."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    #: the error norm is a maximum over the batch: a sample's steps depend on its batch
    couples_batch = True
    evaluations_per_step = None  # adaptive: the step count follows the error control
    steps: int = attrs.field(default=50, validator=at_least(1), metadata=doc("grid size only: integration ends at the grid's last noisy level"))
    rtol: float = attrs.field(default=0.05, validator=greater_than(0.0), metadata=doc("relative tolerance of the local error estimate"))
    atol: float = attrs.field(default=0.0078, validator=greater_than(0.0), metadata=doc("absolute tolerance (0.0078 ~ 1/128 of data in [-1, 1], Lu et al.)"))
    h_init: float = attrs.field(default=0.05, validator=greater_than(0.0), metadata=doc("first attempted step in lam = logSNR / 2"))
    accept_safety: float = attrs.field(default=0.9, validator=in_range(0.0, 1.0, low_open=True), metadata=doc("safety factor theta of the next step size"))
    max_steps: int = attrs.field(default=1000, validator=at_least(1), metadata=doc("cap on attempted steps (accepted + rejected)"))

    @staticmethod
    def _vp_scale(level) -> float:
        """alpha_vp / alpha at this logSNR: 1 on a VP chain, 1 / sqrt(1 + sigma^2) on VE."""
        return noiselevel.vp_alpha_sigma(level.logsnr)[0] / level.alpha

    def sample(self, denoise, x, levels, noise=None, callback=None):
        x, levels, offset = zero_snr_start(denoise, x, levels, callback)
        final = levels[-1] if levels[-1].is_clean else None
        end = levels[-2] if final is not None else levels[-1]
        t, h = levels[0], self.h_init
        # Tolerances apply to the state in variance-preserving scale, x * alpha_vp / alpha:
        # on a VE chain |x| ~ sigma >> data, and rtol on raw x would accept errors of the
        # data's own size (the tolerance would then depend on the chain, not the data).
        x_prev = x * self._vp_scale(t)
        lam_end = lam(end)
        attempts, accepted = 0, offset
        while t is not end:
            if attempts == self.max_steps:
                raise RuntimeError(
                    f"dpm-solver-adaptive: {self.max_steps} attempted steps without reaching logSNR {end.logsnr:.4g} "
                    f"(at {t.logsnr:.4g}); loosen rtol={self.rtol} / atol={self.atol} or raise max_steps"
                )
            attempts += 1
            h = min(h, lam_end - lam(t))
            s = end if h >= lam_end - lam(t) else level_between(t, end, 2.0 * (lam(t) + h))
            u1 = level_between(t, s, t.logsnr + (s.logsnr - t.logsnr) / 3.0)
            u2 = level_between(t, s, t.logsnr + 2.0 * (s.logsnr - t.logsnr) / 3.0)
            x0 = denoise(x, t)
            evals = {}

            def cached(y, level):  # the two solvers share the evaluation at u1
                key = level.logsnr
                if key not in evals:
                    evals[key] = denoise(y, level)
                return evals[key]

            x_low = singlestep(cached, x, x0, t, s, [u1])
            x_high = singlestep(cached, x, x0, t, s, [u1, u2])
            scale = self._vp_scale(s)
            delta = torch.clamp(self.rtol * torch.maximum((x_low * scale).abs(), x_prev.abs()), min=self.atol)
            error = float((((x_low - x_high) * scale) / delta).square().flatten(1).mean(1).sqrt().max())  # one sync per step
            if error <= 1.0:
                x_prev, x, t = x_low * scale, x_high, s
                if callback is not None:
                    callback(accepted, x, x0)
                accepted += 1
            h = self.accept_safety * h * (error ** (-1.0 / 3.0) if error > 0 else math.inf)
            if not math.isfinite(h):
                h = lam_end - lam(t)
        if final is not None:
            x0 = denoise(x, end)
            x = final.alpha * x0
            if callback is not None:
                callback(accepted, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("dpm-solver-adaptive", DPMSolverAdaptive)
