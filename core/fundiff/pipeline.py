"""The generic training loop and sampling driver, and run directories.

A :class:`Pipeline` holds a recipe's components and the denoiser network built from them.
Training draws everything random from per-sample counter-based streams keyed by (seed,
step, position), so a resumed run continues the exact trajectory of an uninterrupted one
from the checkpoint alone. Sampling draws the prior and the fresh noise per *global sample
index*, so sample i is identical whatever the batch size.

A run directory holds::

    recipe.yaml              the resolved recipe (every default filled in)
    plugins.json             which plugin, distribution and version provided each component
    checkpoint.safetensors   model, EMA and optimizer state, written atomically
    metrics.jsonl            one JSON object per logged step
    samples/                 what ``fundiff sample`` wrote
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from . import distributed, fused, noiselevel, rng
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint, tensor_checksum
from .components import (
    BuildContext,
    Chain,
    Denoise,
    Guidance,
    LevelTensors,
    Noise,
    Parameterization,
    ReverseVariance,
    Sampler,
    Schedule,
    TrainingBatch,
    Weighting,
)
from .errors import FundiffError
from .noiselevel import Level
from .recipe import Recipe, load_recipe, read_recipe_file
from .registry import Registry

RECIPE_FILE = "recipe.yaml"
PLUGINS_FILE = "plugins.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"

# Recipe entries that may differ between a checkpoint and the recipe that resumes it.
_RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.log_every", "train.device", "train.parallel"}


# --------------------------------------------------------------------------------------
# Sampling building blocks (usable without a recipe)
# --------------------------------------------------------------------------------------


def noise_levels(schedule: Schedule, chain: Chain, steps: int) -> list[Level]:
    """``steps + 1`` host-side levels: t = 1, 1 - 1/steps, ..., 1/steps, then clean data.

    Evenly spaced in t (the spacing of the schedule itself); the last level has sigma = 0,
    so a sampler's final step returns its x0 estimate. Computed once, on the host.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.tensor([1.0 - i / steps for i in range(steps)], dtype=torch.float64)
    logsnrs = schedule.logsnr(ts).tolist()
    return [chain.level(lam) for lam in logsnrs] + [chain.level(math.inf)]


def _with_autocast(denoise: Denoise, device: torch.device, precision: str, dtype: torch.dtype) -> Denoise:
    """Run the denoiser under autocast; the sampler's state and coefficients keep ``dtype``."""

    def run(x: torch.Tensor, level: Level) -> torch.Tensor:
        with autocast(device, precision):
            x0 = denoise(x, level)
        return x0.to(dtype)

    inner = getattr(denoise, "deferred", None)
    if inner is not None:

        def deferred(x: torch.Tensor, level: Level):
            with autocast(device, precision):
                x0 = inner(x, level)
            # a deferred prediction keeps its branches in the autocast dtype: the fused step
            # reads them as they are (less traffic than casting them first)
            return x0.to(dtype) if isinstance(x0, torch.Tensor) else x0

        run.deferred = deferred
    return run


class VarianceOutput:
    """Where ``make_predict`` keeps the network's learned-variance output ``v`` of its most
    recent call (and that call's level), for a reverse variance with ``needs_network``."""

    def __init__(self) -> None:
        self.level: Optional[Level] = None
        self.v: Optional[torch.Tensor] = None


def make_predict(model: torch.nn.Module, parameterization: Parameterization, variance_output: Optional[VarianceOutput] = None):
    """``predict(x, level, cond) -> x0`` from a network and its parameterization. With
    ``variance_output`` the network is called with ``return_variance=True`` and its ``v`` kept
    there."""

    def predict(x: torch.Tensor, level: Level, cond: Optional[torch.Tensor]) -> torch.Tensor:
        # a host float filled on the device: no device-to-host synchronisation
        logsnr = torch.full((x.shape[0],), level.logsnr, dtype=x.dtype, device=x.device)
        scale = parameterization.input_scale(level.alpha, level.sigma)
        x_in = x * scale if not (isinstance(scale, float) and scale == 1.0) else x
        if variance_output is None:
            out = model(x_in, logsnr, cond)
        else:
            out, variance_output.v = model(x_in, logsnr, cond, return_variance=True)
            variance_output.level = level
        return parameterization.to_x0(out, x, level.alpha, level.sigma)

    predict.model = model  # the network, for guidances that read its activations (self-guidance)
    return predict


def make_denoise(
    model: torch.nn.Module,
    parameterization: Parameterization,
    guidance: Guidance,
    cond: Optional[torch.Tensor] = None,
    levels: Optional[Sequence[Level]] = None,
    variance_output: Optional[VarianceOutput] = None,
) -> Denoise:
    """``denoise(x, level) -> x0``: what samplers call, with guidance applied.

    One call is one sampling run: the guidance's per-run state (``guidance.start(levels)``,
    with the run's grid when given) lives in the returned function. ``variance_output``: see
    :func:`make_predict`."""
    predict = make_predict(model, parameterization, variance_output)
    run = guidance.start(levels)

    def denoise(x: torch.Tensor, level: Level) -> torch.Tensor:
        return run.denoise(predict, x, level, cond)

    def deferred(x: torch.Tensor, level: Level):
        # for fused steps (fundiff.fused): the guidance's branches and combine weights when it
        # can leave the combine to the step, else the guided estimate as ``denoise`` gives it
        method = getattr(run, "denoise_deferred", None)  # a run object need not be a Guidance
        prediction = method(predict, x, level, cond) if method is not None else None
        return prediction if prediction is not None else run.denoise(predict, x, level, cond)

    denoise.deferred = deferred
    return denoise


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision for the denoiser: autocast to bf16 / fp16, or a no-op for fp32."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


