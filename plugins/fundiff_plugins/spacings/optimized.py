"""Optimized step selection: the K levels out of a fine grid that minimise a summed per-step
cost, found by dynamic programming (Watson et al. 2021, "Learning to efficiently sample from
diffusion probabilistic models", sec. 3-4: the ELBO decomposes into per-step terms
L(s, t), so the best K-step path through N candidate levels is a shortest path, found
exactly in O(K N^2)).

Candidates: the N + 1 levels of the uniform spacing with N = ``grid`` steps (t = 1 - i/N,
then clean); a K-step path starts at the first and ends at the clean level. So when K
divides N the uniform K-step grid is one of the paths, and the optimum is never worse than
it by this cost.

The per-step cost replaces Watson's ELBO term by a local error one can measure for any
deterministic sampler: with a fine reference trajectory x_0, ..., x_N (DDIM, eta = 0, with
``substeps`` steps per grid interval, from the prior; ``batch`` samples), the cost of a step
i -> k is the root-mean-square difference between one DDIM step from x_i to level k and the
reference x_k, transported to the clean level:

    C(i, k) = sqrt(mean_{b,d} w_{k,d} (DDIM_{i->k}(x_i) - x_k)^2),   w_{k,d} = Var(x_N,d) / Var(x_k,d).

w is how the probability-flow map from level k to data scales a perturbation when the data
are Gaussian (per dimension, x0 ~ N(m, s^2): x_k has variance alpha^2 s^2 + sigma^2 and the
map is affine with slope s / sqrt(alpha^2 s^2 + sigma^2)), so C(i, k) is the step's error as
it reaches the sample, and the summed cost bounds the global error by the triangle
inequality under that linearisation. The variances are the reference batch's own.

The table needs the model, so it is measured in ``prepare(pipeline, cache_dir)`` (one
reference trajectory: N * substeps denoiser calls on ``batch`` samples) and stored in the run
directory as ``spacing-optimized-<key>.safetensors``; the key hashes the recipe (model part),
the model's and a learned schedule's weights, the guidance, ``sample.use_ema`` /
``sample.label``, these parameters and the candidate grid, so a retrained model is measured
again. Called without a pipeline (``levels`` alone), the table is computed for unit-variance
Gaussian data with its exact denoiser, a model-free stand-in.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Sequence

import attrs
import torch

from fundiff import FundiffError, Level, Spacing, hookimpl, rng
from fundiff.components import GAUSSIAN_MARGINALS
from fundiff.config import at_least, doc

from ._grid import check_steps

CACHE_PREFIX = "spacing-optimized-"


def _noise_levels(schedule, chain, steps):
    from fundiff.pipeline import noise_levels

    return noise_levels(schedule, chain, steps)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, s: Level, t: Level) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0) from level s to level t."""
    eps = (x - s.alpha * x0) / s.sigma
    return t.alpha * x0 + t.sigma * eps


def cost_table(denoise: Callable[[torch.Tensor, Level], torch.Tensor], x: torch.Tensor, fine: Sequence[Level], substeps: int) -> torch.Tensor:
    """The (N + 1, N + 1) float64 table C(i, k) (inf where k <= i) from a reference DDIM run.

    ``fine`` holds N * substeps + 1 levels (the last clean); grid level i is fine[i * substeps];
    ``x`` is the batch at fine[0]. Calls ``denoise`` N * substeps times."""
    n = (len(fine) - 1) // substeps
    states, x0s = [], []
    for j in range(len(fine) - 1):
        x0 = denoise(x, fine[j])
        if j % substeps == 0:
            states.append(x.reshape(x.shape[0], -1).to(torch.float64))
            x0s.append(x0.reshape(x.shape[0], -1).to(torch.float64))
        x = ddim_step(x, x0, fine[j], fine[j + 1])
    states.append(x.reshape(x.shape[0], -1).to(torch.float64))
    grid = [fine[i * substeps] for i in range(n + 1)]
    ref = torch.stack(states)  # (N + 1, B, D)
    var = ref.var(1)  # (N + 1, D)
    weight = var[n] / var.clamp_min(torch.finfo(torch.float64).tiny)
    weight[n] = 1.0
    alpha = torch.tensor([lvl.alpha for lvl in grid], dtype=torch.float64, device=ref.device)
    sigma = torch.tensor([lvl.sigma for lvl in grid], dtype=torch.float64, device=ref.device)
    cost = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
    for i in range(n):
        eps = (states[i] - grid[i].alpha * x0s[i]) / grid[i].sigma
        jump = alpha[i + 1 :, None, None] * x0s[i] + sigma[i + 1 :, None, None] * eps  # (N - i, B, D)
        err2 = (jump - ref[i + 1 :]) ** 2 * weight[i + 1 :, None, :]
        cost[i, i + 1 :] = err2.mean((1, 2)).sqrt().cpu()
    return cost


def best_path(cost: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """Indices 0 = i_0 < ... < i_steps = N minimising sum C(i_j, i_{j+1}) (exact DP) and the minimum."""
    n = cost.shape[0] - 1
    if not 1 <= steps <= n:
        raise ValueError(f"spacing 'optimized': steps must be in [1, {n}] (the candidate grid), got {steps}")
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps):
        total = best[:, None] + cost  # (from, to)
        best, arg = total.min(0)
        back.append(arg)
    path = [n]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1], float(best[n])


def path_cost(cost: torch.Tensor, path: Sequence[int]) -> float:
    return float(sum(cost[a, b] for a, b in zip(path, path[1:])))


