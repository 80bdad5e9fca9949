"""Knowledge distillation of a trained run into a faster sampler (survey sec. 5.2).

Two methods, both producing a normal run directory that ``fundiff sample`` and
:func:`fundiff.load_run` read (same recipe, the sampler's ``steps`` set to the student's):

- ``progressive`` (Salimans and Ho 2022, Algorithm 2): the student starts as a copy of the
  teacher's (EMA) network and learns to match two deterministic first-order steps of the
  teacher, t -> t' -> t'', with one step t -> t''. The step is the deterministic one of the
  Gaussian chain, x_s = alpha_s x0 + sigma_s eps with eps = (x_t - alpha_t x0) / sigma_t.
  Solving one step for the x0 that lands where the teacher's two land gives the target

      x0_target = (x_t'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

  trained with the recipe's parameterization and the x0 MSE weighted by max(SNR, 1) (their
  "truncated SNR" weighting, sec. 4). Each round the student becomes the teacher and the
  number of steps halves.
- ``one-step`` (Luhman and Luhman 2021): the teacher's deterministic samples (its recipe
  sampler and steps) are regressed from their initial noise; the student maps x_T to x0 in
  one denoiser call.

The distilled network is the conditional network itself: guidance is not distilled.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import noiselevel, rng
from .checkpoint import atomic_write_text
from .errors import FundiffError
from .noiselevel import Level
from .pipeline import CHECKPOINT_FILE, Pipeline, _save, _write_run_files, load_run
from .recipe import load_recipe
from .registry import Registry

METHODS = ("progressive", "one-step")
DISTILL_FILE = "distill.jsonl"


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equally sized point clouds (flattened, float64)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0)
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def first_order_step(x_t: torch.Tensor, x0: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """The deterministic first-order step t -> s: x_s = alpha_s x0 + sigma_s eps with
    eps = (x_t - alpha_t x0) / sigma_t (DDIM with eta = 0, Song et al. 2021 eq. 12)."""
    return alpha_s * x0 + sigma_s * (x_t - alpha_t * x0) / sigma_t


def x0_for_step(x_t: torch.Tensor, x_s: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """The x0 whose first-order step t -> s lands on ``x_s`` (Salimans and Ho, Algorithm 2):
    (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
    ratio = sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def _predictor(pipeline: Pipeline) -> Callable[..., torch.Tensor]:
    """``predict(model, x, logsnr, alpha, sigma, cond) -> x0`` with per-sample levels (no guidance)."""
    param = pipeline.parameterization

    def predict(model, x, logsnr, alpha, sigma, cond):
        out = model(param.input_scale(alpha, sigma) * x, logsnr, cond)
        return param.to_x0(out, x, alpha, sigma)

    return predict


def _columns(levels: Sequence[Level], index: torch.Tensor, ndim: int, device, dtype):
    """Per-sample (logsnr, alpha, sigma) of ``levels[index]``; alpha and sigma shaped to broadcast."""
    table = torch.tensor([[lvl.logsnr, lvl.alpha, lvl.sigma] for lvl in levels], dtype=torch.float64)[index]
    logsnr = table[:, 0].clamp(max=torch.finfo(dtype).max).to(device, dtype)
    alpha = noiselevel.append_dims(table[:, 1].to(device, dtype), ndim)
    sigma = noiselevel.append_dims(table[:, 2].to(device, dtype), ndim)
    return logsnr, alpha, sigma


def _check_gaussian(pipeline: Pipeline) -> None:
    chain, noise = pipeline.recipe["chain"], pipeline.recipe["noise"]
    if "gaussian-marginals" not in type(chain).provides or "corruption-operator" in type(noise).provides:
        raise FundiffError(
            "distill needs x_t = alpha x0 + sigma eps (a chain providing 'gaussian-marginals' and additive noise); "
            f"this run has chain '{pipeline.recipe.names['chain']}' and noise '{pipeline.recipe.names['noise']}'"
        )


def _output_recipe(teacher: Pipeline, steps: int, sampler: str | None, registry):
    data = teacher.recipe.to_dict()
    section = dict(data["sampler"]) if isinstance(data["sampler"], dict) else {"name": data["sampler"]}
    if sampler is not None and sampler != section.get("name"):
        section = {"name": sampler}
    section["steps"] = steps
    data["sampler"] = section
    return load_recipe(data, registry)


def _write_student(teacher: Pipeline, model: torch.nn.Module, steps: int, sampler, registry, out_dir: str) -> Pipeline:
    out = Pipeline(_output_recipe(teacher, steps, sampler, registry), device=teacher.device)
    out.model.load_state_dict(model.state_dict())
    if out.ema_model is not None:
        out.ema_model.load_state_dict(model.state_dict())
    if out.weighting_module is not None and teacher.weighting_module is not None:
        out.weighting_module.load_state_dict(teacher.weighting_module.state_dict())
    if out.schedule_module is not None and teacher.schedule_module is not None:
        out.schedule_module.load_state_dict(teacher.schedule_module.state_dict())
    out.step = teacher.step
    out.run_dir = out_dir
    _write_run_files(out_dir, out.recipe)
    _save(out, None, out_dir)
    return out


def _quality(pipeline: Pipeline, samples: int, steps: int | None = None) -> float:
    """Sliced Wasserstein distance between ``samples`` samples (seed 0) and as many data points."""
    x, _ = pipeline.sample(samples, seed=0, use_ema=True, steps=steps)
    data = pipeline.data.x
    pick = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))[: x.shape[0]]
    return sliced_wasserstein(x[: pick.numel()], data[pick])


