"""Fused sampling-step kernels on a GPU: bandwidth per operand size, and a whole guided run.

Needs CUDA (it refuses to run without it; ``--smoke`` runs every code path at tiny sizes on
the CPU under TRITON_INTERPRET=1, to test the script, with meaningless timings).

1. Per operand size (2, 64, 256 MiB per tensor) and dtype (float32, bfloat16):

   * device-to-device copy bandwidth (``dst.copy_(src)``: 2 x bytes / time);
   * one guided step, DPM-Solver++(2M) with classifier-free guidance: reads x, the
     conditional and unconditional predictions and the previous x0 estimate, writes x_next and
     the guided x0 (minimal traffic: 6 tensors), timed for
       - the torch backend as a sampler runs it (guidance combine by ``torch.lerp`` in the
         guidance, then the step's terms one torch operation each),
       - the fused Triton kernel (one pass),
       - ``torch.compile`` of the same torch expression;
     each as achieved GB/s of the minimal traffic, launched back to back ("eager") and, for
     torch and fused, also replayed from a CUDA graph of 20 steps (launch overhead removed);
   * one guided ancestral step with fresh Gaussian noise (Euler ancestral with CFG: reads x and
     the two branches, writes x_next and x0; minimal traffic 5 tensors): the fused kernel draws
     the noise in registers; the torch backend reads a noise tensor drawn beforehand on the
     device (its drawing not timed, which favours torch).

   Goals (issue 7): fused >= 90 % of copy bandwidth at >= 64 MiB; at 2 MiB fused >= 2.5 x
   faster than the unfused torch step.

2. A whole 20-step guided sampling run (CFG w = 3, dpmpp-2m) with a small U-Net on random
   32 x 32 RGB "data" (weights at initialisation: the timing and the agreement do not depend
   on training): torch backend without CUDA graphs against the fused backend with and without
   CUDA graphs; time per batch (median over batches after the first, which compiles and
   captures), speed-up, and the largest difference between the samples.

Usage::

    .venv/bin/python benchmarks/kernels.py                 # everything, a few minutes on one GPU
    .venv/bin/python benchmarks/kernels.py --quick         # fewer repetitions, no torch.compile
    .venv/bin/python benchmarks/kernels.py --out results.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _report module beside this script
from _report import Report  # noqa: E402

MIB = 1 << 20


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def seconds_per_call(fn: Callable[[], object], cfg: argparse.Namespace) -> float:
    """Median over rounds of the time per call, calls launched back to back (CUDA events
    around each round; on the CPU, wall time)."""
    for _ in range(cfg.warmup):
        fn()
    synchronize(cfg)
    start = time.perf_counter()
    fn()
    synchronize(cfg)
    estimate = max(time.perf_counter() - start, 1e-6)
    reps = max(3, min(2000, int(cfg.round_seconds / estimate)))
    rounds = []
    for _ in range(cfg.rounds):
        if cfg.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            rounds.append(begin.elapsed_time(end) / 1e3 / reps)
        else:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            rounds.append((time.perf_counter() - t) / reps)
    return statistics.median(rounds)


def seconds_per_graphed_call(fn: Callable[[], object], cfg: argparse.Namespace, calls: int = 20) -> float | None:
    """Time per call when ``calls`` calls are replayed from one CUDA graph (no launch overhead)."""
    if cfg.device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return seconds_per_call(graph.replay, cfg) / calls


def synchronize(cfg: argparse.Namespace) -> None:
    if cfg.device.type == "cuda":
        torch.cuda.synchronize()


def gbps(nbytes: float, seconds: float | None) -> str:
    return "-" if seconds is None else f"{nbytes / seconds / 1e9:.0f}"


# --------------------------------------------------------------------------------------
# 1. Kernels per operand size
# --------------------------------------------------------------------------------------

# DPM-Solver++(2M) coefficients of a mid-run step (any host floats do: the traffic is the same)
C_X, C_T, C_P, W = 0.83, 0.21, -0.04, 3.0
C_Z = 0.3


def measure_size(mib: float, dtype: torch.dtype, cfg: argparse.Namespace) -> tuple[list[str], dict]:
    """One table row, and the goal figures, for tensors of ``mib`` MiB in ``dtype``."""
    from fundiff import fused

    triton = fused.executor(torch.empty(1, device=cfg.device), "triton")
    reference = fused.TorchExecutor()
    batch = 16
    n = int(mib * MIB) * 8 // torch.finfo(dtype).bits  # elements per tensor
    n = max(batch * 4, n // batch * batch)
    shape = (batch, n // batch)
    nbytes = n * torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    x, c, u, prev, z_tensor = (torch.randn(shape, generator=gen, device=cfg.device).to(dtype) for _ in range(5))
    dst = torch.empty_like(x)
    ids = torch.arange(batch, device=cfg.device)
    philox = fused.PhiloxNormal(seed=7, stream=2, draw=3, sample_ids=ids.cpu(), sample_shape=shape[1:], device_ids=ids)

    def torch_step():
        x0 = torch.lerp(u, c, W)  # what the cfg guidance does, then the sampler's terms
        return reference.step(((C_X, x), (C_T, x0), (C_P, prev)), ((1.0, x0),))

    def fused_step():
        p = fused.Prediction(branches=(c, u), weights=(W, 1.0 - W))
        return triton.step(((C_X, x), (C_T, p), (C_P, prev)), ((1.0, p),))

    def torch_noise_step():
        x0 = torch.lerp(u, c, W)
        return reference.step(((C_X, x), (C_T, x0), (C_Z, z_tensor)), ((1.0, x0),))

    def fused_noise_step():
        p = fused.Prediction(branches=(c, u), weights=(W, 1.0 - W))
        return triton.step(((C_X, x), (C_T, p), (C_Z, philox)), ((1.0, p),))

    # agreement first: a benchmark of wrong results is worthless
    got, want = fused_step(), torch_step()
    scale = float(want[0].float().abs().max())
    err = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
    limit = (2.0**-7 if dtype == torch.bfloat16 else 2.0**-20) * 8 * scale
    if not err <= limit:
        raise SystemExit(f"fused step disagrees with the torch backend at {mib} MiB {dtype}: max |diff| {err:.3g} > {limit:.3g}")

    t_copy = seconds_per_call(lambda: dst.copy_(x), cfg)
    t_torch = seconds_per_call(torch_step, cfg)
    t_fused = seconds_per_call(fused_step, cfg)
    t_torch_graph = seconds_per_graphed_call(torch_step, cfg)
    t_fused_graph = seconds_per_graphed_call(fused_step, cfg)
    t_compile = None
    if cfg.compile:
        compiled = torch.compile(_torch_expression, dynamic=True)
        t_compile = seconds_per_call(lambda: compiled(x, c, u, prev), cfg)
    t_torch_noise = seconds_per_call(torch_noise_step, cfg)
    t_fused_noise = seconds_per_call(fused_noise_step, cfg)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    copy_bw = 2 * nbytes / t_copy
    print(
        f"  ({mib:g} MiB {name}: fused {t_fused * 1e6:.1f} us, torch {t_torch * 1e6:.1f} us, copy {t_copy * 1e6:.1f} us)",
        flush=True,
    )
    row = [
        f"{mib:g} MiB",
        name,
        gbps(2 * nbytes, t_copy),
        gbps(6 * nbytes, t_torch),
        gbps(6 * nbytes, t_fused),
        gbps(6 * nbytes, t_compile),
        gbps(6 * nbytes, t_torch_graph),
        gbps(6 * nbytes, t_fused_graph),
        f"{(6 * nbytes / t_fused) / copy_bw:.0%}",
        f"{t_torch / t_fused:.2f}",
        gbps(5 * nbytes, t_torch_noise),
        gbps(5 * nbytes, t_fused_noise),
    ]
    return row, {"fused_over_copy": (6 * nbytes / t_fused) / copy_bw, "speedup": t_torch / t_fused}


def kernels(report: Report, cfg: argparse.Namespace) -> dict:
    report.heading("1. One sampling step per operand size")
    report.note(
        "GB/s of the minimal traffic: copy 2 tensors; guided DPM-Solver++(2M) step 6 tensors (x, x0_c, x0_u, x0_prev in; "
        "x_next, x0 out); guided ancestral step with fresh noise 5 tensors (x, x0_c, x0_u in; x_next, x0 out). "
        "eager: launches back to back; graph: 20 steps replayed from one CUDA graph. torch: the torch backend as a "
        "sampler runs it (torch.lerp for CFG, then one operation per term); fused: the Triton kernel; compile: "
        "torch.compile of the torch expression. The noise step's torch time excludes drawing its noise."
    )
    rows, goals = [], {}
    for mib in cfg.sizes:
        for dtype in cfg.dtypes:
            row, goal = measure_size(mib, dtype, cfg)
            rows.append(row)
            goals[(mib, row[1])] = goal
    report.table(
        [
            "size/tensor",
            "dtype",
            "copy GB/s",
            "torch eager",
            "fused eager",
            "compile eager",
            "torch graph",
            "fused graph",
            "fused / copy",
            "speed-up vs torch",
            "noise step: torch",
            "noise step: fused",
        ],
        rows,
    )
    lines = []
    for (mib, name), g in goals.items():
        if mib >= 64:
            lines.append(
                f"{mib:g} MiB {name}: fused at {g['fused_over_copy']:.0%} of copy bandwidth (goal >= 90 %): {'met' if g['fused_over_copy'] >= 0.9 else 'NOT met'}"
            )
        if mib <= 2:
            lines.append(
                f"{mib:g} MiB {name}: fused {g['speedup']:.2f} x faster than torch (goal >= 2.5 x): {'met' if g['speedup'] >= 2.5 else 'NOT met'}"
            )
    report.note("Goals: " + "; ".join(lines))
    return goals


def _torch_expression(x, c, u, prev):
    x0 = torch.lerp(u, c, W)
    return C_X * x + C_T * x0 + C_P * prev, x0


# --------------------------------------------------------------------------------------
# 2. A whole guided sampling run with a small U-Net
# --------------------------------------------------------------------------------------


def whole_run(report: Report, cfg: argparse.Namespace) -> None:
    import fundiff

    report.heading("2. A whole guided sampling run (small U-Net)")
    size, classes = cfg.image_size, 10
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.safetensors")
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(0)
        save_file({"x": torch.rand(64, 3, size, size, generator=gen) * 2 - 1, "labels": torch.arange(64) % classes}, path)
        recipe = {
            "data": {"name": "tensor-file", "path": path},
            "chain": "vp",
            "schedule": "cosine",
            "noise": "gaussian",
            "denoiser": {
                "name": "unet",
                "channels": cfg.unet_channels,
                "channel_mult": [1, 2, 2],
                "blocks": 1,
                "attention_resolutions": [size // 4],
                "conditional": True,
                "num_groups": 16,
            },
            "parameterization": "v",  # x0 = alpha x - sigma v stays bounded even for untrained weights
            "weighting": "eps-mse",
            "guidance": {"name": "cfg", "scale": 3.0},
            "sampler": {"name": "dpmpp-2m", "steps": cfg.steps},
            "train": {"device": str(cfg.device), "ema": 0.0},
            "sample": {"device": str(cfg.device)},
        }
        pipeline = fundiff.Pipeline(fundiff.load_recipe(recipe, fundiff.Registry.discover()), device=cfg.device)
        params = sum(p.numel() for p in pipeline.model.parameters())
        report.note(
            f"U-Net: {params / 1e6:.2f} M parameters, {size} x {size} x 3, labels 0-9, CFG w = 3 (both branches in one forward "
            f"pass on 2 x batch), {cfg.steps} dpmpp-2m steps, batch {cfg.batch}, {cfg.batches} batches per run; time per batch: "
            "median over batches 2.. (batch 1 compiles kernels and, with graphs, captures), synchronised by the copy to the host."
        )
        results, rows = {}, []
        for label, backend, graphs in (
            ("torch, no graphs", "torch", False),
            ("fused, no graphs", "triton", False),
            ("fused + CUDA graphs", "triton", True),
        ):
            if graphs and cfg.device.type != "cuda":
                continue
            stamps: list[float] = []

            def progress(_count: int, stamps=stamps) -> None:
                stamps.append(time.perf_counter())

            synchronize(cfg)
            begin = time.perf_counter()
            samples, _ = pipeline.sample(
                cfg.batch * cfg.batches, seed=1, batch_size=cfg.batch, backend=backend, cuda_graphs=graphs, progress=progress
            )
            per_batch = [b - a for a, b in zip([begin, *stamps[:-1]], stamps)]
            results[label] = (samples, statistics.median(per_batch[1:]) if len(per_batch) > 1 else per_batch[0], per_batch[0])
        base = results["torch, no graphs"]
        for label, (samples, t, first) in results.items():
            diff = float((samples - base[0]).abs().max())
            rows.append([label, f"{t * 1e3:.1f}", f"{first * 1e3:.0f}", f"{base[1] / t:.2f}", f"{diff:.2e}"])
        report.table(["configuration", "ms / batch", "first batch ms", "speed-up", "max |samples - torch's|"], rows)
        report.note(f"Sample scale: max |x| = {float(base[0].abs().max()):.3g}.")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def machine_card(cfg: argparse.Namespace) -> list[str]:
    import triton

    import fundiff

    lines = [f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')}"]
    if cfg.device.type == "cuda":
        prop = torch.cuda.get_device_properties(cfg.device)
        lines.append(
            f"GPU: {prop.name}, {prop.total_memory / 2**30:.0f} GiB, {prop.multi_processor_count} SMs, compute capability {prop.major}.{prop.minor}"
        )
        lines.append(f"CUDA {torch.version.cuda}, driver-visible devices: {torch.cuda.device_count()}")
    else:
        lines.append(f"CPU smoke run ({platform.processor() or platform.machine()}), TRITON_INTERPRET=1: timings meaningless")
    lines.append(
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, fundiff {fundiff.__version__}"
    )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile column")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1 (tests the script only)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--only", choices=("kernels", "run"), help="one part only")
    parser.add_argument("--out", metavar="FILE", help="also write the results as markdown to FILE")
    parser.add_argument("--batch", type=int, default=64, help="whole run: samples per batch (default 64)")
    cfg = parser.parse_args(argv)
    cfg.sizes, cfg.dtypes = [2, 64, 256], [torch.float32, torch.bfloat16]
    cfg.warmup, cfg.rounds, cfg.round_seconds = 5, 7, 0.05
    cfg.compile = not (cfg.no_compile or cfg.quick)
    cfg.steps, cfg.batches, cfg.image_size, cfg.unet_channels = 20, 6, 32, 64
    if cfg.quick:
        cfg.rounds, cfg.round_seconds, cfg.batches = 3, 0.02, 4
    if cfg.smoke:
        cfg.sizes, cfg.dtypes = [0.01], [torch.float32]
        cfg.warmup, cfg.rounds, cfg.round_seconds = 1, 1, 0.0
        cfg.steps, cfg.batches, cfg.image_size, cfg.unet_channels, cfg.batch = 3, 2, 8, 16, 2
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        cfg.device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py measures GPU kernels and needs CUDA, which this machine does not have "
            "(torch.cuda.is_available() is False); run it on a GPU machine (--smoke tests the script on the CPU)",
            file=sys.stderr,
        )
        return 2
    else:
        cfg.device = torch.device("cuda")
    started = time.perf_counter()
    report = Report()
    header = ["fundiff fused-kernel benchmarks" + (" (--quick)" if cfg.quick else "") + (" (--smoke)" if cfg.smoke else "")]
    header += machine_card(cfg)
    header.append("command: python " + " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]))
    print("\n".join(header), flush=True)
    if cfg.only in (None, "kernels"):
        kernels(report, cfg)
    if cfg.only in (None, "run"):
        whole_run(report, cfg)
    footer = f"total time {time.perf_counter() - started:.1f} s"
    print("\n" + footer)
    if cfg.out:
        with open(cfg.out, "w") as handle:
            handle.write(report.markdown("\n".join(f"- {line}" for line in header[1:]) + f"\n- {footer}\n"))
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