class ComponentNoise:
    """The noise source a pipeline hands to samplers: the recipe's noise type drawn from a
    per-sample stream, so stochastic steps add noise of the type the model was trained on."""

    def __init__(
        self,
        noise: "Noise",
        stream: rng.NoiseStream,
        reverse_variance: Optional[ReverseVariance] = None,
        variance_output: Optional[VarianceOutput] = None,
    ):
        self.noise = noise
        self.stream = stream
        self.reverse_variance = reverse_variance
        self.variance_output = variance_output

    def sample(self, draw: int) -> torch.Tensor:
        return self.noise.sample(self.stream, draw)

    def philox(self, draw: int):
        """``sample(draw)`` by its key (a :class:`fundiff.fused.PhiloxNormal`) when the noise type
        is the stream's standard normal, else None: then fused steps take the drawn tensor."""
        return self.stream.philox(draw) if getattr(type(self.noise), "standard_normal", False) else None

    def uniform(self, draw: int) -> torch.Tensor:
        """Uniforms on (0, 1) of the state's shape from the same per-sample stream (for
        categorical or other non-Gaussian draws; draw indices are shared with ``sample``)."""
        return self.stream.uniform(draw)

    def variance(self, s: Level, t: Level) -> "float | torch.Tensor | None":
        """The recipe's reverse variance of p(x_s | x_t) (None without a ``variance`` section),
        from the network's variance output of its most recent call at level ``t`` when the
        component reads it. Under guidance that batches several branches into one call, the
        first branch's (the conditional one's) rows are used."""
        if self.reverse_variance is None:
            return None
        v = None
        if type(self.reverse_variance).needs_network:
            out = self.variance_output
            if out is None or out.v is None or out.level is None or out.level.logsnr != t.logsnr:
                raise FundiffError(
                    f"reverse variance {type(self.reverse_variance).__name__} reads the network's variance output at "
                    f"logSNR {t.logsnr:.4g}, but the sampler has not called the denoiser there (or it has no variance head)"
                )
            v = out.v[: self.stream.batch_size]
        return self.reverse_variance.variance(s, t, v)

    def corrupt(self, x0: torch.Tensor, level: Level) -> torch.Tensor:
        """The noise type's operator C at a host-side level (identity for additive noise)."""
        logsnr = torch.full((x0.shape[0],), level.logsnr, dtype=x0.dtype, device=x0.device)
        return self.noise.corrupt(x0, logsnr)


class _TrainingNoise:
    """Per-sample random numbers of one training step for ``Chain.training_losses``:
    ``sample(draw)`` the recipe's noise type, ``uniform(draw)`` uniforms; draw 0 is the
    draw the Gaussian loss uses (the step's noise), further draws are the chain's own."""

    def __init__(self, noise: "Noise", stream: rng.NoiseStream, step: int):
        self.noise, self.stream, self.step = noise, stream, step

    def _stream(self, draw: int) -> rng.NoiseStream:
        # draw 0 is the step's noise stream; draw k >= 1 its own stream (draw indices, the
        # step, must stay below 2^32, so the draw cannot be packed into them)
        if not 0 <= draw < 2**15:
            raise ValueError(f"training draws must be in [0, 2^15), got {draw}")
        return self.stream if draw == 0 else self.stream.with_stream(rng.STREAM_TRAIN_CHAIN + draw)

    def sample(self, draw: int = 0) -> torch.Tensor:
        return self.noise.sample(self._stream(draw), self.step)

    def uniform(self, draw: int = 0) -> torch.Tensor:
        return self._stream(draw).uniform(self.step)


def _under_autocast(network: torch.nn.Module, device: torch.device, precision: str) -> Callable[..., torch.Tensor]:
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(device, precision):
            return network(*args, **kwargs)

    return run


# --------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------


def _available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for a new allocation on ``device``, or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(denoiser, context: BuildContext, recipe: Recipe, device: torch.device) -> None:
    """Refuse a recipe whose weights plus optimizer state cannot fit, before allocating them.

    The network is built on the ``meta`` device (shapes only, no memory) to count its
    parameters; training needs about 5 copies in float32 (weights, gradients, two AdamW
    moments, EMA). Activations are not estimated, so this catches only the gross cases.
    A denoiser that cannot be built on ``meta`` is not estimated. Under ``train.parallel:
    fsdp`` with W processes the five copies are split W ways, but each rank first builds the
    whole model (one copy).
    """
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in denoiser.build(context).parameters())
    except Exception:  # noqa: BLE001 - the estimate is best effort
        return
    copies = 5.0 if type(denoiser).trainable else 1.0
    shards = int(os.environ.get("WORLD_SIZE", "1")) if recipe.train.parallel == "fsdp" else 1
    need = params * 4 * max(1.0, copies / shards)
    available = _available_memory(device)
    if available is not None and need > available:
        gib = 1024**3
        fix = "; or shard it across processes with train.parallel: fsdp under torchrun" if shards == 1 and copies > 1 else ""
        raise FundiffError(
            f"denoiser '{recipe.names.get('denoiser', '?')}' has {params:,} parameters: training needs about "
            f"{need / gib:.1f} GiB for weights, gradients, AdamW state and EMA, but {available / gib:.1f} GiB is "
            f"available on {device}; make the denoiser smaller (e.g. its width or depth){fix}"
        )


