#!/usr/bin/env python
"""Schedule benchmark: what each noise schedule does to sample quality, with no training.

Every registered schedule (discovered from the registry, built with its defaults, so a new
schedule joins automatically), plus a few named variants, is sampled with deterministic
DDIM (eta = 0) at 10, 20 and 50 steps using the exact ``gmm-oracle`` denoiser on the
``gmm`` data set (8 modes on a ring of radius 2, std 0.15, 2-D):

* chain ``vp`` for every schedule: logSNR is the currency, so schedules written for the
  variance-exploding chain (``exponential``, ``edm``) run on VP with the same logSNR values;
* parameterization ``v`` for every schedule (``zero-terminal-snr`` refuses ``eps``; for an
  exact denoiser the parameterization changes only rounding);
* levels from ``fundiff.pipeline.noise_levels``: t = 1, 1 - 1/steps, ..., 1/steps, then clean
  data; sampling in float32 as ``Pipeline.sample`` does, from the same prior noise
  (seed 0, STREAM_PRIOR) for every schedule.

Quality is the sliced Wasserstein-2 distance (fixed random projections) between the n
samples and n exact draws from the mixture (``GaussianMixture.draw``); the floor is the same
distance between those exact draws and further independent exact draws of size n (median
[min, max] over 5 pairs): values inside that band are sampling noise, not schedule error.

Usage::

    python benchmarks/schedules.py                 # n = 20000, about a minute on 2 cores
    python benchmarks/schedules.py --quick         # n = 4000
    python benchmarks/schedules.py --out table.md  # also write the table as markdown
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from typing import Optional

import attrs
import torch

import fundiff
from fundiff import rng
from fundiff.pipeline import make_denoise, noise_levels

STEPS = (10, 20, 50)
PRIOR_SEED = 0
EXACT_SEED = 1000
FLOOR_SEED = 2000
FLOOR_PAIRS = 5
PROJECTION_SEED = 3000
PROJECTION_STREAM = 1002  # a third-party stream id (fundiff.rng: 1000 .. 65535)
DATA = {"modes": 8, "radius": 2.0, "std": 0.15}
# named variants beyond the registered defaults: (label, schedule name, parameters)
VARIANTS = (
    ("edm rho=7", "edm", {"rho": 7.0}),
    ("zero-terminal-snr(cosine)", "zero-terminal-snr", {"base": {"name": "cosine"}}),
    ("shifted(cosine, 64->32)", "shifted", {"base": {"name": "cosine"}, "base_resolution": 64.0, "resolution": 32.0}),
)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 between two equal-size point sets (exact 1-D W2 by sorting)."""
    pa = torch.sort(a.to(torch.float64) @ directions.T, dim=0).values
    pb = torch.sort(b.to(torch.float64) @ directions.T, dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=None, help="samples per run (default 20000, 4000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="n = 4000")
    parser.add_argument("--projections", type=int, default=128, help="SW2 projections")
    parser.add_argument("--out", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 avoids OpenMP spinning)")
    args = parser.parse_args(argv)
    n = args.n or (4000 if args.quick else 20000)
    torch.set_num_threads(args.threads)

    registry = fundiff.Registry.discover()
    data = registry.build("data", "gmm", **DATA)
    chain = registry.build("chain", "vp")
    param = registry.build("parameterization", "v")
    guidance = registry.build("guidance", "none")
    components = {"data": data, "chain": chain, "parameterization": param, "guidance": guidance, "noise": registry.build("noise", "gaussian")}
    model = registry.build("denoiser", "gmm-oracle").build(fundiff.BuildContext(spec=data.spec(), components=dict(components))).eval()
    denoise = make_denoise(model, param, guidance)
    sampler = registry.build("sampler", "ddim", eta=0.0)
    prior = rng.NoiseStream(PRIOR_SEED, torch.arange(n), data.spec().shape, stream=rng.STREAM_PRIOR, dtype=torch.float32).normal(0)

    directions = rng.normal(PROJECTION_SEED, PROJECTION_STREAM, 0, torch.arange(args.projections), (2,))
    directions = directions / directions.norm(dim=1, keepdim=True)
    exact, _ = data.draw(n, EXACT_SEED)
    floors = sorted(sliced_w2(exact, data.draw(n, FLOOR_SEED + k)[0], directions) for k in range(FLOOR_PAIRS))

    cases = [(name, name, {}) for name in registry.names("schedule")] + list(VARIANTS)
    header = ["schedule", "logSNR(1)", "logSNR(1/50)"] + [f"DDIM {s}" for s in STEPS]
    rows: list[list[str]] = []
    notes: list[str] = []
    started = time.perf_counter()
    for label, name, params in cases:
        try:
            schedule = registry.build("schedule", name, **params)
        except Exception as exc:  # noqa: BLE001 - a schedule that does not build is reported, not fatal
            notes.append(f"skipped {label}: {type(exc).__name__}: {exc}")
            continue
        row = [label, f"{schedule.logsnr_at(1.0):.2f}", f"{schedule.logsnr_at(1 / 50):.2f}"]
        for steps in STEPS:
            levels = noise_levels(schedule, chain, steps)
            x = chain.prior(levels[0], prior.clone())
            try:
                out = attrs.evolve(sampler, steps=steps).sample(denoise, x, levels)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{label} failed at {steps} steps: {type(exc).__name__}: {exc}")
                row.append("failed")
                continue
            row.append(fmt(sliced_w2(out, exact, directions)) if torch.isfinite(out).all() else "non-finite")
        rows.append(row)
        print(f"  {label}: {', '.join(row[3:])}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    floor_text = f"{fmt(statistics.median(floors))} [{fmt(floors[0])}, {fmt(floors[-1])}]"
    rows.append(["exact vs exact (floor)", "", "", floor_text, "same", "same"])
    given = list(argv if argv is not None else sys.argv[1:])
    if "--out" in given:  # where the markdown goes does not change the numbers
        del given[given.index("--out") : given.index("--out") + 2]
    command = " ".join(["python benchmarks/schedules.py"] + ([shlex.join(given)] if given else []))
    intro = (
        f"Sliced W2 ({args.projections} projections) of {n} DDIM (eta = 0) samples against {n} exact draws; "
        "gmm-oracle denoiser on gmm (8 modes, ring radius 2, std 0.15), chain vp, parameterization v, float32 sampling, "
        f"levels uniform in t. Floor: median [min, max] over {FLOOR_PAIRS} pairs of exact draws. "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {elapsed:.0f} s; command: `{command}`."
    )
    print(intro)
    print(text_table(header, rows))
    for note in notes:
        print(note)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(intro + "\n\n" + markdown_table(header, rows) + "\n" + "".join(f"\n{note}\n" for note in notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
