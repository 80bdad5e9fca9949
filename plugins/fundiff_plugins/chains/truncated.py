"""The truncated chain: an inner Gaussian chain cut at an intermediate noise level, with a
generator for the marginal there (survey sec. 3.2.1; truncated diffusion, Zheng et al.
2023, "Truncated Diffusion Probabilistic Models"; early-stopped DDPM, Lyu et al. 2022).

The forward process is the inner chain's (VP by default) up to logSNR ``truncate_logsnr``
and stops there. The terminal distribution is no longer pure noise but the data perturbed
to that level, q(x_T) = integral q(x_T | x0) p(x0) dx0, which keeps much of the data's
structure; a small extra model (a Gaussian mixture fitted by EM, or a VAE) learns it before
the denoiser trains. Sampling draws x_T from that generator and runs the denoiser only on
the levels below the cut, so every grid step noisier than the cut is saved.

The chain is a module (``build_module``): the generator's parameters are fitted by ``fit``
(called by ``fundiff train`` before the denoiser's loop, skipped once fitted, e.g. on
resume) and stored in checkpoints under ``chain.``.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
from torch import nn

from fundiff import Chain, DataSpec, Level, hookimpl, rng
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc, greater_than, in_range
from fundiff.errors import FundiffError
from fundiff_plugins.chains._generators import MixtureGenerator, VAEGenerator, probit
from fundiff_plugins.chains._wrapping import InnerChainMath, WrappingChainModule
from fundiff_plugins.chains.vp import VariancePreserving

#: Philox stream ids of the generator's fit (third-party range, see fundiff.rng):
#: the perturbed fitting set, k-means++ seeding, and VAE batches / reparameterisation noise
STREAM_FIT_DATA, STREAM_FIT_INIT, STREAM_FIT_VAE = 1410, 1411, 1412  # 1413 is the VAE's second stream

#: covariance "auto" is full up to this dimension
_AUTO_FULL_MAX_DIM = 16
#: full covariances above this dimension cost (K, D, D) memory and O(N K D^2) per EM step
_FULL_COVARIANCE_MAX_DIM = 1024

#: draw indices of ``source.uniform`` in ``initial_state``: the component choice, then normals
_DRAW_CHOICE, _DRAW_NORMALS = 1, 2


def _normals_from(source, first_draw: int):
    """``normals(count)``: (B, count) float64 standard normals, the probit of the source's
    uniforms of draws ``first_draw``, ``first_draw + 1``, ... flattened and concatenated (each
    draw gives numel(state) per sample), so sample i's numbers depend only on i."""

    def normals(count: int) -> torch.Tensor:
        columns, draw, total = [], first_draw, 0
        while total < count:
            u = source.uniform(draw).flatten(1)
            columns.append(probit(u))
            total += u.shape[1]
            draw += 1
        return torch.cat(columns, dim=1)[:, :count]

    return normals


