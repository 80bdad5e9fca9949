#!/usr/bin/env python
"""Engine time beyond the denoiser: fundiff's samplers against k-diffusion's, in one run.

The denoiser costs nothing (it returns its input), so everything timed is the sampler's own
work: per-step arithmetic on the state, host-side coefficients, history handling and, for
stochastic samplers, drawing noise. Two regimes:

1. loop overhead at batch 1 (2-D points): the per-step fixed cost in microseconds;
2. a large batch (default 65536 x 64, float32) at 10 NFE: the time of the whole run, which
   is memory traffic on the state, and the ratio fundiff / k-diffusion.

Both libraries walk the same sigma grid (k-diffusion's ``get_sigmas_karras``, rho = 7); fundiff
on the ``ve`` chain, where its levels are exactly k-diffusion's sigmas (the parity tests in
tests/test_parity_kdiffusion.py show the samples agree to 1e-14 in float64). Stochastic
samplers draw their noise as each library does by default: k-diffusion with
``torch.randn_like`` (batch-dependent), fundiff from per-sample Philox streams (sample i the
same whatever the batch) with its compiled generator where it builds (the header says which:
``random numbers: compiled``, else ``numpy (why)``), a different amount of work that the
table shows as it is.

k-diffusion is loaded with ``fundiff.parity.kdiffusion_sampling`` (``pip install --no-deps
k-diffusion``). Usage::

    python benchmarks/engine.py                 # about a minute on 2 cores
    python benchmarks/engine.py --batch 4096 --dim 64 --reps 5
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _report module beside this script

from _report import median_seconds  # noqa: E402

import fundiff  # noqa: E402
from fundiff import _native, rng  # noqa: E402
from fundiff.parity import kdiffusion_sampling  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.02, 80.0

#: (fundiff sampler, its parameters, denoiser calls per step) -> k-diffusion function and kwargs
PAIRS = [
    ("euler", {}, 1, "sample_euler", {}),
    ("heun", {}, 2, "sample_heun", {}),
    ("dpm2", {}, 2, "sample_dpm_2", {}),
    ("lms", {"order": 4}, 1, "sample_lms", {"order": 4}),
    ("dpmpp-2m", {}, 1, "sample_dpmpp_2m", {}),
    ("euler-ancestral", {"eta": 1.0}, 1, "sample_euler_ancestral", {"eta": 1.0}),
    ("dpmpp-2s-ancestral", {"eta": 1.0}, 2, "sample_dpmpp_2s_ancestral", {"eta": 1.0}),
    ("dpmpp-2m-sde", {"eta": 1.0}, 1, "sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("dpmpp-3m-sde", {"eta": 1.0}, 1, "sample_dpmpp_3m_sde", {"eta": 1.0}),
]


def steps_for(nfe: int, calls_per_step: int) -> int:
    # Heun-type samplers skip the second call on the last step (onto sigma = 0)
    return max(1, (nfe + 1) // calls_per_step) if calls_per_step > 1 else nfe


def run_pair(kd, registry, pair, batch: int, dim: int, nfe: int, reps: int) -> tuple[str, int, float, float]:
    name, params, per_step, theirs_name, theirs_params = pair
    steps = steps_for(nfe, per_step)
    sigmas = kd.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
    chain = registry.build("chain", "ve")
    levels = [chain.level(-2.0 * math.log(s)) if s > 0 else chain.level(math.inf) for s in sigmas.tolist()]
    sampler = registry.build("sampler", name, **params)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0)) * SIGMA_MAX
    noise = rng.NoiseStream(0, torch.arange(batch), (dim,), stream=rng.STREAM_SAMPLER)
    calls = [0]

    def denoise(y, level):
        calls[0] += 1
        return y

    def model(y, sigma):
        return y

    theirs_fn = getattr(kd, theirs_name)
    kwargs = dict(theirs_params)
    if "noise_sampler" in _parameters(theirs_fn):
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn_like(x)  # k-diffusion's default draw
    with torch.no_grad():
        sampler.sample(denoise, x, levels, noise)
        nfe_counted = calls[0]
        ours = median_seconds(lambda: sampler.sample(denoise, x, levels, noise), reps)
        theirs = median_seconds(lambda: theirs_fn(model, x, sigmas, disable=True, **kwargs), reps)
    return name, nfe_counted, ours, theirs


def _parameters(fn) -> Sequence[str]:
    import inspect

    return list(inspect.signature(fn).parameters)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per cell at the large batch (median)")
    parser.add_argument("--overhead-reps", type=int, default=200, help="timed runs per cell at batch 1 (median)")
    args = parser.parse_args(argv)
    kd = kdiffusion_sampling()
    if kd is None:
        print("k-diffusion is not installed: pip install --no-deps k-diffusion", file=sys.stderr)
        return 2
    registry = fundiff.Registry.discover()
    print(
        f"# Engine time beyond the denoiser: fundiff vs k-diffusion ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, fundiff {fundiff.__version__}, "
        f"random numbers: {_native.status()})\n"
    )
    for title, batch, dim, reps, unit, scale in (
        (
            f"## Loop overhead per step, batch 1 x 2, {args.nfe} NFE (microseconds per step)",
            1,
            2,
            args.overhead_reps,
            "us/step",
            None,
        ),
        (
            f"## Whole run, batch {args.batch} x {args.dim} float32, {args.nfe} NFE (milliseconds)",
            args.batch,
            args.dim,
            args.reps,
            "ms",
            1e3,
        ),
    ):
        rows = []
        for pair in PAIRS:
            name, nfe, ours, theirs = run_pair(kd, registry, pair, batch, dim, args.nfe, reps)
            steps = steps_for(args.nfe, pair[2])
            if scale is None:  # per step, microseconds
                ours_v, theirs_v = ours / steps * 1e6, theirs / steps * 1e6
            else:
                ours_v, theirs_v = ours * scale, theirs * scale
            rows.append([name, str(steps), str(nfe), f"{ours_v:.1f}", f"{theirs_v:.1f}", f"{ours / theirs:.2f}"])
        print(title + "\n")
        print(table(["sampler", "steps", "NFE", f"fundiff {unit}", f"k-diffusion {unit}", "fundiff / k-diffusion"], rows))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