def _train(student, steps: int, lr: float, pipeline: Pipeline, loss_of: Callable[[int], torch.Tensor]) -> float:
    options = pipeline.recipe.train
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=options.betas, weight_decay=options.weight_decay)
    student.train()
    total = 0.0
    for step in range(steps):
        loss = loss_of(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), options.grad_clip)
        optimizer.step()
        total += float(loss.detach())
    student.eval()
    return total / max(steps, 1)


def _progressive_round(teacher_model, student, pipeline: Pipeline, steps: int, train_steps: int, lr: float, seed: int, offset: int) -> float:
    """One round of Salimans and Ho's Algorithm 2: the student (``steps`` steps) matches two
    teacher steps (``2 * steps``) in one."""
    fine, coarse = pipeline.levels(2 * steps), pipeline.levels(steps)
    for i, level in enumerate(coarse):
        if not math.isclose(fine[2 * i].logsnr, level.logsnr, rel_tol=1e-9, abs_tol=1e-9) and not (level.is_clean and fine[2 * i].is_clean):
            raise FundiffError(
                f"progressive distillation needs the {steps}-step grid to be every other level of the {2 * steps}-step grid, "
                f"but level {i} differs (logSNR {level.logsnr:.6g} vs {fine[2 * i].logsnr:.6g}); the spacing does not nest"
            )
    predict = _predictor(pipeline)
    data, spec = pipeline.data, pipeline.spec
    batch = pipeline.recipe.train.batch_size
    positions = torch.arange(batch)
    device = pipeline.device

    def loss_of(step: int) -> torch.Tensor:
        draw = offset + step
        index = (rng.uniform(seed, rng.STREAM_TRAIN_DATA, draw, positions) * data.x.shape[0]).long()
        x0 = data.x[index].to(device)
        cond = data.labels[index].to(device) if pipeline.uses_labels and data.labels is not None else None
        i = (rng.uniform(seed, rng.STREAM_TRAIN_LEVEL, draw, positions) * steps).long().clamp(max=steps - 1)
        stream = rng.NoiseStream(seed, positions, spec.shape, stream=rng.STREAM_TRAIN_NOISE, device=device, dtype=x0.dtype)
        eps = pipeline.noise.sample(stream, draw)
        lam_t, a_t, s_t = _columns(fine, 2 * i, x0.ndim, device, x0.dtype)
        lam_m, a_m, s_m = _columns(fine, 2 * i + 1, x0.ndim, device, x0.dtype)
        _, a_e, s_e = _columns(fine, 2 * i + 2, x0.ndim, device, x0.dtype)
        x_t = pipeline.chain.perturb(x0, eps, a_t, s_t)
        with torch.no_grad():  # two deterministic first-order teacher steps t -> t' -> t''
            x0_1 = predict(teacher_model, x_t, lam_t, a_t, s_t, cond)
            x_m = first_order_step(x_t, x0_1, a_t, s_t, a_m, s_m)
            x0_2 = predict(teacher_model, x_m, lam_m, a_m, s_m, cond)
            x_e = first_order_step(x_m, x0_2, a_m, s_m, a_e, s_e)
            target = x0_for_step(x_t, x_e, a_t, s_t, a_e, s_e)  # one step t -> t'' that lands on x_e
        x0_hat = predict(student, x_t, lam_t, a_t, s_t, cond)
        weight = torch.exp(lam_t.to(torch.float64)).clamp(min=1.0).to(x0.dtype)  # truncated SNR: max(SNR, 1)
        return (weight * ((x0_hat - target) ** 2).flatten(1).mean(1)).mean()

    return _train(student, train_steps, lr, pipeline, loss_of)


