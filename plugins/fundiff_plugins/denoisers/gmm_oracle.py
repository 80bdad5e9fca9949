"""The exact denoiser for Gaussian-mixture data under any Gaussian chain.

If x0 ~ sum_k pi_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, then
x_t ~ sum_k pi_k N(alpha mu_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, and

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + (alpha s_k^2 / v_k) (x_t - alpha mu_k)),
    r_k(x_t)   proportional to pi_k N(x_t; alpha mu_k, v_k I)

(the posterior of a Gaussian prior under a Gaussian likelihood, mixed by responsibilities).
This is the minimiser of every denoising loss, so samplers can be measured against it with
no training, and it answers in whatever space the recipe's parameterization predicts.
Computed in float64; conditioned on a class label it uses that mode alone.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from fundiff import BuildContext, Denoiser, hookimpl
from fundiff.components import GAUSSIAN_MARGINALS

GAUSSIAN_MIXTURE_DATA = "gaussian-mixture-data"


class MixtureDenoiser(nn.Module):
    def __init__(self, weights, means, stds, chain, parameterization, conditional: bool = True):
        super().__init__()
        self.conditional = conditional
        self.register_buffer("log_weights", weights.log(), persistent=False)
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("variances", stds**2, persistent=False)
        self.chain = chain
        self.parameterization = parameterization

    def posterior_mean(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """E[x0 | x_t] in float64; x_t (B, D), alpha and sigma (B, 1)."""
        dim = x_t.shape[1]
        v = alpha**2 * self.variances[None, :] + sigma**2  # (B, K)
        diff = x_t[:, None, :] - alpha[:, :, None] * self.means[None, :, :]  # (B, K, D)
        sq = (diff**2).sum(-1)
        log_r = self.log_weights[None, :] - 0.5 * dim * torch.log(v) - 0.5 * sq / v
        if cond is not None:
            labels = cond.long()
            keep = labels >= 0
            mask = torch.zeros_like(log_r, dtype=torch.bool)
            mask[keep] = nn.functional.one_hot(labels[keep], log_r.shape[1]).bool()
            mask[~keep] = True
            log_r = log_r.masked_fill(~mask, float("-inf"))
        r = torch.softmax(log_r, dim=1)
        gain = alpha * self.variances[None, :] / v  # (B, K)
        per_mode = self.means[None] + gain[:, :, None] * diff
        return (r[:, :, None] * per_mode).sum(1)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        logsnr64 = logsnr.to(torch.float64)
        alpha, sigma = self.chain.alpha_sigma(logsnr64)
        alpha, sigma = alpha[:, None], sigma[:, None]
        x_in = x.reshape(shape[0], -1).to(torch.float64)
        x_t = x_in / self.parameterization.input_scale(alpha, sigma)
        x0 = self.posterior_mean(x_t, alpha, sigma, cond if self.conditional else None)
        out = self.parameterization.from_x0(x0, x_t, alpha, sigma)
        return out.to(dtype).reshape(shape)


@attrs.frozen(kw_only=True)
class GMMOracle(Denoiser):
    """Closed-form E[x0 | x_t] for Gaussian-mixture data; needs no training."""

    requires = frozenset({GAUSSIAN_MIXTURE_DATA, GAUSSIAN_MARGINALS})
    trainable = False

    conditional: bool = attrs.field(default=False, metadata={"doc": "condition on the mode label (class) when given"})

    def uses_labels(self, spec) -> bool:
        return self.conditional

    def build(self, context: BuildContext) -> nn.Module:
        weights, means, stds = context.components["data"].mixture()
        return MixtureDenoiser(
            weights, means, stds, context.components["chain"], context.components["parameterization"], self.conditional
        )


@hookimpl
def fundiff_register_denoisers(register):
    register("gmm-oracle", GMMOracle)