@attrs.frozen(kw_only=True)
class Truncated(InnerChainMath):
    """An inner Gaussian chain cut at logSNR ``truncate_logsnr``; a fitted generator (EM
    Gaussian mixture or VAE) models the marginal there and starts every sampling run."""

    provides = frozenset({GAUSSIAN_MARGINALS})

    inner: Chain = attrs.field(
        factory=VariancePreserving, metadata=doc("the Gaussian chain that is cut (a nested chain section)")
    )
    truncate_logsnr: float = attrs.field(
        default=-2.0,
        metadata=doc(
            "logSNR where the chain stops (the generator's level); it must lie inside the schedule's range. A logSNR, "
            "not a t, so the cut does not move with the schedule (cosine: t = 0.6 is -1.0, t = 0.8 is -2.25)"
        ),
    )
    generator: Literal["gmm", "vae"] = attrs.field(
        default="gmm", metadata=doc("model of the marginal at the cut: a Gaussian mixture fitted by EM, or an MLP VAE")
    )
    components: int = attrs.field(default=16, validator=at_least(1), metadata=doc("gmm: number of mixture components K"))
    covariance: Literal["auto", "full", "diagonal"] = attrs.field(
        default="auto",
        metadata=doc(
            "gmm: covariance of each component; auto is full up to 16 dimensions (points) and diagonal above (images), "
            "where a full one costs O(K N D^2) per EM step"
        ),
    )
    em_iterations: int = attrs.field(default=100, validator=at_least(1), metadata=doc("gmm: most EM iterations"))
    em_tolerance: float = attrs.field(
        default=1e-9, validator=at_least(0.0), metadata=doc("gmm: stop when the mean log-likelihood rises by less than this")
    )
    covariance_floor: float = attrs.field(
        default=1e-6, validator=at_least(0.0), metadata=doc("gmm: added to every covariance, relative to the mean data variance")
    )
    vae_latent_dim: int = attrs.field(default=4, validator=at_least(1), metadata=doc("vae: dimension of the latent"))
    vae_width: int = attrs.field(default=128, validator=at_least(1), metadata=doc("vae: width of the encoder and decoder MLPs"))
    vae_steps: int = attrs.field(default=2000, validator=at_least(1), metadata=doc("vae: Adam steps"))
    vae_batch_size: int = attrs.field(default=256, validator=at_least(1), metadata=doc("vae: batch size"))
    vae_lr: float = attrs.field(default=2e-3, validator=greater_than(0.0), metadata=doc("vae: Adam learning rate"))
    fit_samples: int = attrs.field(
        default=20000, validator=at_least(1), metadata=doc("points of data perturbed to the cut that the generator is fitted on")
    )
    seed: int = attrs.field(
        default=0, validator=in_range(0, 2**63), metadata=doc("seed of the fitting set, EM seeding and the VAE")
    )

    # ---------------------------------------------------------------- recipe checks

    def check_recipe(self, components) -> list[str]:
        problems = []
        inner = type(self.inner)
        if GAUSSIAN_MARGINALS not in inner.provides:
            return [
                (
                    f"chain 'truncated' cuts a Gaussian chain (it requires 'gaussian-marginals'), but its inner chain "
                    f"{inner.__name__} does not provide it; use inner: vp or inner: ve"
                )
            ]
        spec = components["data"].spec() if "data" in components else None
        if spec is not None and self.inner.build_module(spec) is not None:
            problems.append(
                f"chain 'truncated' wraps a chain without fitted state, but its inner chain {inner.__name__} fits its "
                "own; use inner: vp or inner: ve (or put the truncated chain inside it where that chain supports it)"
            )
        problems += self.inner.check_recipe(components)
        if not math.isfinite(self.truncate_logsnr):
            problems.append(f"chain 'truncated': truncate_logsnr must be finite, got {self.truncate_logsnr}")
        schedule = components.get("schedule")
        if schedule is not None and math.isfinite(self.truncate_logsnr):
            low, high = schedule.logsnr_at(1.0), schedule.logsnr_at(schedule.t_min)
            if not low < self.truncate_logsnr < high:
                problems.append(
                    f"chain 'truncated': truncate_logsnr = {self.truncate_logsnr:g} is outside the schedule's range "
                    f"({low:.4g}, {high:.4g}), so the cut would skip no step or every step; choose a logSNR inside it"
                )
        if (
            spec is not None
            and self.generator == "gmm"
            and self.covariance_for(spec) == "full"
            and spec.numel > _FULL_COVARIANCE_MAX_DIM
        ):
            problems.append(
                f"chain 'truncated': a full-covariance mixture in {spec.numel} dimensions needs {self.components} "
                f"{spec.numel}x{spec.numel} matrices; set covariance: diagonal, or generator: vae"
            )
        denoiser = components.get("denoiser")
        if spec is not None and denoiser is not None and denoiser.uses_labels(spec):
            problems.append(
                "chain 'truncated': the generator models the unconditional marginal at the cut, so a class-conditional "
                "denoiser would start from the wrong class mix; set the denoiser's conditional: false"
            )
        return problems

    def covariance_for(self, spec: DataSpec) -> str:
        """The mixture's covariance for data of ``spec`` ("auto" resolved)."""
        if self.covariance != "auto":
            return self.covariance
        return "full" if spec.numel <= _AUTO_FULL_MAX_DIM else "diagonal"

    # ---------------------------------------------------------------- the cut

    def sampling_levels(self, levels: list[Level], schedule=None) -> list[Level]:
        """The grid from the cut on: the cut's level, then the grid's levels less noisy than
        it (levels within a relative 1e-9 of the cut are merged into it)."""
        cut = self.truncate_logsnr
        kept = [lvl for lvl in levels if lvl.logsnr > cut + 1e-9 * (1.0 + abs(cut))]
        return [self.level(cut), *kept]

    def training_logsnr(self, logsnr: torch.Tensor, schedule=None) -> torch.Tensor:
        """Training levels clipped to the cut: lambda -> max(lambda, truncate_logsnr). The
        denoiser is never evaluated noisier than the cut, so the weighting's mass there moves
        onto the cut itself, the level every sampling run's first step evaluates."""
        return torch.clamp(logsnr, min=self.truncate_logsnr)

    def describe_sampling(self, before: list[Level], after: list[Level]) -> str | None:
        skipped = (len(before) - 1) - (len(after) - 1)
        return (
            f"truncated chain: started at logSNR {self.truncate_logsnr:g} from the {self.generator} generator, "
            f"{skipped} of {len(before) - 1} steps skipped"
        )

    def build_module(self, spec: DataSpec) -> TruncatedModule:
        return TruncatedModule(self, spec)

    def initial_state(self, level: Level, source) -> torch.Tensor:
        raise FundiffError(
            "chain 'truncated' starts sampling from its fitted generator: build the pipeline (fundiff.Pipeline "
            "uses chain.build_module) and fit it (fundiff train, or pipeline.chain.fit(pipeline))"
        )