class Pipeline:
    """A recipe's components plus the denoiser network (and its EMA copy)."""

    def __init__(self, recipe: Recipe, *, device: Union[str, torch.device, None] = None):
        self.recipe = recipe
        self.device = torch.device(device or recipe.train.device)
        self.data_set = recipe["data"]
        self.spec = self.data_set.spec()
        self.denoiser = recipe["denoiser"]
        self.uses_labels = self.denoiser.uses_labels(self.spec)
        # a chain with fitted state (data-estimated prior, generator, autoencoder) is a module
        self.chain_module = recipe["chain"].build_module(self.spec)
        if self.chain_module is not None:
            self.chain_module = self.chain_module.to(self.device)
        #: the shape the chain and the denoiser work on (the data's, unless the chain says otherwise)
        self.state_spec = self.chain.state_spec(self.spec)
        context = BuildContext(spec=self.state_spec, components=dict(recipe.components))
        check_memory(self.denoiser, context, recipe, self.device)
        torch.manual_seed(recipe.train.seed)  # initialisation depends on the seed alone
        self.model = self.denoiser.build(context).to(self.device)
        self.trainable = type(self.denoiser).trainable and any(True for _ in self.model.parameters())
        self.ema_model: Optional[torch.nn.Module] = None
        if self.trainable and recipe.train.ema > 0:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        # a weighting that keeps statistics is a module whose buffers live in checkpoints
        self.weighting_module = recipe["weighting"].build_module()
        if self.weighting_module is not None:
            self.weighting_module = self.weighting_module.to(self.device)
        # a learned schedule is a module whose parameters train with the denoiser
        self.schedule_module = recipe["schedule"].build_module()
        if self.schedule_module is not None:
            self.schedule_module = self.schedule_module.to(self.device)
            self.trainable = True
        self._data = None
        self._noise: Optional[Noise] = None
        self.forward_model: Optional[torch.nn.Module] = None  # the DDP wrapper in distributed training
        self.step = 0
        #: the run directory (set by ``train`` and ``load_run``): where spacings may cache results
        self.run_dir: Optional[str] = None

    # components by kind, for readability
    @property
    def schedule(self) -> Schedule:
        return self.schedule_module if self.schedule_module is not None else self.recipe["schedule"]

    @property
    def weighting(self) -> Weighting:
        return self.weighting_module if self.weighting_module is not None else self.recipe["weighting"]

    def parameters(self) -> list[torch.nn.Parameter]:
        """Everything the optimizer trains: the denoiser's and a learned schedule's parameters."""
        params = list(self.model.parameters())
        if self.schedule_module is not None:
            params += list(self.schedule_module.parameters())
        return params

    @property
    def chain(self) -> Chain:
        return self.chain_module if self.chain_module is not None else self.recipe["chain"]

    @property
    def components(self) -> dict:
        """The recipe's components, with fitted or learned modules in place of their specs."""
        components = dict(self.recipe.components)
        components.update(chain=self.chain, schedule=self.schedule, weighting=self.weighting)
        return components

    @property
    def parameterization(self) -> Parameterization:
        return self.recipe["parameterization"]

    @property
    def guidance(self) -> Guidance:
        return self.recipe["guidance"]

    @property
    def sampler(self) -> Sampler:
        return self.recipe["sampler"]

    @property
    def data(self):
        if self._data is None:
            self._data = self.data_set.load()
        return self._data

    @property
    def noise(self) -> Noise:
        """The recipe's noise type, bound to the data when it estimates something from it."""
        if self._noise is None:
            noise = self.recipe["noise"]
            self._noise = noise.bind(self.data) if type(noise).needs_data else noise
        return self._noise

    # ---------------------------------------------------------------- training

    def loss(self, step: int, batch_size: int) -> torch.Tensor:
        """The weighted denoising loss of optimizer step ``step`` (a deterministic batch)."""
        return self.per_example_losses(step, batch_size).mean()

    @torch.no_grad()
    def training_logsnr(self, step: int, batch_size: int) -> torch.Tensor:
        """The logSNRs of step ``step``'s batch (a pure function of seed and step): for reports."""
        u = rng.uniform(self.recipe.train.seed, rng.STREAM_TRAIN_LEVEL, step, torch.arange(batch_size))
        logsnr = self.weighting.draw(u.to(self.device), self.schedule)[0].detach().to(torch.float64)
        return self.chain.training_logsnr(logsnr, self.schedule).detach().cpu()

    def per_example_losses(
        self, step: int, batch_size: int, *, variance_gradient: bool = True, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The (B,) weighted per-example losses of step ``step``.

        With a learned schedule and ``variance_gradient``, gradients reaching the schedule's
        parameters are those of mean(L^2) rather than mean(L) (see below)."""
        recipe, seed = self.recipe, self.recipe.train.seed
        data = self.data
        # positions in the global batch: a rank of a distributed run computes its slice
        positions = torch.arange(batch_size) if positions is None else positions
        index = (rng.uniform(seed, rng.STREAM_TRAIN_DATA, step, positions) * data.x.shape[0]).long()
        chain = self.chain
        x0 = chain.encode(data.x[index].to(self.device))
        cond = data.labels[index].to(self.device) if self.uses_labels and data.labels is not None else None
        u_level = rng.uniform(seed, rng.STREAM_TRAIN_LEVEL, step, positions)
        logsnr, log_extra = self.weighting.draw(u_level.to(self.device), self.schedule)
        # the chain may move the draws (a discrete-time chain trains on its grid only)
        logsnr = chain.training_logsnr(logsnr.to(torch.float64), self.schedule)
        stream = rng.NoiseStream(
            seed, positions, self.state_spec.shape, stream=rng.STREAM_TRAIN_NOISE, device=self.device, dtype=x0.dtype
        )
        if cond is not None:
            cond = self.guidance.training_condition(cond, rng.uniform(seed, rng.STREAM_TRAIN_COND, step, positions).to(self.device))
        network = self.forward_model if self.forward_model is not None else self.model
        own = chain.training_losses(
            TrainingBatch(
                x0=x0,
                cond=cond,
                logsnr=logsnr,
                log_extra=log_extra,
                noise=_TrainingNoise(self.noise, stream, step),
                network=_under_autocast(network, self.device, recipe.train.precision),
                components=self.components,
                step=step,
            )
        )
        if own is not None:  # the chain's own objective (categorical, manifold, coupled chains)
            self.last_logsnr = logsnr.detach()
            return own
        alpha, sigma = chain.alpha_sigma(logsnr)
        eps = self.noise.sample(stream, step)
        a = noiselevel.append_dims(alpha.to(self.device, x0.dtype), x0.ndim)
        s = noiselevel.append_dims(sigma.to(self.device, x0.dtype), x0.ndim)
        x_t = chain.perturb(self.noise.corrupt(x0, logsnr.to(self.device, x0.dtype)), eps, a, s)
        param = self.parameterization
        reverse_variance = recipe.get("variance")
        learns_variance = reverse_variance is not None and type(reverse_variance).needs_network
        v = None
        with autocast(self.device, recipe.train.precision):
            if learns_variance:
                out, v = network(param.input_scale(a, s) * x_t, logsnr.to(self.device, x0.dtype), cond, return_variance=True)
            else:
                out = network(param.input_scale(a, s) * x_t, logsnr.to(self.device, x0.dtype), cond)
        out = out.to(x0.dtype)
        target = param.target(x0, eps, x_t, a, s)
        # weight of the target-space MSE = w(lambda) in x0 units / (target-MSE per x0-MSE)
        log_w = self.weighting.log_x0_weight(logsnr, alpha, sigma) - param.log_x0_mse_factor(alpha, sigma)
        if log_extra is not None:
            log_w = log_w + log_extra.to(torch.float64)
        weight = torch.exp(log_w).to(self.device, x0.dtype)
        per_example = weight * ((out - target) ** 2).flatten(1).mean(1)
        if learns_variance:
            # the reverse variance's own term (improved DDPM's L_vlb), at levels s below t
            level_t = LevelTensors(logsnr=logsnr, alpha=alpha, sigma=sigma)
            level_s = reverse_variance.training_levels(level_t, self.schedule, chain)
            if level_s is not None:
                x0_hat = param.to_x0(out, x_t, a, s)
                v = v.to(x0.dtype) if v is not None else None
                extra = reverse_variance.training_loss(x0, x_t, x0_hat, v, level_t, level_s, self.schedule)
                if extra is not None:
                    per_example = per_example + extra.to(per_example.dtype)
        self.last_logsnr = logsnr.detach()  # for weightings that learn from the losses (update below)
        if variance_gradient and self.schedule_module is not None and torch.is_grad_enabled():
            # A learned schedule minimises the variance of the loss estimate (VDM sec. 5.2):
            # its parameters reach the loss only through the per-example lambda_i (and the
            # rate term), so scaling those gradients by 2 L_i turns d mean(L) into d mean(L^2).
            scale = 2.0 * per_example.detach().to(torch.float64)
            for tensor in (logsnr, log_extra):
                if tensor is not None and tensor.requires_grad:
                    tensor.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))
        return per_example

    # ---------------------------------------------------------------- sampling

    def levels(self, steps: Optional[int] = None, sampler: Optional[Sampler] = None, *, through_chain: bool = True) -> list[Level]:
        """The host-side grid of noise levels: the recipe's spacing (prepared with this
        pipeline's model and run directory, see ``Spacing.prepare``), or t evenly spaced,
        then as the chain changes it (``Chain.sampling_levels``; ``through_chain=False``:
        the spacing's grid before that)."""
        sampler = sampler or self.sampler
        spacing = self.recipe.get("spacing")
        steps = steps or sampler.steps
        if spacing is None:
            levels = noise_levels(self.schedule, self.chain, steps)
        else:
            levels = spacing.prepare(self, self.run_dir).levels(self.schedule, self.chain, steps)
        return self.chain.sampling_levels(levels, self.schedule) if through_chain else levels

    def sampling_note(self, steps: Optional[int] = None, sampler: Optional[Sampler] = None) -> Optional[str]:
        """The chain's one-line note on how it changes this pipeline's sampling grid
        (``Chain.describe_sampling``), or None."""
        before = self.levels(steps, sampler, through_chain=False)
        return self.chain.describe_sampling(before, self.chain.sampling_levels(list(before), self.schedule))

    def reverse_variance(self) -> Optional[ReverseVariance]:
        """The recipe's reverse variance prepared for this pipeline's model and run directory
        (see ``ReverseVariance.prepare``), or None without a ``variance`` section."""
        variance = self.recipe.get("variance")
        return None if variance is None else variance.prepare(self, self.run_dir)

    def truncate(self, levels: Sequence[Level], strength: Optional[float] = None, stop_logsnr: Optional[float] = None) -> list[Level]:
        """Cut a grid for truncated sampling (survey sec. 5.2.1).

        ``strength`` in (0, 1]: start at the noisy level whose t (``schedule.t_from_logsnr``)
        is nearest to ``strength`` (ties: the less noisy one). ``stop_logsnr``: keep the levels
        noisier than it and end at ``chain.level(stop_logsnr)`` itself (the caller then
        denoises there). Either may be None."""
        levels = list(levels)
        if strength is not None:
            if not 0.0 < strength <= 1.0:
                raise FundiffError(f"strength must be in (0, 1], got {strength}")
            noisy = [lvl for lvl in levels if not lvl.is_clean]
            ts = self.schedule.t_from_logsnr(torch.tensor([lvl.logsnr for lvl in noisy], dtype=torch.float64)).tolist()
            start = min(range(len(noisy)), key=lambda i: (abs(ts[i] - strength), -i))
            levels = levels[start:]
        if stop_logsnr is not None and stop_logsnr != math.inf:
            if not stop_logsnr > levels[0].logsnr:
                raise FundiffError(
                    f"sample.stop_logsnr ({stop_logsnr}) must be above the first level's logSNR ({levels[0].logsnr:.6g}): "
                    "the sampler stops at a less noisy level than it starts from"
                )
            levels = [lvl for lvl in levels if lvl.logsnr < stop_logsnr] + [self.chain.level(float(stop_logsnr))]
        return levels

    def sampling_model(self, use_ema: bool = True) -> torch.nn.Module:
        return self.ema_model if use_ema and self.ema_model is not None else self.model

    def labels_for(self, sample_ids: torch.Tensor, seed: int, label: Optional[int] = None) -> Optional[torch.Tensor]:
        """Per-sample class labels for a conditional denoiser (None for unconditional ones)."""
        if not self.uses_labels:
            return None
        if label is not None:
            if not 0 <= label < self.spec.num_classes:
                raise FundiffError(f"sample.label: must be in [0, {self.spec.num_classes - 1}] for this data, got {label}")
            return torch.full((sample_ids.numel(),), label, dtype=torch.long, device=self.device)
        counts = torch.bincount(self.data.labels, minlength=self.spec.num_classes).to(torch.float64)
        u = rng.uniform(seed, rng.STREAM_PRIOR, 1, sample_ids)
        labels = torch.searchsorted(torch.cumsum(counts / counts.sum(), 0), u).clamp(max=self.spec.num_classes - 1)
        return labels.to(self.device)

    @torch.no_grad()
    def sample(
        self,
        num_samples: Optional[int] = None,
        *,
        seed: Optional[int] = None,
        batch_size: Optional[int] = None,
        sampler: Optional[Sampler] = None,
        steps: Optional[int] = None,
        label: Optional[int] = None,
        use_ema: Optional[bool] = None,
        start: int = 0,
        dtype: torch.dtype = torch.float32,
        progress: Optional[Callable[[int], None]] = None,
        init: Optional[torch.Tensor] = None,
        strength: float = 1.0,
        stop_logsnr: Optional[float] = None,
        backend: Optional[str] = None,
        cuda_graphs: Optional[bool] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Draw samples ``start .. start + num_samples - 1``; returns (samples, labels).

        Sample i depends only on (seed, i): batch size and ``start`` do not change it.

        Truncation (survey sec. 5.2.1): with ``init`` (N, *shape), sample i starts from row i
        of it (row 0 for every sample when N = 1), perturbed by the chain to the grid level
        nearest t = ``strength`` with sample i's prior noise, and the sampler walks the rest
        of the grid (image-to-image; ``num_samples`` defaults to N - start). ``stop_logsnr``
        (default ``sample.stop_logsnr``) ends the walk at that logSNR and returns the
        denoiser's x0 estimate there.

        ``backend`` and ``cuda_graphs`` (default ``sample.backend``, ``sample.cuda_graphs``):
        how the sampler's fused steps run (docs/fused-steps.md); they do not change the samples
        beyond float32 rounding.
        """
        options = self.recipe.sample
        if init is not None:
            init = torch.as_tensor(init)
            if init.ndim != len(self.spec.shape) + 1 or tuple(init.shape[1:]) != tuple(self.spec.shape):
                raise FundiffError(f"init must have shape (N, *{tuple(self.spec.shape)}), got {tuple(init.shape)}")
            if num_samples is None and init.shape[0] > 1:
                num_samples = init.shape[0] - start
        num_samples = options.num_samples if num_samples is None else num_samples
        if init is not None and init.shape[0] > 1 and start + num_samples > init.shape[0]:
            raise FundiffError(f"init has {init.shape[0]} rows, but samples up to {start + num_samples - 1} were asked for")
        stop_logsnr = options.stop_logsnr if stop_logsnr is None else stop_logsnr
        seed = options.seed if seed is None else seed
        batch_size = options.batch_size if batch_size is None else batch_size
        label = options.label if label is None else label
        use_ema = options.use_ema if use_ema is None else use_ema
        sampler = sampler or self.sampler
        backend = options.backend if backend is None else backend
        graphed = self._sampling_graphs(sampler, options.cuda_graphs if cuda_graphs is None else cuda_graphs)
        levels = self.truncate(self.levels(steps, sampler), strength if init is not None else None, stop_logsnr)
        stop = levels[-1] if not levels[-1].is_clean else None  # truncated: a final denoise there
        chain = self.chain
        model = self.sampling_model(use_ema)
        model.eval()
        precision = options.precision
        reverse_variance = self.reverse_variance()
        outputs, label_outputs = [], []
        for begin in range(start, start + num_samples, batch_size):
            ids = torch.arange(begin, min(begin + batch_size, start + num_samples))
            noise_type = self.noise
            prior = ComponentNoise(
                noise_type, rng.NoiseStream(seed, ids, self.state_spec.shape, stream=rng.STREAM_PRIOR, device=self.device, dtype=dtype)
            )
            if init is None:
                x = chain.initial_state(levels[0], prior)
            else:  # truncation: init perturbed to the start level with this sample's prior noise
                rows = init[ids] if init.shape[0] > 1 else init.expand(ids.numel(), *init.shape[1:])
                first = levels[0]
                x0 = chain.encode(rows.to(self.device, dtype))
                x0 = noise_type.corrupt(x0, torch.full((ids.numel(),), first.logsnr, dtype=dtype, device=self.device))
                x = chain.perturb(x0, prior.sample(0), torch.tensor(first.alpha, dtype=dtype, device=self.device), torch.tensor(first.sigma, dtype=dtype, device=self.device))
            stream = rng.NoiseStream(seed, ids, self.state_spec.shape, stream=rng.STREAM_SAMPLER, device=self.device, dtype=dtype)
            variance_output = VarianceOutput() if reverse_variance is not None and type(reverse_variance).needs_network else None
            noise = ComponentNoise(noise_type, stream, reverse_variance, variance_output)
            cond = self.labels_for(ids, seed, label)
            denoise = make_denoise(model, self.parameterization, self.guidance, cond, levels, variance_output)
            if precision != "fp32":
                denoise = _with_autocast(denoise, self.device, precision, dtype)
            finite: list[torch.Tensor] = []  # one device flag per step: checked after the loop, no sync inside
            if backend != "auto":
                fused.executor(x, backend)  # an explicitly requested backend that cannot run is an error
            with fused.use_backend(backend):
                if graphed is None:
                    x = sampler.sample(denoise, x, levels, noise, lambda i, x_i, x0_i: finite.append(torch.isfinite(x_i).all()))
                else:  # captured once per batch shape, replayed with this batch's x, sample ids and labels
                    run = lambda x_in, record, denoise=denoise, noise=noise: sampler.sample(denoise, x_in, levels, noise, record)
                    repeats = start + num_samples - (begin + ids.numel()) >= ids.numel()  # a later batch of this size?
                    x, finite = graphed(run, x, [stream.device_ids, cond], capture=repeats)
            if finite and not bool(torch.stack(finite).all()):
                first = int(torch.nonzero(~torch.stack(finite))[0])
                name = self.recipe.names.get("sampler", type(sampler).__name__) if sampler is self.sampler else type(sampler).__name__
                at = levels[min(first, len(levels) - 1)]
                raise FundiffError(
                    f"sampler '{name}' produced NaN or Inf at step {first} (from logSNR {at.logsnr:.4g}, sigma {at.sigma:.4g}) "
                    f"for samples {int(ids[0])}..{int(ids[-1])}; check the parameterization near this level "
                    "(eps-prediction divides by alpha), the number of steps, or use sample.precision: fp32"
                )
            if stop is not None:
                x = denoise(x, stop)
            outputs.append(chain.decode(x).cpu())
            if cond is not None:
                label_outputs.append(cond.cpu())
            if progress is not None:
                progress(ids.numel())
        samples = torch.cat(outputs)
        if not torch.isfinite(samples).all():
            raise FundiffError(
                "sampling produced NaN or Inf values; check the recipe's sampler, steps and parameterization "
                "(eps-prediction diverges where alpha -> 0)"
            )
        return samples, (torch.cat(label_outputs) if label_outputs else None)

    def _sampling_graphs(self, sampler: Sampler, enabled: bool) -> "Optional[fused.graphs.GraphedSampling]":
        """The CUDA-graph runner of one ``sample`` call, or None when ``sample.cuda_graphs`` is off."""
        if not enabled:
            return None
        name = self.recipe.names.get("sampler", type(sampler).__name__) if sampler is self.sampler else type(sampler).__name__
        if self.device.type != "cuda":
            raise FundiffError(f"sample.cuda_graphs needs a CUDA device, but sampling runs on {self.device}; set sample.device: cuda or turn it off")
        if type(sampler).couples_batch or getattr(sampler, "evaluations_per_step", 1) is None:
            raise FundiffError(
                f"sample.cuda_graphs: sampler '{name}' chooses its steps from the data (a host synchronisation per step), "
                "so its loop cannot be captured; use a fixed-step sampler or set sample.cuda_graphs: false"
            )
        from .fused.graphs import GraphedSampling

        return GraphedSampling(name)

    # ---------------------------------------------------------------- state

    def cache_key(self, settings: Mapping[str, Any]) -> str:
        """A key for results measured from this pipeline's sampling model (cost tables,
        variance estimates cached in the run directory): the training-relevant recipe,
        ``settings``, and the checksums of the sampling network's and a learned schedule's
        weights, so a resumed or retrained model is measured again."""
        digest = hashlib.sha256(recipe_hash(self.recipe).encode())
        digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
        for module in (self.sampling_model(self.recipe.sample.use_ema), self.schedule_module):
            if module is not None:
                digest.update(tensor_checksum(module.state_dict()).encode())
        return digest.hexdigest()

    def observe(self, losses: torch.Tensor, world: Optional["distributed.World"] = None) -> None:
        """After an optimizer step: let a stateful weighting learn from the batch's losses
        (all ranks' losses, in global order, so every rank keeps the same statistics)."""
        update = getattr(self.weighting_module, "update", None)
        if update is not None:
            w = world or distributed.World()
            logsnr = distributed.gather(self.last_logsnr, w)
            losses = distributed.gather(losses.detach().to(torch.float64), w)
            with torch.no_grad():
                update(logsnr, losses)

    def state_tensors(self, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.weighting_module is not None:
            tensors.update({f"weighting.{k}": v for k, v in self.weighting_module.state_dict().items()})
        if self.schedule_module is not None:
            tensors.update({f"schedule.{k}": v for k, v in self.schedule_module.state_dict().items()})
        if self.chain_module is not None:
            tensors.update({f"chain.{k}": v for k, v in self.chain_module.state_dict().items()})
        if self.ema_model is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema_model.state_dict().items()})
        if optimizer is not None:
            for index, state in optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            self.model.load_state_dict(part("model."))
            if self.schedule_module is not None:
                self.schedule_module.load_state_dict(part("schedule."))
            if self.weighting_module is not None:
                self.weighting_module.load_state_dict(part("weighting."))
            if self.chain_module is not None:
                self.chain_module.load_state_dict(part("chain."))
            if self.ema_model is not None:
                ema = part("ema.")
                self.ema_model.load_state_dict(ema if ema else part("model."))
        except RuntimeError as exc:
            raise FundiffError(
                f"the checkpoint does not fit the recipe's denoiser ({str(exc).splitlines()[0]}); "
                "it was written for a different recipe"
            ) from None
        if optimizer is not None:
            self.load_optimizer_state(tensors, optimizer)

    def load_optimizer_state(self, tensors: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's state from a checkpoint's ``optim.INDEX.NAME`` tensors (full tensors;
        under FSDP each is sliced as its parameter is)."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                index, _, name = key[len("optim.") :].partition(".")
                state.setdefault(int(index), {})[name] = value
        # under FSDP each parameter is a slice: its moments are sliced the same way
        params = [param for group in optimizer.param_groups for param in group["params"]]
        state = {i: {k: distributed.shard_like(v, params[i]) for k, v in entry.items()} for i, entry in state.items()}
        saved = optimizer.state_dict()
        saved["state"] = state
        optimizer.load_state_dict(saved)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def recipe_hash(recipe: Union[Recipe, Mapping[str, Any]]) -> str:
    """Hash of the training-relevant part of a resolved recipe (a Recipe or its stored dict).

    Checkpoints carry it; loading compares it with the hash of the run's stored
    ``recipe.yaml`` as written, so parameters added to components in later versions (with
    defaults) do not orphan old runs."""
    resolved = copy.deepcopy(dict(recipe.to_dict() if isinstance(recipe, Recipe) else recipe))
    for dotted in _RESUMABLE_CHANGES:
        section, key = dotted.split(".")
        if isinstance(resolved.get(section), dict):
            resolved[section].pop(key, None)
    for section in ("sample", "sampler", "guidance", "spacing"):  # sampling settings may change later
        resolved.pop(section, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Paths whose values differ; a parameter only the new recipe has (added to a component
    since the run was written, at its default) is not a difference."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES and not k.startswith("sample."))


def _make_optimizer(pipeline: Pipeline) -> torch.optim.Optimizer:
    options = pipeline.recipe.train
    return torch.optim.AdamW(
        pipeline.parameters(), lr=options.lr, betas=options.betas, weight_decay=options.weight_decay
    )


def _write_run_files(run_dir: str, recipe: Recipe) -> None:
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, RECIPE_FILE), recipe.to_yaml())
    from . import __version__

    info = {"fundiff": __version__, "torch": torch.__version__, "components": recipe.plugin_versions()}
    atomic_write_text(os.path.join(run_dir, PLUGINS_FILE), json.dumps(info, indent=2) + "\n")


def _save(
    pipeline: Pipeline, optimizer: Optional[torch.optim.Optimizer], run_dir: str, world: Optional["distributed.World"] = None
) -> None:
    """Write the checkpoint from rank 0. With sharded (FSDP) state every rank must call this:
    the full tensors are gathered onto rank 0, so the file is the unsharded format."""
    from . import __version__

    world = world or distributed.World()
    tensors = distributed.gather_state(pipeline.state_tensors(optimizer), world)
    if world.is_main:
        save_checkpoint(
            os.path.join(run_dir, CHECKPOINT_FILE),
            tensors,
            {"step": str(pipeline.step), "fundiff_version": __version__, "recipe_hash": recipe_hash(pipeline.recipe)},
        )


def _checkpoint_step(run_dir: str) -> str:
    try:
        return load_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE))[1].get("step", "?")
    except FundiffError:
        return "?"


