"""Roberts' stochastic improved Euler scheme (A. J. Roberts 2012, "Modify the improved Euler
scheme to integrate stochastic differential equations", arXiv:1210.0933) on the reverse-time
SDE (Song et al. 2021, eq. 6) of any Gaussian chain.

The chain gives the forward SDE dx = f x dtau + g dW in the time tau = -lambda and its reverse,
``level.chain.reverse_sde(x, D, level) = (drift, g)`` with drift = f x - g^2 score and
score = (alpha D - x) / sigma^2 (D the x0 estimate). Run backwards, i.e. forwards in the
reverse time r = lambda, the reverse SDE reads

    dx = a(r, x) dr + b(r) dW_r,      a = -drift,   b = g = sigma,

and a step from level t to the less noisy level s has length h = lambda_s - lambda_t > 0.
Roberts' scheme for dx = a dr + b dW, per sample and per step:

    K1 = h a(t, x)       + (dW - S sqrt(h)) b(t),
    K2 = h a(s, x + K1)  + (dW + S sqrt(h)) b(s),
    x_s = x + (K1 + K2) / 2,

with dW = sqrt(h) z the Brownian increment over the step (z ~ N(0, 1): fresh draws of the
recipe's noise type, or normalised increments of a per-sample Brownian tree, ``noise``) and
S = +-1 with probability 1/2 each, drawn per sample and step (its own uniforms, draw index
``steps + i`` of the noise source, so independent of the step's z). S is what makes the
scheme consistent with the Ito interpretation (Roberts); for this SDE the noise is
additive (b does not depend on x), so Ito and Stratonovich agree and S is not needed for
consistency (see ``signs`` below). Roberts proves strong order 1 (global error O(h)) for Ito and Stratonovich SDEs;
with zero noise it is Heun's method, second order. On this SDE Euler-Maruyama is strong order
1 too (additive noise); tests/test_samplers_srk.py measures both on one Brownian path.

``signs = "zero"`` sets S = 0, Roberts' Stratonovich form, which solves the same SDE here
(additive noise) with a smaller strong error. With S = 0 the step's noise comes from the
path's own increment dW only; S adds S sqrt(h) ((b(s) - b(t)) - h (da/dx) b(t)) / 2 per step
(the second part through the drift at x + K1), an O(h^(3/2)) local error independent of the
path, of the same order as the scheme's other local errors. Measured on the 8-mode ring from
logSNR -4 to 2 (median per-sample distance to a 512-step solution on the same Brownian path,
tests/test_samplers_srk.py): 8 / 16 / 32 / 64 steps give 0.28 / 0.13 / 0.055 / 0.026 with
random signs (``signs = "random"``, Roberts' Ito form as published), 0.098 / 0.047 / 0.019 /
0.011 with zero signs (``signs = "zero"``, the default for that reason), and 0.21 / 0.10 / 0.050 / 0.025 for euler-maruyama at
equal steps (at equal evaluations, n steps here against its 2n: 0.10 / 0.050 / 0.025).

With ``s_noise = 0`` no noise is drawn and the scheme is Heun's method (the explicit
trapezoidal rule) on the ODE dx/dr = a(r, x), second order; that ODE is the reverse SDE's
drift alone, not the probability-flow ODE, so its samples are not the data distribution
(use it to check the drift; ``s_noise`` = 1 solves the reverse SDE).

Each step evaluates the denoiser at t and at s (``evaluations_per_step`` = 2). The last
step, onto the clean level (lambda = +inf, an infinite step in r), returns alpha D there
instead, as euler-maruyama does (Song et al.'s noise-free final denoising step), so a grid
of ``steps`` steps costs 2 steps - 1 evaluations. The step is explicit in lambda: the drift
contracts x - alpha D at rate (1 + f) (1/2 to 1 on VP, 1 on VE), and Heun's method is stable
on that for (1 + f) h < 2. The linear schedule's grids keep h below 2 from 10 steps on; the
cosine schedule's first step is h ~ 13-16 at any step count, where the step amplifies
x - alpha D ~18-fold, but at that noise level x is almost pure noise and the reverse SDE's
contraction over the rest of the grid (~e^-9 from logSNR -6 to 6) forgets it: measured on the
ring, sliced Wasserstein-2 to 2000 exact samples 0.14 at 20 cosine steps and 0.07 at 50,
against a floor (two exact draws) of 0.13; euler-maruyama has 2.7 at 20 steps and 0.16 at
100. The first level needs a finite logSNR (alpha > 0): recipes whose schedule reaches zero
terminal SNR are refused.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, hookimpl
from fundiff.brownian import StepNoise
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, one_of

from ._sde import brownian_needs_gaussian, noise_field, refuse_zero_terminal_snr

NAME = "stochastic-improved-euler"


def reverse_time_rates(denoise, x, level):
    """(a, b, D) at one level: the reverse SDE's drift in r = lambda (minus the chain's drift
    in tau = -lambda), its diffusion g, and the x0 estimate D it was computed from."""
    x0 = denoise(x, level)
    drift, g = level.chain.reverse_sde(x, x0, level)
    return -drift, g, x0


def random_signs(noise, draw: int, like):
    """S = +-1 with probability 1/2 per sample (Roberts' S_k), from the sample's own uniform
    stream, shaped to broadcast over one sample's elements."""
    u = noise.uniform(draw).reshape(like.shape[0], -1)[:, :1]
    signs = (u < 0.5).to(like.dtype) * 2.0 - 1.0
    return signs.reshape((like.shape[0],) + (1,) * (like.dim() - 1))


@attrs.frozen(kw_only=True)
class StochasticImprovedEuler(Sampler):
    """Roberts' stochastic improved Euler (a stochastic Runge-Kutta scheme) on the reverse SDE in lambda; two evaluations per step."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    evaluations_per_step = 2

    noise: str = noise_field()
    signs: str = attrs.field(
        default="zero",
        validator=one_of("random", "zero"),
        metadata=doc(
            "Roberts' S: zero (his Stratonovich form; the same SDE here, additive noise, and a smaller strong error) or random (+-1 per sample and step, his Ito form as published)"
        ),
    )
    s_noise: float = attrs.field(
        default=1.0,
        validator=at_least(0.0),
        metadata=doc(
            "scale of the diffusion b = s_noise g (1: the reverse SDE; 0: Heun's method on its drift alone, deterministic)"
        ),
    )

    def check_recipe(self, components):
        return brownian_needs_gaussian(self, components) + refuse_zero_terminal_snr(
            NAME, components, "its first step in lambda is infinitely long where alpha = 0"
        )

    def sample(self, denoise, x, levels, noise=None, callback=None):
        n = len(levels) - 1
        for level in levels[:-1]:
            if level.chain is None:
                raise ValueError(
                    f"{NAME} reads the reverse SDE from level.chain; make the levels with Chain.level (fundiff.noise_levels does)"
                )
            if not math.isfinite(level.logsnr):
                raise ValueError(f"{NAME} needs a finite logSNR on every level but the last (alpha > 0), got {level.logsnr}")
        stochastic = self.s_noise > 0.0 and any(not s.is_clean for s in levels[1:])
        draws = StepNoise(noise, self.noise, levels, sampler=NAME) if stochastic else None
        random_sign = stochastic and self.signs == "random"
        if random_sign and not callable(getattr(noise, "uniform", None)):
            raise ValueError(f"{NAME} draws its random signs S from uniforms: it needs a noise source with uniform(draw)")
        for i in range(n):
            t, s = levels[i], levels[i + 1]
            if s.is_clean:
                x0 = denoise(x, t)
                x = s.alpha * x0  # the noise-free final step: alpha D on the clean level
            else:
                h = s.logsnr - t.logsnr  # the step in the reverse time r = lambda
                root_h = math.sqrt(h)
                a_t, g_t, x0 = reverse_time_rates(denoise, x, t)
                k1 = h * a_t
                if draws is not None:
                    dw = root_h * draws(i, t, s)
                    s_root_h = root_h * random_signs(noise, n + i, x) if random_sign else 0.0
                    k1 = k1 + (self.s_noise * g_t) * (dw - s_root_h)
                a_s, g_s, _ = reverse_time_rates(denoise, x + k1, s)
                k2 = h * a_s
                if draws is not None:
                    k2 = k2 + (self.s_noise * g_s) * (dw + s_root_h)
                x = x + 0.5 * (k1 + k2)  # Roberts' improved Euler: the average of the two stages
            if callback is not None:
                callback(i, x, x0)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register(NAME, StochasticImprovedEuler)
