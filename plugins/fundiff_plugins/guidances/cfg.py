"""Classifier-free guidance (Ho & Salimans 2022), with rescaling and a guidance interval.

Training drops the class label with probability ``drop_prob`` (Algorithm 1: the label
becomes the null token -1), so one network learns both p(x | y) and p(x). Sampling
extrapolates from the unconditional towards the conditional prediction (eq. 6, written in
x0 space):

    x0_cfg = x0_u + w (x0_c - x0_u)

w = 1 is the conditional model, w = 0 the unconditional one. Since eps = (x - alpha x0) /
sigma is affine in x0 with the same x on both branches, the same w gives the same update
in eps, x0, v or score space. Both branches come from one forward pass on the doubled batch.

Options:

* ``rescale`` phi (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
  flawed", sec. 3.4, eqs. 15-17): x_r = x_cfg * std(x_c) / std(x_cfg) per sample, then
  x = phi x_r + (1 - phi) x_cfg. The paper rescales the network output (v-prediction);
  ``rescale_space`` picks x0 (the default: the std of the clean estimate is what
  over-exposes) or eps (diffusers' ``rescale_noise_cfg`` on an eps model). The two differ
  because a per-sample scaling does not commute with the affine eps <-> x0 map.
* ``interval`` [lambda_low, lambda_high] (Kynkaanniemi et al. 2024, "Applying guidance in a
  limited interval improves sample and distribution quality", sec. 3): guidance applies
  only at levels with lambda_low <= logSNR <= lambda_high; elsewhere the conditional
  prediction is used (one forward pass, the conditional branch only).
* ``dynamic_threshold`` p (Saharia et al. 2022, "Photorealistic text-to-image diffusion
  models with deep language understanding", sec. 2.3): after the combine (and rescale), per
  sample s = max(p-quantile of |x0|, 1) and x0 <- clamp(x0, -s, s) / s, which keeps x0 in
  [-1, 1] at large w without saturating it; for data scaled to [-1, 1].

Fused sampling steps (``fundiff.fused``) get the two branches and the weights (w, 1 - w) from
``denoise_deferred`` and combine them (rescale and threshold included) in the step's kernel.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import attrs
import torch

from fundiff import Guidance, fused, hookimpl
from fundiff.config import doc, in_range

from ._common import conditional_and_unconditional, conditional_denoiser_problems, drop_conditions, per_sample_dims


def _interval(instance, attribute, value) -> None:
    if value is None:
        return
    if len(value) != 2 or not value[0] <= value[1] or any(math.isnan(v) for v in value):
        raise ValueError(f"must be [logsnr_low, logsnr_high] with low <= high, got {list(value)}")


def rescale_guided(x0_guided, x0_cond, phi: float, x, level, space: str):
    """Lin et al. 2024, sec. 3.4: match the guided prediction's per-sample std to the
    conditional one's and mix by phi, in x0 or eps space (see the module docstring)."""
    if phi == 0.0:
        return x0_guided
    if space == "eps":
        if not (level.alpha > 0.0 and level.sigma > 0.0):
            return x0_guided  # eps and x0 are not interchangeable at the ends of the chain
        guided = (x - level.alpha * x0_guided) / level.sigma
        reference = (x - level.alpha * x0_cond) / level.sigma
    else:
        guided, reference = x0_guided, x0_cond
    dims = per_sample_dims(guided)
    std_guided = guided.std(dim=dims, keepdim=True, correction=0)
    std_ref = reference.std(dim=dims, keepdim=True, correction=0)
    # a constant guided prediction (one-element data) has nothing to rescale: factor 1
    factor = torch.where(std_guided > 0, std_ref / torch.where(std_guided > 0, std_guided, 1.0), 1.0)
    mixed = guided * (phi * factor + (1.0 - phi))
    if space == "eps":
        return (x - level.sigma * mixed) / level.alpha
    return mixed


@attrs.frozen(kw_only=True)
class CFG(Guidance):
    """Classifier-free guidance: x0_u + w (x0_c - x0_u), one batched forward per step."""

    scale: float = attrs.field(default=2.0, metadata=doc("guidance scale w: 1 = conditional model, 0 = unconditional"))
    drop_prob: float = attrs.field(
        default=0.1, validator=in_range(0.0, 1.0), metadata=doc("training: probability of replacing the label by the null token -1")
    )
    rescale: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0), metadata=doc("phi of Lin et al. 2024: 0 = plain CFG, 1 = fully rescaled"))
    rescale_space: Literal["x0", "eps"] = attrs.field(default="x0", metadata=doc("where the per-sample std is matched"))
    interval: Optional[tuple[float, float]] = attrs.field(
        default=None, validator=_interval, metadata=doc("[logsnr_low, logsnr_high] where guidance applies (default: everywhere)")
    )
    dynamic_threshold: Optional[float] = attrs.field(
        default=None,
        validator=in_range(0.0, 1.0, low_open=True),
        metadata=doc("quantile p of Imagen's dynamic thresholding (e.g. 0.995; default off): x0 clamped to [-s, s] and divided by s"),
    )

    def check_recipe(self, components):
        return conditional_denoiser_problems("cfg", components)

    def training_condition(self, cond, u):
        return drop_conditions(cond, u, self.drop_prob)

    def applies(self, level) -> bool:
        return self.interval is None or self.interval[0] <= level.logsnr <= self.interval[1]

    def denoise(self, predict, x, level, cond):
        if not self.applies(level):
            return predict(x, level, cond)
        x0_c, x0_u = conditional_and_unconditional(predict, x, level, cond)
        # lerp: x0_u + w (x0_c - x0_u), exactly x0_u at w = 0 and exactly x0_c at w = 1
        guided = torch.lerp(x0_u, x0_c, self.scale)
        guided = rescale_guided(guided, x0_c, self.rescale, x, level, self.rescale_space)
        if self.dynamic_threshold is not None:
            s = fused.threshold_scale(guided, self.dynamic_threshold).to(guided.dtype).reshape(-1, *([1] * (guided.ndim - 1)))
            guided = torch.maximum(torch.minimum(guided, s), -s) / s
        return guided

    def denoise_deferred(self, predict, x, level, cond):
        """The two branches and the weights (w, 1 - w), with the rescale's space as a linear map
        (x0: v = x0; eps: v = x / sigma - (alpha / sigma) x0) and the threshold, for a fused step."""
        if not self.applies(level):
            return None  # outside the interval: the conditional branch alone, as ``denoise``
        x0_c, x0_u = conditional_and_unconditional(predict, x, level, cond)
        rescale = None
        if self.rescale > 0.0:
            if self.rescale_space == "x0":
                rescale = fused.Rescale(phi=self.rescale)
            elif level.alpha > 0.0 and level.sigma > 0.0:  # as rescale_guided: none at the chain's ends
                rescale = fused.Rescale(phi=self.rescale, to_x=1.0 / level.sigma, to_pred=-level.alpha / level.sigma)
        return fused.Prediction(
            branches=(x0_c, x0_u), weights=(self.scale, 1.0 - self.scale), x=x, rescale=rescale, threshold=self.dynamic_threshold
        )


@hookimpl
def fundiff_register_guidances(register):
    register("cfg", CFG)
