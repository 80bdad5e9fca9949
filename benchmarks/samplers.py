#!/usr/bin/env python
"""Sampler benchmarks: accuracy against NFE with the exact GMM denoiser, and loop overhead.

Every number this script prints is measured when it runs; nothing is tabulated by hand.

1. Accuracy. Each registered sampler (discovered from the registry, so a new sampler joins
   automatically) runs with the exact ``gmm-oracle`` denoiser -- no training -- on two
   Gaussian mixtures (the default 2-D ring and a 64-D mixture of 16 modes at random),
   chain ``vp``, schedules ``cosine`` and ``linear``, parameterization ``eps``, guidance
   ``none``, at NFE 5, 10, 20, 50. All samplers start from the same per-sample prior noise
   (``NoiseStream(seed, ids, shape, stream=STREAM_PRIOR).normal(0)``). What ``steps`` means
   differs between samplers (heun: 2 evaluations a step, 1 on the last; dpm-solver:
   ``order``; pc: 1 + corrector_steps; dpm-solver-fast: ``steps`` is the NFE; restart: a
   fixed number of restart evaluations on top), so ``steps`` is chosen by counting the
   denoiser calls of trial runs (``choose_steps``, starting from the declared
   ``evaluations_per_step``): the counted NFE closest to the target, printed where it
   differs. Adaptive samplers (``evaluations_per_step = None`` or rtol/atol fields: ``ode``,
   ``dpm-solver-adaptive``) get a table of their own at their default tolerance. Two metrics:

   a. deterministic samplers: RMS over samples of the per-sample Euclidean error against a
      float64 reference solution of the probability-flow ODE from the same initial noise.
      The reference is classical RK4 on y = x / alpha against rho = logSNR / 2, for which
      the PF ODE reads dy/drho = D(alpha y, lambda) - y (the data-prediction form that DDIM
      integrates exactly when D is held fixed), on a uniform rho grid from the sampler's
      first level to logSNR = 30, followed by the same jump to clean data the samplers make
      (x0 = D(x), exact to O(exp(-30)) there). Its self-convergence (N vs 2N steps) is printed.
   b. every sampler: sliced Wasserstein-2 distance (64 fixed random projections) between the
      samples and exact draws from the mixture, next to the noise floor (the same distance
      between two independent exact draws of the same size).

   c. the issue's accuracy goal at 10 NFE: every deterministic fixed-grid sampler with each
      spacing component (``uniform``, ``karras``, ``logsnr-uniform``, through
      ``registry.build("spacing", name).levels(schedule, chain, steps)``) at the largest
      ``steps`` whose counted NFE is <= 10, against ``dpmpp-2m`` with ``karras``: the ratio of
      errors and whether it is <= 0.5.

2. Loop overhead: median wall time per step of ``sampler.sample`` with a denoiser that
   costs nothing (``lambda x, level: x``), at batch 1 and batch 64 (2-D points); samplers
   with a ``noise`` option also with ``noise=brownian`` (Brownian-tree noise).

Usage::

    python benchmarks/samplers.py --quick            # about 2-3 min on 2 cores (25 samplers)
    python benchmarks/samplers.py --out results.md   # full run, also writes markdown
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import attrs
import torch

import fundiff
from fundiff import _native, rng
from fundiff import pipeline as fundiff_pipeline
from fundiff.pipeline import make_denoise, noise_levels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _report module beside this script
from _report import Report  # noqa: E402

NFES = (5, 10, 20, 50)
PRIOR_SEED = 0  # seed of the initial noise and of stochastic samplers' fresh noise
EXACT_SEED = 1000  # exact draws the samples are compared with
FLOOR_SEED = 2000  # further independent sets of exact draws (the noise floor): seeds 2000, 2001, ...
FLOOR_PAIRS = 5  # the floor is reported as median [min, max] over this many pairs
PROJECTION_SEED = 3000  # the SW projection directions
PROJECTION_STREAM = 1001  # third-party stream id (rng: 1000 .. 65535)
REFERENCE_END_LOGSNR = 30.0  # the RK4 reference integrates up to here, then jumps to clean
EVALS_PER_STEP_ATTRS = ("evaluations_per_step", "evals_per_step", "nfe_per_step")

# (name, description, gmm parameters, SW sample count full / quick): 2-D points are cheap,
# and the SW noise floor of a multi-modal set falls slowly with n (mode weights fluctuate)
MIXTURES = (
    ("ring-2d", "gmm defaults: 8 modes on a ring, radius 2, std 0.15, dim 2", {}, (20000, 4000)),
    ("random-64d", "gmm dim=64 layout=random modes=16 (radius 2, std 0.15)", {"dim": 64, "layout": "random", "modes": 16}, (4000, 1000)),
)
SCHEDULES = ("cosine", "linear")


# --------------------------------------------------------------------------------------
# Output: plain-text and markdown tables
# --------------------------------------------------------------------------------------


def fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}e}"


# --------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------


@attrs.define
class Problem:
    """One mixture under one schedule: components, the exact denoiser and the shared prior."""

    mixture: str
    schedule_name: str
    data: Any
    chain: Any
    schedule: Any
    noise: Any
    components: dict
    denoise: Callable  # denoise(x, level) -> x0 through make_denoise (any dtype)
    shape: tuple
    prior64: torch.Tensor  # (n, *shape) float64 standard normals, STREAM_PRIOR draw 0

    def levels(self, steps: int):
        return noise_levels(self.schedule, self.chain, steps)


def build_problem(registry: fundiff.Registry, mixture: str, data_params: dict, schedule_name: str, n: int) -> Problem:
    data = registry.build("data", "gmm", **data_params)
    components = {
        "data": data,
        "chain": registry.build("chain", "vp"),
        "schedule": registry.build("schedule", schedule_name),
        "noise": registry.build("noise", "gaussian"),
        "parameterization": registry.build("parameterization", "eps"),
        "guidance": registry.build("guidance", "none"),
    }
    denoiser = registry.build("denoiser", "gmm-oracle")
    components["denoiser"] = denoiser
    spec = data.spec()
    model = denoiser.build(fundiff.BuildContext(spec=spec, components=dict(components))).eval()
    denoise = make_denoise(model, components["parameterization"], components["guidance"])
    prior = rng.NoiseStream(PRIOR_SEED, torch.arange(n), spec.shape, stream=rng.STREAM_PRIOR, dtype=torch.float64)
    return Problem(
        mixture=mixture,
        schedule_name=schedule_name,
        data=data,
        chain=components["chain"],
        schedule=components["schedule"],
        noise=components["noise"],
        components=components,
        denoise=denoise,
        shape=tuple(spec.shape),
        prior64=prior.normal(0),
    )


@attrs.define
class SamplerInfo:
    name: str
    sampler: Any
    evals_per_step: float  # declared (evaluations_per_step) or 1: only the first guess of the step search
    declared: bool
    adaptive: bool = False  # NFE set by error control (rtol / atol), not by ``steps``
    deterministic: bool = True


def is_adaptive(sampler: Any) -> bool:
    """Error-controlled: ``evaluations_per_step`` declared as None (``ode``), or rtol and atol
    fields (``dpm-solver-adaptive``, which declares nothing)."""
    for attr in EVALS_PER_STEP_ATTRS:
        if hasattr(type(sampler), attr) and getattr(sampler, attr) is None:
            return True
    names = {f.name for f in attrs.fields(type(sampler))}
    return {"rtol", "atol"} <= names


def discover_samplers(registry: fundiff.Registry, probe: Problem, report_notes: list[str]) -> list[SamplerInfo]:
    """Every registered sampler that builds with default parameters and runs on ``probe``."""
    found = []
    provided = set().union(*(type(c).provides for c in probe.components.values()))
    for name in registry.names("sampler"):
        try:
            sampler = registry.build("sampler", name)
        except Exception as exc:  # noqa: BLE001 - a broken or ambiguous sampler is reported, not fatal
            report_notes.append(f"skipped sampler '{name}': failed to build ({type(exc).__name__}: {exc})")
            continue
        missing = set(type(sampler).requires) - provided
        problems = list(sampler.check_recipe(probe.components)) if hasattr(sampler, "check_recipe") else []
        if missing or problems:
            why = ", ".join(sorted(missing)) if missing else "; ".join(problems)
            report_notes.append(f"skipped sampler '{name}': does not fit the benchmark recipe ({why})")
            continue
        # read on the instance: dpm-solver's and pc's depend on their parameters (order, corrector_steps)
        declared = next((getattr(sampler, a) for a in EVALS_PER_STEP_ATTRS if hasattr(type(sampler), a)), None)
        info = SamplerInfo(name, sampler, float(declared) if declared else 1.0, declared is not None, adaptive=is_adaptive(sampler))
        # deterministic <=> two different fresh-noise streams give bit-identical samples
        try:
            a, _ = run_sampler(info, probe, 3, 8, torch.float64, noise_seed=PRIOR_SEED)
            b, _ = run_sampler(info, probe, 3, 8, torch.float64, noise_seed=PRIOR_SEED + 1)
        except Exception as exc:  # noqa: BLE001
            report_notes.append(f"skipped sampler '{name}': failed to run ({type(exc).__name__}: {exc})")
            continue
        info.deterministic = bool(torch.equal(a, b))
        found.append(info)
    return found


def sampler_noise(noise_type: Any, stream: rng.NoiseStream) -> Any:
    """What samplers receive as ``noise``: as Pipeline.sample builds it.

    Newer cores wrap the per-sample stream with the recipe's noise type
    (``fundiff.pipeline.ComponentNoise``); older ones pass the ``NoiseStream`` itself.
    """
    wrapper = getattr(fundiff_pipeline, "ComponentNoise", None)
    return stream if wrapper is None else wrapper(noise_type, stream)


@torch.no_grad()
def count_nfe(info: SamplerInfo, problem: Problem, steps: int, spacing: Any = None) -> int:
    """Denoiser calls of one run at ``steps`` (one sample: a fixed-grid sampler's count does
    not depend on the state)."""
    return run_sampler(info, problem, steps, 1, torch.float64, spacing=spacing)[1]


_STEPS_CACHE: dict = {}


def choose_steps(info: SamplerInfo, problem: Problem, target: int, spacing: Any = None, at_most: bool = False) -> tuple[int, int]:
    """(steps, counted NFE) with the counted NFE closest to ``target`` (ties: the smaller
    NFE); with ``at_most``, the largest count <= target (None if even steps = 1 exceeds it).

    Each sampler's meaning of ``steps`` differs (heun: 2 evaluations a step but 1 on the
    last; dpm-solver: ``order`` a step; dpm-solver-fast: ``steps`` = NFE; restart: a fixed
    number of restart evaluations on top; a zero-SNR start adds one), so the count is
    measured: a search from steps = target / evaluations_per_step, assuming only that the
    count does not decrease with ``steps``.
    """
    key = (info.name, problem.mixture, problem.schedule_name, repr(spacing), target, at_most)
    if key in _STEPS_CACHE:
        return _STEPS_CACHE[key]
    counts: dict[int, int] = {}

    def nfe(k: int) -> int:
        if k not in counts:
            counts[k] = count_nfe(info, problem, k, spacing)
        return counts[k]

    # smallest k with nfe(k) >= target: bracket from the declared guess, then bisect
    guess = max(1, round(target / info.evals_per_step))
    cap = 4 * target + 8
    if nfe(guess) >= target:
        lo, hi = 0, guess  # nfe(lo) < target (lo = 0: none), nfe(hi) >= target
        while hi - lo > 1 and lo == 0 and hi > 1:
            half = max(1, hi // 2)
            if nfe(half) >= target:
                hi = half
            else:
                lo = half
    else:
        lo, hi = guess, min(cap, 2 * guess)
        while nfe(hi) < target and hi < cap:
            lo, hi = hi, min(cap, 2 * hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if nfe(mid) >= target:
            hi = mid
        else:
            lo = mid
    candidates = [k for k in (lo, hi) if k >= 1]
    if at_most:
        below = [k for k in candidates if nfe(k) <= target]
        best = max(below) if below else None
    else:
        best = min(candidates, key=lambda k: (abs(nfe(k) - target), nfe(k)))
    result = (best, nfe(best)) if best is not None else (None, nfe(1))
    _STEPS_CACHE[key] = result
    return result


@torch.no_grad()
def run_sampler(
    info: SamplerInfo, problem: Problem, steps: int, n: int, dtype: torch.dtype, noise_seed: int = PRIOR_SEED, spacing: Any = None
) -> tuple[torch.Tensor, int]:
    """Samples 0 .. n-1 from the shared prior; returns (float64 samples, denoiser calls).

    ``spacing``: a registered spacing component (``levels(schedule, chain, steps)``); None is
    ``noise_levels``, uniform in t (the same grid as ``uniform``)."""
    sampler = attrs.evolve(info.sampler, steps=steps)
    levels = problem.levels(steps) if spacing is None else spacing.levels(problem.schedule, problem.chain, steps)
    ids = torch.arange(n)
    x = problem.chain.prior(levels[0], problem.prior64[:n].to(dtype))
    noise = sampler_noise(problem.noise, rng.NoiseStream(noise_seed, ids, problem.shape, stream=rng.STREAM_SAMPLER, dtype=dtype))
    calls = 0

    def denoise(x, level):
        nonlocal calls
        calls += 1
        return problem.denoise(x, level)

    out = sampler.sample(denoise, x, levels, noise)
    return out.to(torch.float64), calls


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


@torch.no_grad()
def reference_solution(problem: Problem, x_init: torch.Tensor, n_steps: int, lam0: Optional[float] = None) -> torch.Tensor:
    """The probability-flow ODE from the first level to clean data, float64, classical RK4.

    With y = x / alpha and rho = lambda / 2 the PF ODE of a Gaussian chain is
    dy/drho = D(alpha y, lambda) - y  (d(x/sigma)/d(alpha/sigma) = D, the form DDIM solves
    exactly for constant D). RK4 runs on a uniform rho grid up to lambda = 30; the final
    jump x0 = D(x) at lambda = 30 differs from the limit by O(exp(-30) / std^2).
    """
    chain = problem.chain
    if lam0 is None:
        lam0 = problem.levels(1)[0].logsnr
    rho0, rho1 = lam0 / 2.0, REFERENCE_END_LOGSNR / 2.0
    h = (rho1 - rho0) / n_steps

    def f(y: torch.Tensor, rho: float) -> torch.Tensor:
        level = chain.level(2.0 * rho)
        return problem.denoise(level.alpha * y, level) - y

    start = chain.level(lam0)
    y = chain.prior(start, x_init.to(torch.float64)) / start.alpha
    for k in range(n_steps):
        rho = rho0 + k * h
        k1 = f(y, rho)
        k2 = f(y + 0.5 * h * k1, rho + 0.5 * h)
        k3 = f(y + 0.5 * h * k2, rho + 0.5 * h)
        k4 = f(y + h * k3, rho + h)
        y = y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    end = chain.level(REFERENCE_END_LOGSNR)
    return problem.denoise(end.alpha * y, end)


def median_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over samples of the per-sample Euclidean error (robust to rare mode changes)."""
    return float((x - ref).flatten(1).norm(dim=1).median())


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).flatten(1).norm(dim=1).max())


