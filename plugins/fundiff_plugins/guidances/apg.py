"""Adaptive projected guidance (Sadat, Hilliges and Weber 2024, "Eliminating oversaturation
and artifacts of high guidance scales in diffusion models", sec. 4, Algorithm 1).

APG works on the denoiser's clean estimates. With the CFG difference d = x0_c - x0_u:

1. momentum (sec. 4.3, "reverse momentum"): D_t = d_t + beta D_{t-1} (beta < 0 recommended);
2. rescaling (sec. 4.2): D <- D * min(1, r / ||D||), per sample;
3. projection (sec. 4.1): D = D_par + D_orth with D_par = (<D, x0_c> / ||x0_c||^2) x0_c,
   and the parallel part, which mostly raises saturation, is down-weighted:

       x0_apg = x0_c + (w - 1) (D_orth + eta D_par)

With eta = 1, r = inf and beta = 0 this is CFG, x0_u + w (x0_c - x0_u). Norms and inner
products are per sample over all data dimensions. The momentum is state across the steps of
one sampling run: it lives in the object ``start(levels)`` returns (a fresh one per run, so
batches never share it) and is updated at every model evaluation, in the order the sampler
makes them (as the paper's reference implementation does).
"""

from __future__ import annotations

import math

import attrs
import torch

from fundiff import Guidance, hookimpl
from fundiff.config import doc, greater_than, in_range

from ._common import conditional_and_unconditional, conditional_denoiser_problems, drop_conditions, per_sample_dims


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of ``v`` relative to ``onto``, per sample (float64 inside)."""
    dims = per_sample_dims(v)
    v64, u64 = v.double(), onto.double()
    norm2 = (u64 * u64).sum(dims, keepdim=True)
    coeff = (v64 * u64).sum(dims, keepdim=True) / torch.where(norm2 > 0, norm2, 1.0)
    parallel = (coeff * u64).to(v.dtype)
    return parallel, v - parallel


class _APGRun:
    def __init__(self, guidance: "APG"):
        self.guidance = guidance
        self.average = None  # the momentum buffer D_{t-1}

    def denoise(self, predict, x, level, cond):
        g = self.guidance
        x0_c, x0_u = conditional_and_unconditional(predict, x, level, cond)
        diff = x0_c - x0_u
        if g.momentum != 0.0:
            if self.average is not None and self.average.shape == diff.shape:
                diff = diff + g.momentum * self.average
            self.average = diff
        if math.isfinite(g.norm_threshold):
            norm = torch.linalg.vector_norm(diff, dim=per_sample_dims(diff), keepdim=True)
            diff = diff * torch.clamp(g.norm_threshold / norm, max=1.0)
        parallel, orthogonal = project(diff, x0_c)
        update = orthogonal + g.eta * parallel if g.eta != 1.0 else diff
        return x0_c + (g.scale - 1.0) * update


@attrs.frozen(kw_only=True)
class APG(Guidance):
    """Adaptive projected guidance: CFG with the parallel part down-weighted, a norm cap and
    reverse momentum (per sampling run)."""

    scale: float = attrs.field(default=4.0, metadata=doc("guidance scale w (as in cfg: 1 = conditional model)"))
    eta: float = attrs.field(default=0.0, metadata=doc("weight of the update's part parallel to x0_c (1 = cfg)"))
    norm_threshold: float = attrs.field(
        default=math.inf, validator=greater_than(0.0), metadata=doc("r: cap on the per-sample norm of the update, in data units (inf = off)")
    )
    momentum: float = attrs.field(default=-0.75, validator=in_range(-1.0, 1.0, low_open=True, high_open=True), metadata=doc("beta: D_t = d_t + beta D_(t-1) (0 = off)"))
    drop_prob: float = attrs.field(
        default=0.1, validator=in_range(0.0, 1.0), metadata=doc("training: probability of replacing the label by the null token -1")
    )

    def check_recipe(self, components):
        return conditional_denoiser_problems("apg", components)

    def training_condition(self, cond, u):
        return drop_conditions(cond, u, self.drop_prob)

    def start(self, levels):
        return _APGRun(self)

    def denoise(self, predict, x, level, cond):
        return _APGRun(self).denoise(predict, x, level, cond)


@hookimpl
def fundiff_register_guidances(register):
    register("apg", APG)
