"""UniPC: unified predictor-corrector (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models", Algorithms 1-3), data-prediction form.

In lam = log(alpha / sigma), h = lam_s - lam_t and with x0 estimates m_0 = D(x_t) and the
history m_k at lam_k (r_k = (lam_k - lam_t) / h < 0, differences D1_k = (m_k - m_0) / r_k):

UniP-p (predictor, eq. 8 with B(h)):
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) m_0 - alpha_s B(h) sum_{k<p} a_k D1_k
UniC-p (corrector, eq. 10), after evaluating m_s = D(x_s) at the predicted x_s:
    x_s^c = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) m_0
            - alpha_s B(h) (sum_{k<p} a_k^c D1_k + a_p^c (m_s - m_0))

with the weights solving R a = g (Theorem 3.1): R_{ik} = r_k^{i-1} (r_p = 1 for the
corrector) and, with hh = -h, g_i = hh phi_{i+1}(hh) i! / B(hh), B(hh) = hh ("bh1") or
e^{hh} - 1 ("bh2"), phi_k the exponential-integrator weights. As in the
authors' code (and diffusers), the second-order predictor uses a_1 = 1/2 and the first-order
corrector a_1^c = 1/2, the leading terms of those solutions.

The corrector reuses m_s, which is also the next predictor's m_0, so UniPC costs one
evaluation per step and raises the order by one: UniPC-p converges at order p + 1 with the
corrector, p without. The next predictor starts from the corrected x_s^c. The final step has
no corrector (it would need one more evaluation). Warm-up: step i uses order min(p, i + 1);
``lower_order_final`` lowers the order near the end as the authors' code does, min(p, steps
left), for stability at few steps. The step onto a clean level is first order (x = alpha_0 m_0).
A first level with alpha = 0 (zero terminal SNR, lam = -inf) is left by a DDIM step, the
exact limit there, and the multistep history starts at the next level.

Steps are fused steps (:mod:`fundiff.fused`). On a single-pass backend (Triton) the corrector
and the next predictor are one kernel: x^c, the predictor applied to x^c (its coefficients
folded through x^c's) and m from one pass; on the torch backend the predictor reuses x^c.
"""

from __future__ import annotations

import math

import attrs

from fundiff import Sampler, fused, hookimpl
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import doc, in_range, one_of

from ._exponential import lam, phi, solve, zero_snr_start


def _weights(hh: float, rks: list[float], variant: str, corrector: bool) -> tuple[float, float, list[float]]:
    """(h_phi_1, B(hh), a): the UniP (or UniC) weights for one step; len(a) = len(rks)."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    p = len(rks)
    g = [hh * phi(i + 1, hh) * math.factorial(i) / b_h for i in range(1, p + 1)]
    if corrector:
        a = [0.5] if p == 1 else solve([[r ** (i - 1) for r in rks] for i in range(1, p + 1)], g)
    else:
        m = p - 1  # rks[-1] is a placeholder for the predictor: only the first p - 1 are used
        a = [] if m == 0 else [0.5] if m == 1 else solve([[r ** (i - 1) for r in rks[:m]] for i in range(1, m + 1)], g[:m])
    return math.expm1(hh), b_h, a


def _update(levels, lams, i: int, order: int, variant: str, corrector: bool) -> list[float]:
    """Coefficients of x, m_0 = D at levels[i] and m_k at levels[i - k] (k = 1..order-1) for the
    step from levels[i] to levels[i + 1], plus (corrector) the coefficient of m at levels[i + 1]."""
    t, s = levels[i], levels[i + 1]
    h = lams[i + 1] - lams[i]
    hh = -h
    rks = [(lams[i - k] - lams[i]) / h for k in range(1, order)] + [1.0]
    h_phi_1, b_h, a = _weights(hh, rks, variant, corrector)
    c_x = s.sigma / t.sigma
    c_0 = -s.alpha * h_phi_1
    hist = []
    for k in range(1, order):  # D1_k = (m_k - m_0) / r_k
        w = -s.alpha * b_h * a[k - 1] / rks[k - 1]
        hist.append(w)
        c_0 -= w
    out = [c_x, c_0] + hist
    if corrector:
        w = -s.alpha * b_h * a[-1]  # a_p^c (m_s - m_0)
        out[1] -= w
        out.append(w)
    return out


@attrs.frozen(kw_only=True)
class UniPC(Sampler):
    """UniPC-p: multistep UniP predictor with the UniC corrector, one evaluation per step."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    order: int = attrs.field(default=2, validator=in_range(1, 3), metadata=doc("predictor order p (UniPC-p); the corrector raises it to p + 1"))
    variant: str = attrs.field(default="bh2", validator=one_of("bh1", "bh2"), metadata=doc("B(h): bh1 = h, bh2 = e^h - 1 (Zhao et al. sec. 3.3)"))
    corrector: bool = attrs.field(default=True, metadata=doc("apply UniC after every step but the last"))
    lower_order_final: bool = attrs.field(default=True, metadata=doc("order min(p, steps left) near the end (authors' code); turn off to keep order p + 1 on a grid ending at a noisy level"))

    def plan(self, levels) -> list[tuple[int, list[float], list[float] | None]]:
        """Per step: (order, predictor coefficients, corrector coefficients applied at its start)."""
        n = len(levels) - 1
        lams = [lam(level) for level in levels]
        orders = []
        for i in range(n):
            p = min(self.order, i + 1)
            if self.lower_order_final:
                p = min(p, n - i)
            if levels[i + 1].is_clean:
                p = 1
            orders.append(p)
        plan = []
        for i in range(n):
            pred = [0.0, levels[i + 1].alpha] if levels[i + 1].is_clean else _update(levels, lams, i, orders[i], self.variant, False)
            corr = _update(levels, lams, i - 1, orders[i - 1], self.variant, True) if self.corrector and i > 0 else None
            plan.append((orders[i], pred, corr))
        return plan

    def sample(self, denoise, x, levels, noise=None, callback=None):
        ex = fused.executor(x)
        predict = ex.predictor(denoise)  # the x0 estimate, or its guided Prediction on the fused backend
        x, levels, offset = zero_snr_start(denoise, x, levels, callback, ex)
        history: list = []  # x0 estimates, newest first
        x_last = None
        for i, (p, pred, corr) in enumerate(self.plan(levels)):
            m = predict(x, levels[i])
            # the predictor's history terms m_k (k >= 1) are the estimates before this one
            older = [(c, history[k - 1]) for k, c in enumerate(pred[2:], start=1)]
            if corr is None:
                x_last = x
                x, m = ex.step([(pred[1], m), (pred[0], x)] + older, ((1.0, m),))
            else:  # UniC: correct x at levels[i] with m evaluated there, then predict from it
                corrected = [(corr[0], x_last), (corr[1], history[0])] + [(c, history[k]) for k, c in enumerate(corr[2:-1], start=1)]
                corrected.append((corr[-1], m))
                if ex.single_pass:
                    folded = [(pred[0] * c, t) for c, t in corrected] + [(pred[1], m)] + older
                    x_last, x, m = ex.step(corrected, folded, ((1.0, m),))
                else:
                    x_last, m = ex.step(corrected, ((1.0, m),))
                    x = ex.combine([(pred[1], m), (pred[0], x_last)] + older)
            history = [m] + history[:2]
            if callback is not None:
                callback(i + offset, x, m)
        return x


@hookimpl
def fundiff_register_samplers(register):
    register("unipc", UniPC)