def _skipped_so_far(metrics_path: str) -> int:
    """Batches skipped for non-finite values before this (resumed) process started."""
    skipped = 0
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    skipped = max(skipped, int(json.loads(line).get("skipped", 0)))
                except (json.JSONDecodeError, ValueError, TypeError):
                    break
    return skipped


def _levels_text(logsnr: torch.Tensor, chain: Chain) -> str:
    values = sorted(set(round(float(v), 4) for v in logsnr[:5]))
    sigmas = [round(float(chain.level(v).sigma), 4) if math.isfinite(v) else v for v in values]
    return f"logSNR {values} (sigma {sigmas})"


def _nonfinite_loss_report(pipeline: Pipeline, step: int, losses: torch.Tensor, positions: torch.Tensor) -> str:
    bad = ~torch.isfinite(losses.detach())
    logsnr = pipeline.training_logsnr(step, int(positions[-1]) + 1)[positions][bad.cpu()]
    names = pipeline.recipe.names
    return (
        f"training loss is not finite at step {step} in {int(bad.sum())} of {losses.numel()} examples, at "
        f"{_levels_text(logsnr, pipeline.chain)}; components: weighting '{names['weighting']}', "
        f"parameterization '{names['parameterization']}', denoiser '{names['denoiser']}', schedule '{names['schedule']}'"
    )


