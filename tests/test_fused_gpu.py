"""GPU-only checks of the fused steps (marked ``gpu``; skipped without CUDA): bfloat16
operands, in-kernel Philox noise statistics, CUDA graphs of whole sampling loops.

The kernel and whole-sampler tests (test_fused_kernels.py, test_fused_samplers.py) also run
compiled on the GPU when CUDA is there; these are the parts the interpreter cannot check
(bfloat16 stores truncate under it, graphs need a device).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import oracle_recipe

import fundiff
from fundiff import FundiffError, fused, rng
from fundiff.fused import PhiloxNormal, Prediction

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

U32 = 2.0**-24
#: bfloat16 keeps 8 significant bits: rounding a result costs up to 2^-9 of it
U_BF16 = 2.0**-9
#: GPU Box-Muller may use the hardware's approximate log / sin / cos: per-element deviation
#: from the float64 draws up to r (|d theta| + |d r| / r), with r <= 6.76 and both terms below
#: 2e-6 for the approximate functions (sin.approx: 2^-20.9 absolute on [-pi, pi])
GPU_NOISE_ATOL = 6.76 * 4e-6


def test_bfloat16_operands_match_the_float32_reference():
    """bfloat16 state and branches (the autocast output of a network), float32 coefficients
    and accumulation: the kernel's output is the float32 result rounded once to bfloat16, so
    within half a bfloat16 ulp (plus the float32 bound) of the torch reference computed in
    float32 from the same bfloat16 inputs; mixed float32 state with bfloat16 branches gives a
    float32 output within the float32 bound."""
    device = torch.device("cuda")
    triton_ex = fused.executor(torch.empty(1, device=device), "triton")
    gen = torch.Generator(device=device).manual_seed(0)
    x, c, u, prev = (torch.randn(7, 3, 33, 35, generator=gen, device=device).to(torch.bfloat16) for _ in range(4))
    for state in (x, x.float()):
        p = Prediction(branches=(c, u), weights=(3.0, -2.0), x=state)
        outputs = [[(0.7, state), (1.3, p), (-0.4, prev)], [(1.0, p)]]
        got = triton_ex.step(*outputs)
        exact = fused.TorchExecutor().step(
            *[[(k, o.double() if isinstance(o, torch.Tensor) else o) for k, o in terms] for terms in outputs]
        )
        for g, e, envelope in zip(
            got,
            exact,
            (
                0.7 * state.double().abs() + 1.3 * (3 * c.double().abs() + 2 * u.double().abs()) + 0.4 * prev.double().abs(),
                3 * c.double().abs() + 2 * u.double().abs(),
            ),
        ):
            assert g.dtype == state.dtype
            rounding = U_BF16 * e.abs() if g.dtype == torch.bfloat16 else 0.0
            assert bool(((g.double() - e).abs() <= 8 * U32 * envelope + rounding + 1e-30).all())


def test_in_kernel_noise_statistics_and_agreement():
    """2^24 in-kernel normals: mean, variance and fourth moment within 5 standard errors of
    N(0, 1), the empirical CDF within the Kolmogorov-Smirnov bound 1.95 / sqrt(n) (p = 0.001)
    at 41 points; and elementwise within GPU_NOISE_ATOL of rng.normal's float64 draws."""
    device = torch.device("cuda")
    triton_ex = fused.executor(torch.empty(1, device=device), "triton")
    batch, size = 64, 2**18
    ids = torch.arange(batch) + 12345
    z = PhiloxNormal(
        seed=2**40 + 3, stream=rng.STREAM_SAMPLER, draw=17, sample_ids=ids, sample_shape=(size,), device_ids=ids.to(device)
    )
    (values,) = triton_ex.step(((1.0, z),))
    v = values.double().flatten()
    n = v.numel()
    assert abs(float(v.mean())) <= 5 / math.sqrt(n)
    assert abs(float(v.var()) - 1.0) <= 5 * math.sqrt(2.0 / n)
    assert abs(float((v**4).mean()) - 3.0) <= 5 * math.sqrt(96.0 / n)
    grid = torch.linspace(-4, 4, 41, dtype=torch.float64, device=device)
    empirical = (v[None, :] <= grid[:, None]).double().mean(1)
    normal_cdf = 0.5 * (1 + torch.erf(grid / math.sqrt(2)))
    assert float((empirical - normal_cdf).abs().max()) <= 1.95 / math.sqrt(n)
    exact = rng.normal(2**40 + 3, rng.STREAM_SAMPLER, 17, ids[:4], (size,))
    assert float((values[:4].cpu().double() - exact).abs().max()) <= GPU_NOISE_ATOL


def _pipeline(**sample):
    recipe = oracle_recipe(sampler={"name": "euler-ancestral", "steps": 12}, sample={"device": "cuda", **sample})
    recipe.update(denoiser={"name": "mlp", "width": 64, "depth": 2}, parameterization="v")
    return fundiff.Pipeline(fundiff.load_recipe(recipe, fundiff.Registry.discover()), device="cuda")


def test_cuda_graphs_replay_the_eager_samples():
    """sample.cuda_graphs: batch 1 runs eagerly and is captured, batch 2 replays the graph with
    new sample ids, batch 3 (another size) runs eagerly; the samples equal the eager fused
    run's (same kernels, same keys), and the torch reference's within float32 rounding plus the
    in-kernel noise allowance (12 steps, noise coefficient <= sigma <= 1)."""
    p = _pipeline(backend="triton")
    graphed, _ = p.sample(10, seed=3, batch_size=4, cuda_graphs=True)
    eager, _ = p.sample(10, seed=3, batch_size=4)
    reference, _ = p.sample(10, seed=3, batch_size=4, backend="torch")
    assert torch.allclose(graphed, eager, rtol=0, atol=1e-6)
    assert float((graphed - reference).abs().max()) <= 12 * GPU_NOISE_ATOL + 1e-4


def test_cuda_graphs_refuse_host_drawn_noise():
    """The torch backend draws a stochastic sampler's noise on the host: that cannot be
    captured, and the error says which setting to change."""
    p = _pipeline(backend="torch")
    with pytest.raises(FundiffError, match="drawn on the host"):
        p.sample(8, seed=0, batch_size=4, cuda_graphs=True)
