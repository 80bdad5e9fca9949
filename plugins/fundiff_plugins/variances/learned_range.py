"""Learned-range reverse variance (Nichol and Dhariwal 2021, improved DDPM, sec. 3.1, eq. 15).

The denoiser's variance head outputs v per element (``learned_variance: true``); with
u = (v + 1) / 2 the reverse variance interpolates the two fixed choices in log space:

    Sigma = exp(u log beta + (1 - u) log beta_tilde),

so v = +1 is ``fixed-large`` (beta) and v = -1 is ``fixed-small`` (beta tilde). As in the
paper's code, v is not constrained to [-1, 1].

Training uses the hybrid loss L_simple + lambda L_vlb (eq. 16, lambda = ``vlb_weight``).
L_vlb's term at t is KL(q(x_s | x_t, x0) || p(x_s | x_t)) (eq. 5) with s one step below t:
t - 1/T on a discrete T-step schedule, t - ``delta`` otherwise. The mean of p uses the
detached x0 estimate (the stop-gradient of sec. 3.1), so the term trains only the variance
head. With t drawn by the weighting, T * KL_t estimates L_vlb = sum_t KL_t (the paper's
sum; its code's num_timesteps / 1000 rescale with lambda = 0.001 is the same factor), so
the per-example term is ``vlb_weight`` * (1 / step) * mean over elements of the KL, in nats.
Where s is the clean level the KL is undefined (DDPM's L_0 is a decoder term) and the term
is 0.
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import DiscreteSchedule, LevelTensors, ReverseVariance, hookimpl, noiselevel
from fundiff.components import ADDITIVE_NOISE, GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, in_range


def gaussian_kl(mean_q, log_var_q, mean_p, log_var_p):
    """Per-element KL(N(mean_q, exp(log_var_q)) || N(mean_p, exp(log_var_p))) in nats."""
    return 0.5 * (log_var_p - log_var_q + torch.exp(log_var_q - log_var_p) + (mean_q - mean_p) ** 2 * torch.exp(-log_var_p) - 1.0)


@attrs.frozen(kw_only=True)
class LearnedRange(ReverseVariance):
    """exp(u log beta + (1 - u) log beta_tilde) with u = (v + 1) / 2 from the network; hybrid loss."""

    requires = frozenset({GAUSSIAN_MARGINALS, ADDITIVE_NOISE})
    needs_network = True

    vlb_weight: float = attrs.field(default=0.001, validator=at_least(0.0), metadata=doc("lambda of L_simple + lambda L_vlb"))
    delta: float = attrs.field(
        default=0.001,
        validator=in_range(0.0, 1.0, low_open=True, high_open=True),
        metadata=doc("step in t from t down to s for L_vlb on continuous schedules (discrete ones use 1/T)"),
    )

    def check_recipe(self, components):
        if not getattr(components.get("denoiser"), "learned_variance", False):
            return [
                "'learned-range' needs the denoiser's variance head: set 'learned_variance: true' in the "
                "denoiser section (mlp, unet, dit and uvit offer it)"
            ]
        return []

    def variance(self, s, t, v):
        if s.is_clean:
            return 0.0
        beta = noiselevel.transition(s, t)[1]
        beta_tilde = noiselevel.posterior(s, t)[2]
        u = (v + 1.0) / 2.0
        return torch.exp(u * math.log(beta) + (1.0 - u) * math.log(beta_tilde))

    def step(self, schedule) -> float:
        return 1.0 / schedule.num_steps if isinstance(schedule, DiscreteSchedule) else self.delta

    def training_levels(self, t, schedule, chain):
        with torch.no_grad():
            time = schedule.t_from_logsnr(t.logsnr.detach().to(torch.float64))
            logsnr = schedule.logsnr((time - self.step(schedule)).clamp(min=0.0)).to(torch.float64)
            # s is never noisier than t (rounding in the round trip through t)
            logsnr = torch.maximum(logsnr, t.logsnr.detach().to(torch.float64))
            alpha, sigma = chain.alpha_sigma(logsnr)
        return LevelTensors(logsnr=logsnr, alpha=alpha, sigma=sigma)

    def training_loss(self, x0, x_t, x0_hat, v, t, s, schedule):
        if v is None:
            raise ValueError("variance 'learned-range': the denoiser returned no variance output (learned_variance: true?)")
        f64 = torch.float64
        lam_t, lam_s = t.logsnr.detach().to(f64), s.logsnr.detach().to(f64)
        valid = torch.isfinite(lam_s) & (s.sigma.detach().to(f64) > 0) & (lam_s > lam_t)
        lam_s = torch.where(valid, lam_s, lam_t + 1.0)  # placeholder where masked out
        alpha_s = torch.where(valid, s.alpha.detach().to(f64), torch.ones_like(lam_t))
        sigma_s = torch.where(valid, s.sigma.detach().to(f64), torch.ones_like(lam_t))
        sigma_t = t.sigma.detach().to(f64)
        alpha_t = t.alpha.detach().to(f64)
        # posterior q(x_s | x_t, x0) (VDM eq. 7) with r = SNR_t / SNR_s: log(1 - r) by expm1
        log_one_minus_r = torch.log(-torch.expm1(lam_t - lam_s))
        one_minus_r = torch.exp(log_one_minus_r)
        coef_x0 = alpha_s * one_minus_r
        coef_xt = (alpha_t / alpha_s) * sigma_s**2 / sigma_t**2
        log_beta_tilde = 2.0 * torch.log(sigma_s) + log_one_minus_r
        log_beta = 2.0 * torch.log(sigma_t) + log_one_minus_r
        dtype, ndim = x0.dtype, x0.ndim

        def per_sample(value):
            return noiselevel.append_dims(value.to(x0.device, dtype), ndim)

        mean_q = per_sample(coef_x0) * x0 + per_sample(coef_xt) * x_t
        mean_p = per_sample(coef_x0) * x0_hat.detach() + per_sample(coef_xt) * x_t  # stop-gradient on the mean
        u = (v + 1.0) / 2.0
        log_var_p = u * per_sample(log_beta) + (1.0 - u) * per_sample(log_beta_tilde)
        kl = gaussian_kl(mean_q, per_sample(log_beta_tilde).expand_as(x0), mean_p, log_var_p).flatten(1).mean(1)
        scale = self.vlb_weight / self.step(schedule)  # lambda * T: T * KL_t estimates the sum over t
        return torch.where(valid.to(kl.device), kl * scale, torch.zeros_like(kl))


@hookimpl
def fundiff_register_variances(register):
    register("learned-range", LearnedRange)