def rms_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(mean_i ||x_i - ref_i||^2): per-sample Euclidean error, RMS over samples."""
    return float(((x - ref) ** 2).flatten(1).sum(1).mean().sqrt())


def projections(dim: int, count: int) -> torch.Tensor:
    z = rng.normal(PROJECTION_SEED, PROJECTION_STREAM, 0, torch.arange(count), (dim,))
    return z / z.norm(dim=1, keepdim=True)  # (count, dim) unit vectors


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 between two equal-size point sets (exact 1-D W2 by sorting)."""
    pa = torch.sort(a.flatten(1).to(torch.float64) @ directions.T, dim=0).values
    pb = torch.sort(b.flatten(1).to(torch.float64) @ directions.T, dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def observed_order(errors: dict[int, float], nfes: Sequence[int]) -> Optional[float]:
    a, b = nfes[-2], nfes[-1]
    ea, eb = errors.get(a), errors.get(b)
    if not ea or not eb or ea <= 0 or eb <= 0:
        return None
    return math.log(ea / eb) / math.log(b / a)


# --------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------


GOAL_NFE = 10  # the accuracy goal: at 10 NFE, half the error of DPM-Solver++(2M) with Karras steps
GOAL_RATIO = 0.5
GOAL_BASELINE = ("dpmpp-2m", "karras")
#: the goal check tries every registered spacing (a new spacing joins automatically)


def cell(value: str, calls: int, target: int) -> str:
    """A table cell with the counted NFE where it differs from the column's target."""
    return value if calls == target else f"{value} (NFE {calls})"


def accuracy(registry: fundiff.Registry, report: Report, cfg: argparse.Namespace) -> None:
    notes: list[str] = []
    samplers: Optional[list[SamplerInfo]] = None
    report.heading("1. Sampler error against NFE (exact gmm-oracle denoiser, no training)")
    report.note(
        "Setup: chain vp, parameterization eps, guidance none, noise gaussian, levels from "
        "fundiff.noise_levels (uniform in t, the `uniform` spacing); samplers run in float32 (as Pipeline.sample does), "
        f"all from the same prior noise (seed {PRIOR_SEED}, STREAM_PRIOR); stochastic samplers draw fresh "
        f"noise from STREAM_SAMPLER, seed {PRIOR_SEED}. "
        "NFE: each sampler's `steps` is chosen so that the denoiser calls counted in a run come as close as possible "
        "to the column's NFE (ties: fewer); a cell shows (NFE k) where the count differs from the column's. "
        "Adaptive samplers (error control: `ode`, `dpm-solver-adaptive`) choose their own NFE and have their own table. "
        f"ODE error: RMS and median over the first {cfg.n_ref} samples of the per-sample Euclidean error "
        f"||x_i - x_i^ref|| against a float64 RK4 reference ({2 * cfg.ref_steps} steps in logSNR/2); the RMS is "
        "dominated by the few samples near a boundary between modes that the discretisation sends to another mode "
        "(an error of about the distance between modes), the median shows the typical trajectory error. "
        f"SW2: sliced Wasserstein-2, {cfg.projections} fixed projections, n samples vs n exact draws "
        "(GaussianMixture.draw), n given per mixture; floor = SW2 between the exact draws and "
        f"{FLOOR_PAIRS} further independent exact draws of size n, "
        "median [min, max]: differences inside that band are sampling noise, not sampler error."
    )
    checks_ref: list[list[str]] = []
    checks_det: list[list[str]] = []
    adaptive_rows: list[list[str]] = []
    # goal check: errors[(sampler, spacing)][(mixture, schedule)] = (rms, median, calls, steps)
    goal: dict[tuple[str, str], dict[tuple[str, str], tuple[float, float, int, int]]] = {}
    goal_only = cfg.only == "goal"
    problems_done: list[tuple[str, str]] = []
    for mixture, description, params, sizes in MIXTURES:
        n_sw = sizes[1] if cfg.quick else sizes[0]
        err_rows: list[list[str]] = []
        sw_rows: list[list[str]] = []
        floor_row: Optional[list[str]] = None
        for schedule_name in SCHEDULES:
            t0 = time.perf_counter()
            problem = build_problem(registry, mixture, params, schedule_name, n_sw)
            spacings = goal_spacings(registry, problem, params, report)
            if samplers is None:
                samplers = discover_samplers(registry, problem, notes)
                for line in notes:
                    report.note(line)
                report.note(
                    "Samplers: "
                    + ", ".join(
                        f"{s.name} ({'deterministic' if s.deterministic else 'stochastic'}, "
                        + ("adaptive" if s.adaptive else f"{s.evals_per_step:g} eval/step{' declared' if s.declared else ' assumed'}")
                        + ")"
                        for s in samplers
                    )
                )
            x_init = problem.prior64[: cfg.n_ref]
            if goal_only:
                refs = {}
                for info in samplers:
                    if info.deterministic and not info.adaptive:
                        goal_check(info, problem, spacings, refs, x_init, cfg, goal, report, mixture, schedule_name)
                problems_done.append((mixture, schedule_name))
                print(f"   [{mixture} / {schedule_name}: {time.perf_counter() - t0:.1f} s]", flush=True)
                continue
            exact, _ = problem.data.draw(n_sw, EXACT_SEED)
            directions = projections(math.prod(problem.shape), cfg.projections)
            floors = sorted(sliced_w2(exact, problem.data.draw(n_sw, FLOOR_SEED + k)[0], directions) for k in range(FLOOR_PAIRS))
            floor_text = f"{fmt(statistics.median(floors))} [{fmt(floors[0], 2)}, {fmt(floors[-1], 2)}]"
            floor_row = ["exact vs exact (floor)", "-", floor_text] + ["same"] * (len(NFES) - 1)

            lam0 = problem.levels(1)[0].logsnr
            ref_n = reference_solution(problem, x_init, cfg.ref_steps)
            ref = reference_solution(problem, x_init, 2 * cfg.ref_steps)
            refs = {round(lam0, 9): ref}
            self_diff = rms_error(ref_n, ref)
            smallest = math.inf

            for info in samplers:
                if info.adaptive:
                    steps = attrs.fields_dict(type(info.sampler))["steps"].default if "steps" in attrs.fields_dict(type(info.sampler)) else 1
                    try:
                        x, calls = run_sampler(info, problem, steps, n_sw, torch.float32)
                    except Exception as exc:  # noqa: BLE001
                        report.note(f"{info.name} failed on {mixture}/{schedule_name}: {exc}")
                        continue
                    x_ref, calls_ref = run_sampler(info, problem, steps, cfg.n_ref, torch.float32)
                    tol = ", ".join(f"{k} {getattr(info.sampler, k):g}" for k in ("rtol", "atol") if hasattr(info.sampler, k))
                    if info.deterministic:
                        smallest = min(smallest, median_error(x_ref, ref))
                    adaptive_rows.append(
                        [
                            info.name,
                            mixture,
                            schedule_name,
                            tol,
                            f"{calls} / {calls_ref}",
                            f"{fmt(rms_error(x_ref, ref), 2)} / {fmt(median_error(x_ref, ref), 2)}" if info.deterministic else "-",
                            fmt(sliced_w2(x, exact, directions)),
                        ]
                    )
                    continue
                errors: dict[int, float] = {}
                medians: dict[int, float] = {}
                sws: list[str] = []
                errs: list[str] = []
                for nfe in NFES:
                    try:
                        steps, _ = choose_steps(info, problem, nfe)
                        x, calls = run_sampler(info, problem, steps, n_sw, torch.float32)
                    except Exception as exc:  # noqa: BLE001
                        report.note(f"{info.name} failed at NFE {nfe} on {mixture}/{schedule_name}: {exc}")
                        sws.append("failed")
                        errs.append("failed")
                        continue
                    if not torch.isfinite(x).all():
                        sws.append(cell("non-finite", calls, nfe))
                        errs.append(cell("non-finite", calls, nfe))
                        continue
                    sws.append(cell(fmt(sliced_w2(x, exact, directions)), calls, nfe))
                    if info.deterministic:
                        errors[nfe] = rms_error(x[: cfg.n_ref], ref)
                        medians[nfe] = median_error(x[: cfg.n_ref], ref)
                        smallest = min(smallest, medians[nfe])
                        errs.append(cell(f"{fmt(errors[nfe], 2)} / {fmt(medians[nfe], 2)}", calls, nfe))
                sw_rows.append([info.name, schedule_name] + sws)
                if info.deterministic:
                    orders = [observed_order(e, NFES) for e in (errors, medians)]
                    err_rows.append(
                        [info.name, schedule_name] + errs + [" / ".join("-" if o is None else f"{o:.2f}" for o in orders)]
                    )
                    # checks: convergence at high NFE, and float32 rounding at the largest NFE
                    steps_hi, _ = choose_steps(info, problem, cfg.nfe_hi)
                    steps_50, _ = choose_steps(info, problem, NFES[-1])
                    x_hi, calls_hi = run_sampler(info, problem, steps_hi, cfg.n_ref, torch.float32)
                    x32, _ = run_sampler(info, problem, steps_50, cfg.n_ref, torch.float32)
                    x64, _ = run_sampler(info, problem, steps_50, cfg.n_ref, torch.float64)
                    x64_hi, _ = run_sampler(info, problem, steps_hi, cfg.n_ref, torch.float64)
                    checks_det.append(
                        [
                            info.name,
                            mixture,
                            schedule_name,
                            f"{calls_hi}",
                            fmt(rms_error(x_hi, ref)),
                            fmt(median_error(x_hi, ref)),
                            fmt(max_error(x_hi, ref)),
                            fmt(rms_error(x64_hi, ref)),
                            fmt(rms_error(x32, x64)),
                        ]
                    )
                    goal_check(info, problem, spacings, refs, x_init, cfg, goal, report, mixture, schedule_name)
            problems_done.append((mixture, schedule_name))
            checks_ref.append(
                [
                    mixture,
                    schedule_name,
                    f"{lam0:.2f}",
                    f"{cfg.ref_steps} / {2 * cfg.ref_steps}",
                    fmt(self_diff),
                    fmt(smallest if math.isfinite(smallest) else None),
                    fmt(self_diff / smallest) if math.isfinite(smallest) and smallest > 0 else "-",
                ]
            )
            print(f"   [{mixture} / {schedule_name}: {time.perf_counter() - t0:.1f} s]", flush=True)

        if goal_only:
            continue
        nfe_cols = [f"NFE {n}" for n in NFES]
        report.table(
            ["sampler", "schedule"] + nfe_cols + [f"order {NFES[-2]}->{NFES[-1]}"],
            err_rows,
            title=f"(a) ODE error, {mixture}: {description}. Per-sample error vs the float64 PF-ODE reference, "
            "RMS / median over samples (deterministic samplers)",
        )
        report.table(
            ["sampler", "schedule"] + nfe_cols,
            sw_rows + ([floor_row] if floor_row else []),
            title=f"(b) Sliced W2 to exact samples, {mixture}, n = {n_sw} (all fixed-grid samplers; floor = exact vs exact, median [min, max])",
        )
    if goal_only:
        goal_tables(report, goal, problems_done)
        return
    report.table(
        ["sampler", "mixture", "schedule", "tolerance (default)", "NFE counted (SW2 batch / ODE-error batch)", "ODE error RMS / median", "SW2"],
        adaptive_rows,
        title="(c) Adaptive samplers at their default tolerance and default steps (uniform grid): counted NFE, "
        f"ODE error over the first {cfg.n_ref} samples, SW2 as in (b). The error norm runs over the batch, so the NFE depends on the batch",
    )
    goal_tables(report, goal, problems_done)
    report.table(
        ["mixture", "schedule", "start logSNR", "RK4 steps N / 2N", "RMS(ref_N - ref_2N)", "smallest median error in (a), (c)", "ratio"],
        checks_ref,
        title="Check: self-convergence of the reference (ratio must be << 1)",
    )
    report.table(
        ["sampler", "mixture", "schedule", "NFE", "RMS fp32", "median fp32", "max fp32", "RMS fp64", f"RMS fp32 vs fp64 @ NFE {NFES[-1]}"],
        checks_det,
        title="Check: deterministic samplers converge to the reference at high NFE, and float32 rounding is below "
        "the errors reported",
    )


def goal_spacings(registry: fundiff.Registry, problem: Problem, data_params: dict, report: Report) -> dict[str, Any]:
    """Every registered spacing, ready for ``levels``; one that measures the model first
    (``optimized``) is prepared with a pipeline around this problem's exact denoiser."""
    recipe = {
        "data": {"name": "gmm", **data_params},
        "chain": "vp",
        "schedule": problem.schedule_name,
        "noise": "gaussian",
        "denoiser": "gmm-oracle",
        "parameterization": "eps",
        "weighting": "eps-mse",
        "guidance": "none",
        "sampler": {"name": "ddim", "steps": GOAL_NFE},
    }
    pipeline = None
    spacings = {}
    for name in registry.names("spacing"):
        try:
            spacing = registry.build("spacing", name)
            if type(spacing).prepare is not fundiff.Spacing.prepare:
                pipeline = pipeline or fundiff_pipeline.Pipeline(fundiff.load_recipe(recipe, registry))
                spacing = spacing.prepare(pipeline, None)
            spacings[name] = spacing
        except Exception as exc:  # noqa: BLE001
            report.note(f"goal check: spacing '{name}' failed to build ({type(exc).__name__}: {exc})")
    return spacings


def goal_check(info, problem, spacings, refs, x_init, cfg, goal, report, mixture, schedule_name) -> None:
    """Every spacing at the largest ``steps`` whose counted NFE is <= GOAL_NFE; errors against
    the float64 reference from the spacing's own first level."""
    for sp_name, spacing in spacings.items():
        try:
            steps, calls = choose_steps(info, problem, GOAL_NFE, spacing=spacing, at_most=True)
            if steps is None:
                continue
            start = spacing.levels(problem.schedule, problem.chain, steps)[0].logsnr
            key = round(start, 9)
            if key not in refs:
                refs[key] = reference_solution(problem, x_init, 2 * cfg.ref_steps, lam0=start)
            x, calls = run_sampler(info, problem, steps, cfg.n_ref, torch.float32, spacing=spacing)
        except Exception as exc:  # noqa: BLE001
            report.note(f"goal check: {info.name} with spacing {sp_name} failed on {mixture}/{schedule_name}: {exc}")
            continue
        r = refs[key]
        goal.setdefault((info.name, sp_name), {})[(mixture, schedule_name)] = (rms_error(x, r), median_error(x, r), calls, steps)


def goal_tables(report: Report, goal: dict, problems: list[tuple[str, str]]) -> None:
    """The issue's accuracy goal: best (sampler, spacing) at <= GOAL_NFE vs dpmpp-2m + karras."""
    report.heading(f"1b. Accuracy goal at {GOAL_NFE} NFE: best sampler + spacing vs DPM-Solver++(2M) with Karras steps")
    base = goal.get(GOAL_BASELINE)
    report.note(
        "Every deterministic fixed-grid sampler with each registered spacing (built with "
        f"registry.build('spacing', name) and default parameters), `steps` chosen as the largest whose counted NFE is <= {GOAL_NFE}; "
        "samplers whose smallest run costs more are left out. Error: RMS / median over samples of the per-sample error against "
        "the float64 reference from the configuration's own first level (spacings such as trailing start below t = 1). "
        f"Baseline: {GOAL_BASELINE[0]} with {GOAL_BASELINE[1]}. Goal (issue 6): best RMS error <= {GOAL_RATIO} x the baseline's "
        "on each of the benchmark's mixtures (both schedules shown)."
    )
    if not base or any(p not in base for p in problems):
        report.note(f"goal check impossible: baseline {GOAL_BASELINE} missing")
        return
    rows = []
    for (name, sp), per in sorted(goal.items()):
        if any(p not in per for p in problems):
            continue
        ratios = [per[p][0] / base[p][0] for p in problems]
        nfes = sorted({per[p][2] for p in problems})
        rows.append(
            (max(ratios), [name, sp, "/".join(map(str, nfes))] + [f"{fmt(per[p][0], 2)} / {fmt(per[p][1], 2)}" for p in problems] + [f"{max(ratios):.3f}"])
        )
    rows.sort(key=lambda r: r[0])
    report.table(
        ["sampler", "spacing", "NFE"] + [f"{m} {s}: RMS / median" for m, s in problems] + ["worst RMS ratio to baseline"],
        [r[1] for r in rows],
        title=f"All configurations at <= {GOAL_NFE} NFE, sorted by their worst ratio over the four mixture/schedule pairs",
    )
    summary = []
    for p in problems:
        candidates = [(per[p][0], name, sp, per[p]) for (name, sp), per in goal.items() if p in per]
        rms, name, sp, vals = min(candidates)
        ratio = rms / base[p][0]
        ratio_med = vals[1] / base[p][1]
        summary.append(
            [
                p[0],
                p[1],
                f"{fmt(base[p][0], 2)} / {fmt(base[p][1], 2)}",
                f"{name} + {sp} (NFE {vals[2]})",
                f"{fmt(vals[0], 2)} / {fmt(vals[1], 2)}",
                f"{ratio:.3f} / {ratio_med:.3f}",
                "yes" if ratio <= GOAL_RATIO else "no",
            ]
        )
    if rows:
        worst, best_row = rows[0]
        summary.append(["all four", "-", "-", f"{best_row[0]} + {best_row[1]} (one configuration)", "-", f"{worst:.3f} (worst)", "yes" if worst <= GOAL_RATIO else "no"])
    report.table(
        ["mixture", "schedule", f"baseline {GOAL_BASELINE[0]} + {GOAL_BASELINE[1]}: RMS / median", "best configuration", "its RMS / median", "ratio RMS / median", f"goal <= {GOAL_RATIO} met (RMS)"],
        summary,
        title=f"Goal check at {GOAL_NFE} NFE (per mixture and schedule: the best configuration there; last row: the single configuration with the best worst-case ratio)",
    )


def overhead(registry: fundiff.Registry, report: Report, cfg: argparse.Namespace) -> None:
    report.heading("2. Sampling-loop overhead per step (denoiser costs nothing: lambda x, level: x)")
    report.note(
        f"2-D points, float32, CPU, {cfg.overhead_steps} steps per call (cosine levels, vp chain), "
        f"{cfg.overhead_reps} timed calls after one warm-up call; median (and min) wall time per step in microseconds. "
        "Stochastic samplers include drawing their fresh noise from the per-sample Philox stream; samplers with a `noise` "
        "option are also timed with noise=brownian (a per-sample Brownian tree). A step is one interval of the grid; "
        "the denoiser calls per run are counted (adaptive samplers ignore the grid between its ends, so their per-step "
        "figure is per grid interval, not per solver step)."
    )
    chain = registry.build("chain", "vp")
    schedule = registry.build("schedule", "cosine")
    noise_type = registry.build("noise", "gaussian")
    levels = noise_levels(schedule, chain, cfg.overhead_steps)
    rows = []
    batches = (1, 64)

    def identity(x, level):
        return x

    variants = []
    provided = set().union(*(type(c).provides for c in (chain, schedule, noise_type)))
    for name in registry.names("sampler"):
        try:
            sampler = registry.build("sampler", name)
        except Exception as exc:  # noqa: BLE001
            report.note(f"skipped sampler '{name}': failed to build ({type(exc).__name__}: {exc})")
            continue
        missing = set(type(sampler).requires) - provided
        if missing:  # samplers of other chains' states (categorical, manifold, coupled)
            report.note(f"skipped sampler '{name}': needs {', '.join(sorted(missing))}, which this Gaussian setup does not provide")
            continue
        sampler = attrs.evolve(sampler, steps=cfg.overhead_steps)
        variants.append((name, sampler))
        # SDE samplers with a noise option: also with Brownian-tree noise (the goal's <= 200 us case)
        if "noise" in attrs.fields_dict(type(sampler)) and sampler.noise != "brownian":
            try:
                variants.append((f"{name} (noise=brownian)", attrs.evolve(sampler, noise="brownian")))
            except Exception as exc:  # noqa: BLE001
                report.note(f"'{name}' has a noise option but noise=brownian failed to build ({type(exc).__name__}: {exc})")
    for name, sampler in variants:
        row = [name]
        calls = 0
        for batch in batches:
            x = torch.zeros(batch, 2)
            noise = sampler_noise(noise_type, rng.NoiseStream(PRIOR_SEED, torch.arange(batch), (2,), stream=rng.STREAM_SAMPLER))
            try:
                with torch.no_grad():
                    sampler.sample(identity, x, levels, noise)  # warm-up
                    times = []
                    for _ in range(cfg.overhead_reps):
                        t = time.perf_counter()
                        sampler.sample(identity, x, levels, noise)
                        times.append((time.perf_counter() - t) / cfg.overhead_steps * 1e6)
            except Exception as exc:  # noqa: BLE001
                row.append(f"failed: {type(exc).__name__}")
                continue
            row.append(f"{statistics.median(times):.1f} ({min(times):.1f})")
            if batch == batches[0]:
                counter = [0]

                def counted(x, level, counter=counter):
                    counter[0] += 1
                    return x

                with torch.no_grad():
                    sampler.sample(counted, x, levels, noise)
                calls = counter[0]
                row.append(f"{calls}")
        if len(row) < 4:
            row += ["-"] * (4 - len(row))
        rows.append(row)
    # context: the cost of one fresh-noise draw and of one trivial tensor op
    context = []
    for batch in batches:
        stream = rng.NoiseStream(PRIOR_SEED, torch.arange(batch), (2,), stream=rng.STREAM_SAMPLER)
        x = torch.zeros(batch, 2)
        context.append((timeit(lambda: stream.normal(0), cfg.overhead_reps * 20), timeit(lambda: 0.5 * x, cfg.overhead_reps * 200)))
    rows.append(["(one NoiseStream.normal(draw))", f"{context[0][0]:.1f}", "-", f"{context[1][0]:.1f}"])
    rows.append(["(one scalar * tensor op)", f"{context[0][1]:.2f}", "-", f"{context[1][1]:.2f}"])
    report.table(
        ["sampler", "batch 1: us/step median (min)", f"denoiser calls in {cfg.overhead_steps} steps", "batch 64: us/step median (min)"], rows
    )


def timeit(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def machine_description(threads: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return [
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"machine: {os.cpu_count()} CPU cores ({cpu}), no GPU used; torch threads: {threads}",
        f"python {platform.python_version()}, torch {torch.__version__}, fundiff {fundiff.__version__}",
        f"random numbers: {_native.status()}",
        f"load average at start: {load_average()}",
    ]


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, reference steps and repetitions (about 2-3 min)")
    parser.add_argument("--out", metavar="FILE", help="also write the results as markdown to FILE")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable timings)")
    parser.add_argument(
        "--only", choices=("accuracy", "goal", "overhead"), help="run one part only (goal: the 10-NFE accuracy goal table alone)"
    )
    cfg = parser.parse_args(argv)
    if cfg.quick:
        cfg.n_ref, cfg.ref_steps, cfg.nfe_hi, cfg.projections = 128, 150, 200, 64
        cfg.overhead_steps, cfg.overhead_reps = 50, 5
    else:
        cfg.n_ref, cfg.ref_steps, cfg.nfe_hi, cfg.projections = 512, 500, 1000, 64
        cfg.overhead_steps, cfg.overhead_reps = 200, 30
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(__file__)] + list(sys.argv[1:] if argv is None else argv)))
    registry = fundiff.Registry.discover()
    report = Report()
    header = ["fundiff sampler benchmarks" + (" (--quick)" if cfg.quick else "")] + machine_description(cfg.threads)
    header.append(f"command: {command}")
    print("\n".join(header), flush=True)
    for plugin in registry.broken:
        report.note(f"broken plugin (its components are missing): {plugin.qualified}: {plugin.error}")
    if cfg.only in (None, "accuracy", "goal"):
        accuracy(registry, report, cfg)
    if cfg.only in (None, "overhead"):
        overhead(registry, report, cfg)
    elapsed = time.perf_counter() - started
    footer = f"total time {elapsed:.1f} s; load average at end: {load_average()}"
    print("\n" + footer)
    if cfg.out:
        preamble = "\n".join(f"- {line}" for line in header[1:]) + f"\n- {footer}\n"
        with open(cfg.out, "w") as fh:
            fh.write(report.markdown(preamble))
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