def _one_step(teacher: Pipeline, student, train_steps: int, lr: float, pairs: int, seed: int) -> float:
    """Luhman and Luhman: regress the teacher's deterministic samples from their prior noise."""
    first, single = teacher.levels()[0], teacher.levels(1)
    if not math.isclose(first.logsnr, single[0].logsnr, rel_tol=1e-9, abs_tol=1e-9):
        raise FundiffError(
            f"one-step distillation needs the 1-step grid to start where the teacher's does (logSNR {single[0].logsnr:.6g} "
            f"vs {first.logsnr:.6g})"
        )
    targets, labels = teacher.sample(pairs, seed=seed, use_ema=True)
    ids = torch.arange(pairs)
    device = teacher.device
    prior = rng.NoiseStream(seed, ids, teacher.spec.shape, stream=rng.STREAM_PRIOR, device=device, dtype=torch.float32)
    x_T = teacher.chain.prior(first, teacher.noise.sample(prior, 0))
    targets = targets.to(device)
    labels = labels.to(device) if labels is not None else None
    predict = _predictor(teacher)
    batch = teacher.recipe.train.batch_size
    positions = torch.arange(batch)

    def loss_of(step: int) -> torch.Tensor:
        index = (rng.uniform(seed, rng.STREAM_TRAIN_DATA, step, positions) * pairs).long().to(device)
        x = x_T[index]
        lam, a, s = _columns([first], torch.zeros(batch, dtype=torch.long), x.ndim, device, x.dtype)
        x0_hat = predict(student, x, lam, a, s, labels[index] if labels is not None else None)
        return ((x0_hat - targets[index]) ** 2).flatten(1).mean(1).mean()

    return _train(student, train_steps, lr, teacher, loss_of)