def _nonfinite_gradient_report(pipeline: Pipeline, step: int) -> str:
    names = [
        n for n, p in pipeline.model.named_parameters() if p.grad is not None and not torch.isfinite(distributed.local(p.grad)).all()
    ]
    where = f"denoiser '{pipeline.recipe.names['denoiser']}' parameters {names[:3]}" if names else "the learned schedule's parameters"
    return f"gradients are not finite at step {step} (the loss is finite) in {where}"


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines logged after ``step`` (they belong to work the resume repeats)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
    atomic_write_text(path, "".join(keep))


def train(
    recipe: Union[Recipe, str, os.PathLike, Mapping[str, Any]],
    run_dir: Union[str, os.PathLike],
    *,
    resume: bool = False,
    quiet: bool = False,
    registry: Optional[Registry] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Pipeline:
    """Train a recipe into ``run_dir``; returns the trained :class:`Pipeline`.

    With ``resume=True`` an existing checkpoint in ``run_dir`` is continued exactly (same
    batches, same noise, same optimizer and EMA state); without it, a run directory that
    already holds a checkpoint is refused so nothing is overwritten.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, registry, overrides=overrides)
    run_dir = os.fspath(run_dir)
    checkpoint_path = os.path.join(run_dir, CHECKPOINT_FILE)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    has_checkpoint = os.path.exists(checkpoint_path)
    if has_checkpoint and not resume:
        raise FundiffError(
            f"{run_dir} already holds a trained run; pass --resume to continue it, or choose another --run-dir"
        )
    if has_checkpoint:
        stored = read_recipe_file(os.path.join(run_dir, RECIPE_FILE))
        differences = _recipe_differences(stored, recipe.to_dict())
        if differences:
            raise FundiffError(
                f"cannot resume {run_dir}: the recipe differs from the run's in {', '.join(differences)}; "
                "only train.steps (and logging / checkpoint intervals) may change on resume"
            )

    device = distributed.local_device(torch.device(recipe.train.device))
    world = distributed.world(device)
    options = recipe.train
    if options.batch_size % world.size:
        raise FundiffError(
            f"train.batch_size ({options.batch_size}) must be divisible by the number of processes ({world.size}): "
            "it is the global batch, split evenly across ranks"
        )
    pipeline = Pipeline(recipe, device=device)
    pipeline.run_dir = run_dir
    if has_checkpoint:
        tensors, metadata = load_checkpoint(checkpoint_path)
        # the stored file as written, or the recipe as this version resolves it (the file is
        # rewritten on resume, so a crash between the two writes leaves either)
        if metadata.get("recipe_hash") not in (recipe_hash(stored), recipe_hash(recipe)):
            raise FundiffError(f"{checkpoint_path} does not belong to the run's recipe.yaml (was the file edited?)")
        pipeline.load_state_tensors(tensors)  # the weights, before any sharding; the optimizer's state below
        pipeline.step = int(metadata["step"])
        if world.is_main:
            _truncate_metrics(metrics_path, pipeline.step)
    # a chain's own state (prior statistics, generator, autoencoder) is fitted first; its
    # fit is deterministic, so every rank fits the same state, and a resumed one skips it
    pipeline.chain.fit(pipeline)
    distributed.barrier(world)
    if world.is_main:
        _write_run_files(run_dir, recipe)
    quiet = quiet or not world.is_main
    if not pipeline.trainable:
        pipeline.step = options.steps
        if world.is_main:
            _save(pipeline, None, run_dir)
        if not quiet:
            print(f"{recipe['denoiser'].__class__.__name__} needs no training; wrote {run_dir}", file=sys.stderr)
        return pipeline
    if pipeline.step >= options.steps:
        if not quiet:
            print(f"{run_dir} is already trained to step {pipeline.step}", file=sys.stderr)
        return pipeline

    from tqdm import tqdm

    sharded = world.active and options.parallel == "fsdp"
    if options.parallel == "fsdp" and not world.active and not quiet:
        print("train.parallel: fsdp shards across torchrun processes; one process trains unsharded", file=sys.stderr)
    skeletons: dict[str, torch.nn.Module] = {}
    if sharded:
        # FSDP2 in place; the EMA copy is sharded the same way, so its slices line up with the
        # model's and the EMA update below stays elementwise on each rank
        skeletons["model"] = distributed.shard(pipeline.model)
        if pipeline.ema_model is not None:
            skeletons["ema"] = distributed.shard(pipeline.ema_model)
    optimizer = _make_optimizer(pipeline)  # after sharding: it must hold the sharded parameters
    if has_checkpoint:
        pipeline.load_optimizer_state(tensors, optimizer)
    local = options.batch_size // world.size
    positions = torch.arange(world.rank * local, (world.rank + 1) * local)
    extra_params: list[torch.nn.Parameter] = []
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        if not sharded:
            pipeline.forward_model = DistributedDataParallel(pipeline.model)
        # a learned schedule's parameters are outside the DDP / FSDP module: averaged by hand below
        extra_params = list(pipeline.schedule_module.parameters()) if pipeline.schedule_module is not None else []
    bar = tqdm(total=options.steps, initial=pipeline.step, disable=quiet, desc="train", unit="step", dynamic_ncols=True)
    pipeline.model.train()
    running, count, started = 0.0, 0, time.perf_counter()
    skipped = _skipped_so_far(metrics_path) if world.is_main else 0
    metrics = open(metrics_path, "a", encoding="utf-8") if world.is_main else None
    try:
        while pipeline.step < options.steps:
            step = pipeline.step
            lr = options.lr * min(1.0, (step + 1) / options.warmup) if options.warmup else options.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = pipeline.per_example_losses(step, options.batch_size, positions=positions)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            problem = None
            if distributed.any_true(not bool(torch.isfinite(loss)), world):
                problem = _nonfinite_loss_report(pipeline, step, losses, positions)
            else:
                loss.backward()
                for param in extra_params:
                    if param.grad is not None:
                        param.grad.copy_(distributed.mean(param.grad, world))
                grads = [p.grad for p in pipeline.parameters() if p.grad is not None]
                if sharded:
                    grad_norm = distributed.gradient_norm(grads, world)
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
                if not math.isfinite(grad_norm):
                    problem = _nonfinite_gradient_report(pipeline, step)
            if problem is not None:
                if options.on_nonfinite == "stop":
                    saved = (
                        f"the last checkpoint (step {_checkpoint_step(run_dir)}) is kept"
                        if os.path.exists(checkpoint_path)
                        else "no checkpoint was written yet"
                    )
                    raise FundiffError(f"{problem}; {saved}. Lower train.lr, keep train.grad_clip on, or set train.on_nonfinite: skip")
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                pipeline.step = step + 1
                if metrics is not None:
                    metrics.write(json.dumps({"step": pipeline.step, "skipped": skipped, "reason": problem}) + "\n")
                    metrics.flush()
                bar.update(1)
                continue
            if options.grad_clip > 0 and sharded:
                distributed.clip_gradients(grads, grad_norm, options.grad_clip)
            elif options.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(pipeline.parameters(), options.grad_clip)
            optimizer.step()
            pipeline.observe(losses, world)
            if pipeline.ema_model is not None:
                with torch.no_grad():
                    ema_params = list(pipeline.ema_model.parameters())
                    torch._foreach_lerp_(ema_params, list(pipeline.model.parameters()), 1.0 - options.ema)
                    for ema_buf, buf in zip(pipeline.ema_model.buffers(), pipeline.model.buffers()):
                        ema_buf.copy_(buf)
            pipeline.step = step + 1
            running += float(distributed.mean(loss.detach(), world))
            count += 1
            if pipeline.step % options.log_every == 0 or pipeline.step == options.steps:
                if metrics is not None:
                    record = {
                        "step": pipeline.step,
                        "loss": running / count,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "skipped": skipped,
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{running / count:.4f}")
                running, count = 0.0, 0
            if (world.is_main or sharded) and (pipeline.step % options.checkpoint_every == 0 or pipeline.step == options.steps):
                _save(pipeline, optimizer, run_dir, world)
            bar.update(1)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    pipeline.forward_model = None
    if sharded:
        # the returned pipeline holds plain modules with the full weights, as after DDP
        del optimizer
        pipeline.model = distributed.unshard(pipeline.model, skeletons["model"], device)
        if pipeline.ema_model is not None:
            pipeline.ema_model = distributed.unshard(pipeline.ema_model, skeletons["ema"], device)
    distributed.barrier(world)
    return pipeline


# --------------------------------------------------------------------------------------
# Loading runs and sampling them
# --------------------------------------------------------------------------------------


def load_run(
    run_dir: Union[str, os.PathLike],
    *,
    registry: Optional[Registry] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    device: Union[str, torch.device, None] = None,
) -> Pipeline:
    """Rebuild a trained run from its directory; ``overrides`` may change sampling settings
    (e.g. ``{"sampler.name": "ddpm", "sampler.steps": 100}``) but not the model."""
    run_dir = os.fspath(run_dir)
    recipe_path = os.path.join(run_dir, RECIPE_FILE)
    if not os.path.isdir(run_dir):
        raise FundiffError(f"run directory not found: {run_dir}; train one with: fundiff train RECIPE --run-dir {run_dir}")
    if not os.path.exists(recipe_path):
        raise FundiffError(f"{run_dir} is not a fundiff run (no {RECIPE_FILE}); pass the --run-dir given to fundiff train")
    stored = read_recipe_file(recipe_path)
    if overrides:
        allowed = ("sampler.", "sample.", "guidance.", "spacing.")
        for key in overrides:
            if not key.startswith(allowed):
                raise FundiffError(
                    f"cannot override {key} when sampling a trained run; only sampler.*, spacing.*, guidance.* and sample.* may change"
                )
    recipe = load_recipe(stored, registry, overrides=overrides)
    pipeline = Pipeline(recipe, device=device or distributed.local_device(torch.device(recipe.sample.device)))
    tensors, metadata = load_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE))
    if metadata.get("recipe_hash") not in (recipe_hash(stored), recipe_hash(recipe)):
        raise FundiffError(f"{run_dir}: the checkpoint does not belong to the run's recipe.yaml (was the file edited?)")
    pipeline.load_state_tensors(tensors)
    pipeline.step = int(metadata.get("step", 0))
    pipeline.run_dir = run_dir
    return pipeline


def sample(
    run: Union[Pipeline, str, os.PathLike],
    *,
    registry: Optional[Registry] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sample a run directory or a :class:`Pipeline`; keyword arguments as :meth:`Pipeline.sample`."""
    pipeline = run if isinstance(run, Pipeline) else load_run(run, registry=registry, overrides=overrides)
    return pipeline.sample(**kwargs)