class TruncatedModule(WrappingChainModule):
    """The truncated chain with its generator (a module; the pipeline uses it as the chain)."""

    def __init__(self, config: Truncated, spec: DataSpec):
        super().__init__(config, spec)
        if config.generator == "gmm":
            self.generator: nn.Module = MixtureGenerator(config.components, spec.numel, config.covariance_for(spec))
        else:
            self.generator = VAEGenerator(spec.numel, config.vae_latent_dim, config.vae_width, config.seed)

    def training_logsnr(self, logsnr, schedule=None):
        return self.config.training_logsnr(logsnr, schedule)

    def describe_sampling(self, before, after):
        return self.config.describe_sampling(before, after)

    def sampling_levels(self, levels: list[Level], schedule=None) -> list[Level]:
        cut = self.config.sampling_levels(levels, schedule)
        return [self.level(cut[0].logsnr), *cut[1:]]  # the cut's level made by (and carrying) this module

    # ---------------------------------------------------------------- the generator

    def fitting_set(self, pipeline) -> torch.Tensor:
        """(fit_samples, D) float64: data points (drawn uniformly, Philox) perturbed to the cut
        by the inner chain with the recipe's noise type (and its corruption, if any), one
        deterministic noise draw per point."""
        config, data = self.config, pipeline.data.x
        ids = torch.arange(config.fit_samples)
        rows = (rng.uniform(config.seed, STREAM_FIT_DATA, 0, ids) * data.shape[0]).long().clamp(max=data.shape[0] - 1)
        x0 = data[rows].to(torch.float64)
        stream = rng.NoiseStream(config.seed, ids, self.spec.shape, stream=STREAM_FIT_DATA, dtype=torch.float64)
        noise = pipeline.noise.sample(stream, 1).to(torch.float64)
        level = self.level(config.truncate_logsnr)
        x0 = pipeline.noise.corrupt(x0, torch.full((x0.shape[0],), level.logsnr, dtype=torch.float64))
        x_cut = self.perturb(
            x0, noise, torch.tensor(level.alpha, dtype=torch.float64), torch.tensor(level.sigma, dtype=torch.float64)
        )
        return x_cut.flatten(1)

    def fit(self, pipeline) -> None:
        """Fit the generator to the marginal at the cut, once (a fitted module skips)."""
        if bool(self.fitted):
            return
        config = self.config
        x = self.fitting_set(pipeline)
        if config.generator == "gmm":
            self.generator.fit(
                x,
                iterations=config.em_iterations,
                tolerance=config.em_tolerance,
                covariance_floor=config.covariance_floor,
                seed=config.seed,
                stream=STREAM_FIT_INIT,
            )
        else:
            self.generator.fit(
                x,
                steps=config.vae_steps,
                batch_size=config.vae_batch_size,
                lr=config.vae_lr,
                seed=config.seed,
                stream=STREAM_FIT_VAE,
            )
        self.fitted.fill_(True)

    def initial_state(self, level: Level, source) -> torch.Tensor:
        """x at the cut drawn from the generator: per sample, the component (gmm) from
        ``source.uniform(1)`` and the normals from the probit of ``source.uniform(2)``, ...,
        so sample i is the same whatever the batch."""
        if not bool(self.fitted):
            raise FundiffError(
                "chain 'truncated': the generator is not fitted; train the recipe (fundiff train fits it before the "
                "denoiser) or call pipeline.chain.fit(pipeline)"
            )
        if abs(level.logsnr - self.config.truncate_logsnr) > 1e-9 * (1.0 + abs(self.config.truncate_logsnr)):
            raise FundiffError(
                f"chain 'truncated' can start only at its cut (logSNR {self.config.truncate_logsnr:g}), got a grid starting "
                f"at {level.logsnr:g}; sample through Pipeline.levels, which applies chain.sampling_levels"
            )
        uniforms = source.uniform(_DRAW_CHOICE)  # also fixes the state's shape, device and dtype
        normals = _normals_from(source, _DRAW_NORMALS)
        if self.config.generator == "gmm":
            x = self.generator.sample(uniforms.flatten(1)[:, 0], normals)
        else:
            x = self.generator.sample(normals)
        return x.reshape(uniforms.shape).to(uniforms.device, uniforms.dtype)


@hookimpl
def fundiff_register_chains(register):
    register("truncated", Truncated)