class PreparedOptimized(Spacing):
    """An ``optimized`` spacing with its measured cost table (what ``prepare`` returns)."""

    def __init__(self, spacing: "Optimized", grid_logsnrs: list[float], cost: torch.Tensor):
        self.spacing = spacing
        self.grid_logsnrs = grid_logsnrs
        self.cost = cost

    def levels(self, schedule, chain, steps):
        check_steps("optimized", steps, self.spacing.grid, f"grid = {self.spacing.grid} candidate steps")
        grid = _noise_levels(schedule, chain, self.spacing.grid)
        if [lvl.logsnr for lvl in grid] != self.grid_logsnrs:
            raise ValueError("spacing 'optimized': the cost table was measured on another schedule's grid; prepare it again")
        path, _ = best_path(self.cost, steps)
        return [grid[i] for i in path]


@attrs.frozen(kw_only=True)
class Optimized(Spacing):
    """K of N candidate levels chosen by DP to minimise the summed transported local DDIM error."""

    # the cost table is measured with DDIM steps, x_t = alpha x0 + sigma eps
    requires = frozenset({GAUSSIAN_MARGINALS})

    grid: int = attrs.field(default=100, validator=at_least(2), metadata=doc("N: candidates are the uniform spacing's N + 1 levels"))
    substeps: int = attrs.field(default=4, validator=at_least(1), metadata=doc("reference DDIM steps per candidate interval"))
    batch: int = attrs.field(default=128, validator=at_least(2), metadata=doc("calibration samples of the reference trajectory"))
    seed: int = attrs.field(default=0, validator=at_least(0), metadata=doc("seed of the calibration samples' prior noise"))

    # ------------------------------------------------------------ model-free stand-in

    def gaussian_table(self, schedule, chain) -> torch.Tensor:
        """The table for x0 ~ N(0, 1) per dimension with its exact denoiser alpha x / (alpha^2 + sigma^2)."""
        fine = _noise_levels(schedule, chain, self.grid * self.substeps)
        z = rng.normal(self.seed, rng.STREAM_PRIOR, 0, torch.arange(self.batch), (1,))
        x = math.sqrt(fine[0].alpha ** 2 + fine[0].sigma ** 2) * z  # the exact marginal at the first level
        return cost_table(lambda x, lvl: lvl.alpha * x / (lvl.alpha**2 + lvl.sigma**2), x, fine, self.substeps)

    def levels(self, schedule, chain, steps):
        check_steps("optimized", steps, self.grid, f"grid = {self.grid} candidate steps")
        grid = _noise_levels(schedule, chain, self.grid)
        try:
            cost = _cached_gaussian_table(self, schedule, chain)
        except TypeError:  # an unhashable schedule or chain
            cost = self.gaussian_table(schedule, chain)
        return PreparedOptimized(self, [lvl.logsnr for lvl in grid], cost).levels(schedule, chain, steps)

    # ------------------------------------------------------------ with the model

    def cache_key(self, pipeline, grid_logsnrs: list[float]) -> str:
        options = pipeline.recipe.sample
        settings = {
            "guidance": pipeline.recipe.to_dict().get("guidance"),
            "use_ema": options.use_ema,
            "label": options.label,
            "spacing": attrs.asdict(self),
            "grid": grid_logsnrs,
        }
        return pipeline.cache_key(settings)

    @torch.no_grad()
    def measure(self, pipeline) -> torch.Tensor:
        """The cost table of ``pipeline``'s sampling denoiser (N * substeps model calls)."""
        from fundiff.pipeline import make_denoise

        options = pipeline.recipe.sample
        model = pipeline.sampling_model(options.use_ema)
        model.eval()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)
        fine = _noise_levels(pipeline.schedule, pipeline.chain, self.grid * self.substeps)
        ids = torch.arange(self.batch)
        stream = rng.NoiseStream(self.seed, ids, pipeline.spec.shape, stream=rng.STREAM_PRIOR, device=pipeline.device, dtype=dtype)
        x = pipeline.chain.prior(fine[0], pipeline.noise.sample(stream, 0))
        cond = pipeline.labels_for(ids, self.seed, options.label)
        denoise = make_denoise(model, pipeline.parameterization, pipeline.guidance, cond)
        return cost_table(denoise, x, fine, self.substeps)

    def prepare(self, pipeline, cache_dir: Optional[str]) -> PreparedOptimized:
        from fundiff.checkpoint import load_checkpoint, save_checkpoint

        grid_logsnrs = [lvl.logsnr for lvl in _noise_levels(pipeline.schedule, pipeline.chain, self.grid)]
        key = self.cache_key(pipeline, grid_logsnrs)
        path = os.path.join(cache_dir, f"{CACHE_PREFIX}{key[:16]}.safetensors") if cache_dir else None
        if path is not None and os.path.exists(path):
            try:
                tensors, metadata = load_checkpoint(path)
                if metadata.get("key") == key and tensors["cost"].shape == (self.grid + 1, self.grid + 1):
                    return PreparedOptimized(self, grid_logsnrs, tensors["cost"].to(torch.float64))
            except (FundiffError, KeyError):
                pass  # unreadable or foreign: measure again
        cost = self.measure(pipeline)
        if path is not None:
            save_checkpoint(path, {"cost": cost}, {"key": key, "grid": str(self.grid), "substeps": str(self.substeps)})
        return PreparedOptimized(self, grid_logsnrs, cost)


@functools.lru_cache(maxsize=16)
def _cached_gaussian_table(spacing: Optimized, schedule, chain) -> torch.Tensor:
    return spacing.gaussian_table(schedule, chain)


@hookimpl
def fundiff_register_spacings(register):
    register("optimized", Optimized)
