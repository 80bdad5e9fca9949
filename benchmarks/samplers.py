#!/usr/bin/env python
"""Sampler benchmarks: accuracy against NFE with the exact GMM denoiser, and loop overhead.

Every number this script prints is measured when it runs; nothing is tabulated by hand.

1. Accuracy. Each registered sampler (discovered from the registry, so a new sampler joins
   automatically) runs with the exact ``gmm-oracle`` denoiser -- no training -- on two
   Gaussian mixtures (the default 2-D ring and a 64-D mixture of 16 modes at random),
   chain ``vp``, schedules ``cosine`` and ``linear``, parameterization ``eps``, guidance
   ``none``, at NFE 5, 10, 20, 50. All samplers start from the same per-sample prior noise
   (``NoiseStream(seed, ids, shape, stream=STREAM_PRIOR).normal(0)``). Two metrics:

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

2. Loop overhead: median wall time per step of ``sampler.sample`` with a denoiser that
   costs nothing (``lambda x, level: x``), at batch 1 and batch 64 (2-D points).

Usage::

    python benchmarks/samplers.py --quick            # < 30 s on 2 cores
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
from fundiff import pipeline as fundiff_pipeline
from fundiff import rng
from fundiff.pipeline import make_denoise, noise_levels

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


class Report:
    """Collects sections; prints them as plain text as they come and renders markdown."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))
        print(f"\n== {text} ==", flush=True)

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))
        print(text, flush=True)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
        self.blocks.append(("table", (title, list(header), [list(r) for r in rows])))
        if title:
            print(f"\n{title}")
        print(format_text_table(header, rows), flush=True)

    def markdown(self, preamble: str) -> str:
        out = [preamble.rstrip(), ""]
        for kind, payload in self.blocks:
            if kind == "heading":
                out += [f"### {payload}", ""]
            elif kind == "note":
                out += [payload, ""]
            else:
                title, header, rows = payload
                if title:
                    out += [f"**{title}**", ""]
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
                out += ["| " + " | ".join(row) + " |" for row in rows]
                out.append("")
        return "\n".join(out) + "\n"


def format_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


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
    evals_per_step: float  # declared (class attribute) or 1
    declared: bool
    deterministic: bool = True


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
        declared = next((getattr(type(sampler), a) for a in EVALS_PER_STEP_ATTRS if hasattr(type(sampler), a)), None)
        info = SamplerInfo(name, sampler, float(declared) if declared else 1.0, declared is not None)
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


def steps_for(info: SamplerInfo, nfe: int) -> int:
    return max(1, round(nfe / info.evals_per_step))


@torch.no_grad()
def run_sampler(
    info: SamplerInfo, problem: Problem, steps: int, n: int, dtype: torch.dtype, noise_seed: int = PRIOR_SEED
) -> tuple[torch.Tensor, int]:
    """Samples 0 .. n-1 from the shared prior; returns (float64 samples, denoiser calls)."""
    sampler = attrs.evolve(info.sampler, steps=steps)
    levels = problem.levels(steps)
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
def reference_solution(problem: Problem, x_init: torch.Tensor, n_steps: int) -> torch.Tensor:
    """The probability-flow ODE from the first level to clean data, float64, classical RK4.

    With y = x / alpha and rho = lambda / 2 the PF ODE of a Gaussian chain is
    dy/drho = D(alpha y, lambda) - y  (d(x/sigma)/d(alpha/sigma) = D, the form DDIM solves
    exactly for constant D). RK4 runs on a uniform rho grid up to lambda = 30; the final
    jump x0 = D(x) at lambda = 30 differs from the limit by O(exp(-30) / std^2).
    """
    chain = problem.chain
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


