#!/usr/bin/env python
"""One fused sampling step on the CPU against the memory bandwidth: the CPU counterpart of
benchmarks/kernels.py (which needs CUDA).

Two steps, as the torch backend of fundiff.fused runs them on the CPU (float32):

- multistep: out = a x + b D + c D_prev (DPM-Solver++(2M)'s update: 3 tensors read, 1 written);
- ancestral: out = a x + b D + c z, z fresh per-sample Philox noise (Euler ancestral: 2 tensors
  read, 1 written; the noise is computed, not read, where it is drawn as it is added).

Each is timed four ways, per operand size: the torch operations the backend used before it
had compiled code (``x * a``, then ``add_`` per term; the noise drawn into a tensor by
``rng.normal`` and added), the compiled one-pass step of ``fundiff._native`` (what the torch
backend runs now at 2^14 elements and more), ``torch.compile`` of the same torch expression
(noise drawn by ``rng.normal`` first), and a plain device copy ``dst.copy_(src)`` for the
bandwidth. Speeds are GB/s of the minimal traffic: 4 tensors for the multistep step, 3 for
the ancestral one, 2 for the copy. Every variant is checked against the torch operations
first (bit for bit where torch's add_ is a fused multiply-add, as here).

Usage::

    python benchmarks/cpu_steps.py                    # 2, 64 and 256 MiB per tensor; a few minutes
    python benchmarks/cpu_steps.py --no-compile --sizes 2 64 --reps 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _report module beside this script

from _report import Report, median_seconds  # noqa: E402

import fundiff  # noqa: E402
from fundiff import _native, rng  # noqa: E402
from fundiff.fused.step import PhiloxNormal  # noqa: E402

A, B, C = 0.8123, 0.1877, -0.0412  # step coefficients (host floats)
SAMPLE = 1024  # elements per sample: the noise's rows


def torch_ops_multistep(x, d, dp):
    out = x * A
    out.add_(d, alpha=B)
    return out.add_(dp, alpha=C)


def torch_ops_ancestral(x, d, noise: PhiloxNormal):
    out = x * A
    out.add_(d, alpha=B)
    z = rng.normal(noise.seed, noise.stream, noise.draw, noise.sample_ids, noise.sample_shape, dtype=x.dtype)
    return out.add_(z.view_as(out), alpha=C)


def expression_multistep(x, d, dp):
    return x * A + d * B + dp * C


def expression_ancestral(x, d, z):
    return x * A + d * B + z * C


def measure(mib: float, reps: int, compiled_multistep, compiled_ancestral) -> list[list[str]]:
    """The table's two rows (multistep, ancestral) for operands of ``mib`` MiB each."""
    rows = []
    n = int(mib * 2**20 / 4) // SAMPLE * SAMPLE
    size_bytes = n * 4
    g = torch.Generator().manual_seed(0)
    x, d, dp = (torch.randn(n // SAMPLE, SAMPLE, generator=g) for _ in range(3))
    noise = PhiloxNormal(seed=7, stream=rng.STREAM_SAMPLER, draw=3, sample_ids=torch.arange(n // SAMPLE), sample_shape=(SAMPLE,))
    dst = torch.empty_like(x)

    # correctness first: every variant against the torch operations
    reference_m, reference_a = torch_ops_multistep(x, d, dp), torch_ops_ancestral(x, d, noise)
    native_m = _native.step([A, B, C], [x, d, dp])
    native_a = _native.step([A, B], [x, d], noise, C)
    tolerance = 4 * torch.finfo(torch.float32).eps * 6.0
    for got, expected in ((native_m, reference_m), (native_a, reference_a)):
        assert got is not None and float((got - expected).abs().max()) <= tolerance, "native step disagrees"
    z = rng.normal(noise.seed, noise.stream, noise.draw, noise.sample_ids, noise.sample_shape, dtype=torch.float32)
    if compiled_multistep is not None:
        assert float((compiled_multistep(x, d, dp) - reference_m).abs().max()) <= tolerance
        assert float((compiled_ancestral(x, d, z) - reference_a).abs().max()) <= tolerance

    copy_s = median_seconds(lambda: dst.copy_(x), reps)
    cells = {
        ("multistep", "torch ops"): median_seconds(lambda: torch_ops_multistep(x, d, dp), reps),
        ("multistep", "native"): median_seconds(lambda: _native.step([A, B, C], [x, d, dp]), reps),
        ("ancestral", "torch ops"): median_seconds(lambda: torch_ops_ancestral(x, d, noise), reps),
        ("ancestral", "native"): median_seconds(lambda: _native.step([A, B], [x, d], noise, C), reps),
    }
    if compiled_multistep is not None:
        cells[("multistep", "compile")] = median_seconds(lambda: compiled_multistep(x, d, dp), reps)

        def draw_then_compiled():
            z = rng.normal(noise.seed, noise.stream, noise.draw, noise.sample_ids, noise.sample_shape, dtype=torch.float32)
            return compiled_ancestral(x, d, z)

        cells[("ancestral", "compile")] = median_seconds(draw_then_compiled, reps)
    copy_gbs = 2 * size_bytes / copy_s / 1e9
    for step, tensors in (("multistep", 4), ("ancestral", 3)):
        row = [f"{mib:g} MiB", step, f"{copy_gbs:.1f}"]
        for variant in ("torch ops", "native", "compile"):
            t = cells.get((step, variant))
            row += ["-", "-"] if t is None else [f"{t * 1e3:.2f}", f"{tensors * size_bytes / t / 1e9:.1f}"]
        native_t = cells[(step, "native")]
        row += [f"{tensors * size_bytes / native_t / 1e9 / copy_gbs:.0%}", f"{cells[(step, 'torch ops')] / native_t:.2f}"]
        rows.append(row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2, 64, 256], help="MiB per tensor")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per cell (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--out", metavar="FILE", help="also write the results as markdown to FILE")
    args = parser.parse_args(argv)
    if _native.library() is None:
        print(f"the compiled host code is not available here: {_native.status()}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = Report()
    report.note(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, fundiff {fundiff.__version__}; "
        f"native library: {'OpenMP on torch threads' if _native.library().openmp else 'rows over Python threads'}"
    )
    compiled_multistep = compiled_ancestral = None
    if not args.no_compile:
        compiled_multistep = torch.compile(expression_multistep, dynamic=False)
        compiled_ancestral = torch.compile(expression_ancestral, dynamic=False)
    rows = []
    for mib in args.sizes:
        rows += measure(mib, args.reps, compiled_multistep, compiled_ancestral)
    report.table(
        [
            "size / tensor",
            "step",
            "copy GB/s",
            "torch ops ms",
            "GB/s",
            "native ms",
            "GB/s",
            "compile ms",
            "GB/s",
            "native / copy",
            "speed-up vs torch ops",
        ],
        rows,
        title="One float32 step on the CPU: time (median) and GB/s of the minimal traffic",
    )
    report.note(f"total time {time.perf_counter() - started:.1f} s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report.markdown("Results of `python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]) + "`"))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
