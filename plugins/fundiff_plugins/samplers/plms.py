"""PNDM's pseudo linear multistep method (Liu, Ren, Lin and Zhao 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds", eqs. 9-13).

PNDM splits a step into a *transfer* part, the DDIM step for a given noise estimate e,

    phi(x_t, e, t, s) = alpha_s (x_t - sigma_t e) / alpha_t + sigma_s e
                      = (alpha_s / alpha_t) x_t + alpha_s (s~_s - s~_t) e     (s~ = sigma / alpha),

and a *gradient* part that chooses e like a classical method would. The pseudo linear
multistep step (eq. 12) uses the fourth-order Adams-Bashforth weights,

    e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24,

e_j the noise estimates at the last four grid points (e_0 the newest), and
x_s = phi(x_t, e', t, s).

Warm start (``warm_start``), needed until four estimates exist:

- ``prk`` (the paper's, eq. 13): the first three steps are pseudo Runge-Kutta steps, the
  classical RK4 slopes e1..e4 at t, the midpoint (twice) and s, combined as
  (e1 + 2 e2 + 2 e3 + e4) / 6 and applied with phi. The paper's midpoint is half a discrete
  time step; here it is the midpoint in s~, which makes the pseudo RK step exactly RK4 on
  dx~/ds~ = eps_hat. 4 evaluations per warm-up step: NFE = steps + 9 for steps >= 3.
- ``heun``: diffusers' PNDMScheduler with ``skip_prk_steps``: the first step is redone
  with the mean of its two slopes (a Heun step, 2 evaluations), then Adams-Bashforth of
  orders 2 and 3 before the fourth-order weights. NFE = steps + 1.

The fixed weights assume equal steps in the ODE's variable s~: on a grid uniform in s~ the
method has order 4; on other grids (uniform in t, Karras) the unequal steps reduce it to
order 2 (the weights' error is the covariance of e and of the step-size variation over a
step). ``lms`` is the variable-step Adams-Bashforth method. A warm-up step onto the clean
level (only when steps <= 3) cannot evaluate there (sigma = 0) and uses the midpoint slope e2.
"""

from __future__ import annotations

import attrs
import torch

from fundiff import Sampler, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import doc, one_of

from ._exponential import zero_snr_start
from ._pfode import eps_hat, level_maker, rk4_slope, sigma_tilde, transfer

#: Adams-Bashforth weights of orders 1-4 for equal steps, newest slope first
_AB = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@attrs.frozen(kw_only=True)
class PLMS(Sampler):
    """PNDM's pseudo linear multistep sampler (fourth-order Adams-Bashforth on DDIM transfers)."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    warm_start: str = attrs.field(
        default="prk", validator=one_of("prk", "heun"), metadata=doc("first steps: prk (paper, 3 RK4 steps) or heun (diffusers)")
    )

    def sample(self, denoise, x, levels, noise=None, callback=None):
        # from a zero-terminal-SNR level (alpha = 0, x / alpha infinite) take the exact first
        # step, x_s = alpha_s D + (sigma_s / sigma_t) x, then continue on the rest of the grid
        x, levels, _ = zero_snr_start(denoise, x, levels, callback)
        if len(levels) < 2:
            return x
        make = level_maker(levels)
        history = []  # noise estimates at grid points, newest first
        for i in range(len(levels) - 1):
            t, s = levels[i], levels[i + 1]
            e_t, x0 = eps_hat(denoise, x, t)
            history.insert(0, e_t)
            del history[4:]
            if self.warm_start == "prk" and i < 3:
                e_step = rk4_slope(denoise, x, t, s, e_t, make)
            elif self.warm_start == "heun" and i == 0:
                e_step = e_t if s.sigma == 0.0 else 0.5 * (e_t + eps_hat(denoise, transfer(x, e_t, t, s), s)[0])
            else:
                # x_s = (alpha_s / alpha_t) x + alpha_s (s~_s - s~_t) sum_j w_j e_j, one fused op per term
                h = s.alpha * (sigma_tilde(s) - sigma_tilde(t))
                x = (s.alpha / t.alpha) * x
                for w, e in zip(_AB[len(history) - 1], history):
                    x = torch.add(x, e, alpha=h * w)
                if callback is not None:
                    callback(i, x, x0)
                continue
            x = transfer(x, e_step, t, s)
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("plms", PLMS)