def accuracy(registry: fundiff.Registry, report: Report, cfg: argparse.Namespace) -> None:
    notes: list[str] = []
    samplers: Optional[list[SamplerInfo]] = None
    report.heading("1. Sampler error against NFE (exact gmm-oracle denoiser, no training)")
    report.note(
        "Setup: chain vp, parameterization eps, guidance none, noise gaussian, levels from "
        "fundiff.noise_levels (uniform in t); samplers run in float32 (as Pipeline.sample does), "
        f"all from the same prior noise (seed {PRIOR_SEED}, STREAM_PRIOR); stochastic samplers draw fresh "
        f"noise from STREAM_SAMPLER, seed {PRIOR_SEED}. "
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
    for mixture, description, params, sizes in MIXTURES:
        n_sw = sizes[1] if cfg.quick else sizes[0]
        err_rows: list[list[str]] = []
        sw_rows: list[list[str]] = []
        floor_row: Optional[list[str]] = None
        for schedule_name in SCHEDULES:
            t0 = time.perf_counter()
            problem = build_problem(registry, mixture, params, schedule_name, n_sw)
            if samplers is None:
                samplers = discover_samplers(registry, problem, notes)
                for line in notes:
                    report.note(line)
                report.note(
                    "Samplers: "
                    + ", ".join(
                        f"{s.name} ({'deterministic' if s.deterministic else 'stochastic'}, "
                        f"{s.evals_per_step:g} eval/step{' declared' if s.declared else ' assumed'})"
                        for s in samplers
                    )
                )
            exact, _ = problem.data.draw(n_sw, EXACT_SEED)
            directions = projections(math.prod(problem.shape), cfg.projections)
            floors = sorted(sliced_w2(exact, problem.data.draw(n_sw, FLOOR_SEED + k)[0], directions) for k in range(FLOOR_PAIRS))
            floor_text = f"{fmt(statistics.median(floors))} [{fmt(floors[0], 2)}, {fmt(floors[-1], 2)}]"
            floor_row = ["exact vs exact (floor)", "-", floor_text] + ["same"] * (len(NFES) - 1)

            x_init = problem.prior64[: cfg.n_ref]
            ref_n = reference_solution(problem, x_init, cfg.ref_steps)
            ref = reference_solution(problem, x_init, 2 * cfg.ref_steps)
            self_diff = rms_error(ref_n, ref)
            lam0 = problem.levels(1)[0].logsnr
            smallest = math.inf

            for info in samplers:
                errors: dict[int, float] = {}
                medians: dict[int, float] = {}
                sws: list[str] = []
                errs: list[str] = []
                for nfe in NFES:
                    steps = steps_for(info, nfe)
                    try:
                        x, calls = run_sampler(info, problem, steps, n_sw, torch.float32)
                    except Exception as exc:  # noqa: BLE001
                        report.note(f"{info.name} failed at {steps} steps on {mixture}/{schedule_name}: {exc}")
                        sws.append("failed")
                        errs.append("failed")
                        continue
                    tag = "" if calls == nfe else f" (NFE {calls})"
                    if not torch.isfinite(x).all():
                        sws.append("non-finite" + tag)
                        errs.append("non-finite" + tag)
                        continue
                    sws.append(fmt(sliced_w2(x, exact, directions)) + tag)
                    if info.deterministic:
                        errors[nfe] = rms_error(x[: cfg.n_ref], ref)
                        medians[nfe] = median_error(x[: cfg.n_ref], ref)
                        smallest = min(smallest, medians[nfe])
                        errs.append(f"{fmt(errors[nfe], 2)} / {fmt(medians[nfe], 2)}{tag}")
                sw_rows.append([info.name, schedule_name] + sws)
                if info.deterministic:
                    orders = [observed_order(e, NFES) for e in (errors, medians)]
                    err_rows.append(
                        [info.name, schedule_name] + errs + [" / ".join("-" if o is None else f"{o:.2f}" for o in orders)]
                    )
                    # checks: convergence at high NFE, and float32 rounding at the largest NFE
                    x_hi, calls_hi = run_sampler(info, problem, steps_for(info, cfg.nfe_hi), cfg.n_ref, torch.float32)
                    x32, _ = run_sampler(info, problem, steps_for(info, NFES[-1]), cfg.n_ref, torch.float32)
                    x64, _ = run_sampler(info, problem, steps_for(info, NFES[-1]), cfg.n_ref, torch.float64)
                    x64_hi, _ = run_sampler(info, problem, steps_for(info, cfg.nfe_hi), cfg.n_ref, torch.float64)
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
            title=f"(b) Sliced W2 to exact samples, {mixture}, n = {n_sw} (all samplers; floor = exact vs exact, median [min, max])",
        )
    report.table(
        ["mixture", "schedule", "start logSNR", "RK4 steps N / 2N", "RMS(ref_N - ref_2N)", "smallest median error in (a)", "ratio"],
        checks_ref,
        title="Check: self-convergence of the reference (ratio must be << 1)",
    )
    report.table(
        ["sampler", "mixture", "schedule", "NFE", "RMS fp32", "median fp32", "max fp32", "RMS fp64", f"RMS fp32 vs fp64 @ NFE {NFES[-1]}"],
        checks_det,
        title=f"Check: deterministic samplers converge to the reference at high NFE, and float32 rounding is below "
        "the errors reported",
    )


def overhead(registry: fundiff.Registry, report: Report, cfg: argparse.Namespace) -> None:
    report.heading("2. Sampling-loop overhead per step (denoiser costs nothing: lambda x, level: x)")
    report.note(
        f"2-D points, float32, CPU, {cfg.overhead_steps} steps per call (cosine levels, vp chain), "
        f"{cfg.overhead_reps} timed calls after one warm-up call; median (and min) wall time per step in microseconds. "
        "Stochastic samplers include drawing their fresh noise from the per-sample Philox stream."
    )
    chain = registry.build("chain", "vp")
    schedule = registry.build("schedule", "cosine")
    noise_type = registry.build("noise", "gaussian")
    levels = noise_levels(schedule, chain, cfg.overhead_steps)
    rows = []
    batches = (1, 64)

    def identity(x, level):
        return x

    for name in registry.names("sampler"):
        try:
            sampler = registry.build("sampler", name)
        except Exception as exc:  # noqa: BLE001
            report.note(f"skipped sampler '{name}': failed to build ({type(exc).__name__}: {exc})")
            continue
        sampler = attrs.evolve(sampler, steps=cfg.overhead_steps)
        row = [name]
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
        rows.append(row)
    # context: the cost of one fresh-noise draw and of one trivial tensor op
    context = []
    for batch in batches:
        stream = rng.NoiseStream(PRIOR_SEED, torch.arange(batch), (2,), stream=rng.STREAM_SAMPLER)
        x = torch.zeros(batch, 2)
        context.append((timeit(lambda: stream.normal(0), cfg.overhead_reps * 20), timeit(lambda: 0.5 * x, cfg.overhead_reps * 200)))
    rows.append(["(one NoiseStream.normal(draw))"] + [f"{c[0]:.1f}" for c in context])
    rows.append(["(one scalar * tensor op)"] + [f"{c[1]:.2f}" for c in context])
    report.table(["sampler", "batch 1: us/step median (min)", "batch 64: us/step median (min)"], rows)


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
        f"load average at start: {load_average()}",
    ]


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, reference steps and repetitions (< 30 s)")
    parser.add_argument("--out", metavar="FILE", help="also write the results as markdown to FILE")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable timings)")
    parser.add_argument("--only", choices=("accuracy", "overhead"), help="run one part only")
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
    if cfg.only in (None, "accuracy"):
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