def distill(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    method: str = "progressive",
    rounds: int = 1,
    steps_per_round: int = 1000,
    sampler: str | None = None,
    lr: float | None = None,
    pairs: int = 4096,
    eval_samples: int = 1000,
    quiet: bool = False,
    registry: Registry | None = None,
) -> list[dict[str, Any]]:
    """Distill the run in ``run_dir`` into a new run directory ``out_dir``; returns the report
    (one dict per round, also written to ``out_dir/distill.jsonl``).

    ``progressive``: ``rounds`` halvings starting from the run's ``sampler.steps`` (which must
    be divisible by 2**rounds), ``steps_per_round`` optimizer steps each. ``one-step``:
    ``steps_per_round`` optimizer steps on ``pairs`` teacher samples drawn with seed
    ``sample.seed + 1`` (so that samples with the run's seed are held out). ``sampler``: the
    output recipe's sampler (default the run's own; it should be the deterministic
    first-order one the student was distilled for). Batch size, betas, weight decay and
    gradient clipping come from the run's ``train`` section; ``lr`` defaults to its ``train.lr``.
    Quality: sliced Wasserstein distance of ``eval_samples`` samples (seed 0) to the data, of
    the student (``sliced_wasserstein``) and of the undistilled run sampled with the student's
    steps (``run_sliced_wasserstein``).
    """
    if method not in METHODS:
        raise FundiffError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
    if rounds < 1 or steps_per_round < 1 or pairs < 1 or eval_samples < 1:
        raise FundiffError("distill: rounds, steps per round, pairs and evaluation samples must be >= 1")
    out_dir = os.fspath(out_dir)
    if os.path.exists(os.path.join(out_dir, CHECKPOINT_FILE)):
        raise FundiffError(f"{out_dir} already holds a run; choose another --out")
    teacher = load_run(run_dir, registry=registry)
    if not teacher.trainable:
        raise FundiffError(f"{run_dir}: the denoiser '{teacher.recipe.names['denoiser']}' has no parameters to distill")
    _check_gaussian(teacher)
    _output_recipe(teacher, 1, sampler, registry)  # an unknown --sampler fails here, before training
    lr = teacher.recipe.train.lr if lr is None else lr
    seed = teacher.recipe.train.seed + 1  # training draws distinct from the run's own
    model = copy.deepcopy(teacher.sampling_model(use_ema=True)).requires_grad_(False).eval()
    report: list[dict[str, Any]] = []
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, DISTILL_FILE)
    atomic_write_text(log_path, "")

    def record(entry: dict[str, Any]) -> None:
        report.append(entry)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        if not quiet:
            print(
                f"distill {entry['method']} round {entry['round']}: {entry['teacher_steps']} -> {entry['steps']} steps, "
                f"loss {entry['loss']:.4g}, sliced Wasserstein to data {entry['sliced_wasserstein']:.4f} "
                f"(the undistilled run at {entry['steps']} steps: {entry['run_sliced_wasserstein']:.4f})",
                file=sys.stderr,
            )

    started = time.perf_counter()
    if method == "progressive":
        steps = teacher.sampler.steps
        if steps % (2**rounds):
            raise FundiffError(f"{rounds} progressive rounds halve the run's {steps} steps {rounds} times: steps must be divisible by {2**rounds}")
        for k in range(1, rounds + 1):
            steps //= 2
            student = copy.deepcopy(model).requires_grad_(True)
            loss = _progressive_round(model, student, teacher, steps, steps_per_round, lr, seed, (k - 1) * steps_per_round)
            model = student.requires_grad_(False)
            out = _write_student(teacher, model, steps, sampler, registry, out_dir)
            record({"method": method, "round": k, "teacher_steps": 2 * steps, "steps": steps, "loss": loss,
                    "sliced_wasserstein": _quality(out, eval_samples),
                    "run_sliced_wasserstein": _quality(teacher, eval_samples, steps), "seconds": round(time.perf_counter() - started, 3)})
    else:
        student = copy.deepcopy(model).requires_grad_(True)
        loss = _one_step(teacher, student, steps_per_round, lr, pairs, teacher.recipe.sample.seed + 1)
        out = _write_student(teacher, student.requires_grad_(False), 1, sampler, registry, out_dir)
        record({"method": method, "round": 1, "teacher_steps": teacher.sampler.steps, "steps": 1, "loss": loss,
                "sliced_wasserstein": _quality(out, eval_samples),
                "run_sliced_wasserstein": _quality(teacher, eval_samples, 1), "seconds": round(time.perf_counter() - started, 3)})
    return report
