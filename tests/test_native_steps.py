"""The compiled CPU step (fundiff._native.step, used by the torch backend's fused steps from
2^17 elements, 2^12 with fresh noise) against the torch operations it replaces.

The torch backend combines a step's terms as ``T_0 * c_0``, then ``add_(T_i, alpha=c_i)`` per
further term (torch rounds each to the operands' dtype, the multiply-add fused where the CPU
has FMA), then the fresh noise. The compiled step does the same operations in the same order
in one pass over memory, so on a CPU where torch's add_ is a fused multiply-add the two agree
bit for bit, and elsewhere to one rounding per term. Where it does not apply (operands it
does not take, noise before another term, autograd) torch does the work, unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fundiff import NoiseStream, _native, fused, rng
from fundiff.fused.step import PhiloxNormal
from fundiff.fused.torch_backend import _native_step

pytestmark = pytest.mark.skipif(_native.library() is None, reason=f"compiled host code unavailable: {_native.status()}")


def _torch_add_is_fused() -> bool:
    """Whether torch's add_(b, alpha=c) rounds once (FMA) here: compared with the exact
    a + c b rounded once (float64 holds the float32 product exactly)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    c = 0.1234567
    fused_ref = (a.double() + float(np.float32(c)) * b.double()).float()
    return torch.equal(a.clone().add_(b, alpha=c), fused_ref)


EXACT = _torch_add_is_fused()


def _chain(terms, dtype):
    """The torch backend's own arithmetic: T_0 * c_0, then add_ per nonzero term in order."""
    (c0, t0), rest = terms[0], terms[1:]
    out = t0 * c0
    for c, t in rest:
        if c != 0.0:
            out.add_(t.tensor("cpu", dtype) if isinstance(t, PhiloxNormal) else t, alpha=c)
    return out


def _assert_agree(got, expected, terms):
    if EXACT:
        assert torch.equal(got, expected)
    else:  # one rounding per term apart at most
        scale = sum(abs(c) * (t.abs() if isinstance(t, torch.Tensor) else 6.0) for c, t in terms)
        assert bool(((got - expected).abs() <= len(terms) * torch.finfo(got.dtype).eps * scale).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(16384,), (129, 131), (3, 8, 2048)])
def test_step_matches_torch_operations(dtype, count, shape):
    """1-6 tensor terms, sizes that are and are not multiples of the library's ranges (2048)
    and tasks (16384), coefficients of every sign and size, including 0 (skipped)."""
    g = torch.Generator().manual_seed(count)
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]
    coefficients = [0.9, -0.31, 0.0, 1.2345678901e-3, -2.5, 7.0][:count]
    terms = list(zip(coefficients, tensors))
    got = _native_step(terms)
    assert got is not None and got.dtype == dtype and got.shape == torch.Size(shape)
    _assert_agree(got, _chain(terms, dtype), terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sample_shape", [(2,), (63,), (64,), (1030,)])
def test_step_with_fresh_noise_matches_drawing_then_adding(dtype, sample_shape):
    """Noise as the last term is drawn as it is added (short samples packed several to a task,
    long ones cut into tasks): the same as materialising it and adding it with add_."""
    batch = max(8, (1 << 15) // math.prod(sample_shape))
    g = torch.Generator().manual_seed(1)
    x, x0 = (torch.randn(batch, *sample_shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    z = PhiloxNormal(seed=2**40 + 7, stream=rng.STREAM_SAMPLER, draw=3, sample_ids=torch.arange(5, 5 + batch), sample_shape=sample_shape)
    terms = [(0.8, x), (0.35, x0), (0.61, z)]
    got = _native_step(terms)
    assert got is not None
    _assert_agree(got, _chain(terms, dtype), terms)
    # row i depends on sample id i only
    one = PhiloxNormal(seed=z.seed, stream=z.stream, draw=z.draw, sample_ids=z.sample_ids[3:4], sample_shape=sample_shape)
    alone = _native_step([(0.8, x[3:4].contiguous()), (0.35, x0[3:4].contiguous()), (0.61, one)])
    if alone is not None:  # a single row may be below the library's minimum: then torch does it
        assert torch.equal(alone[0], got[3])


def test_step_is_the_same_on_any_thread_count():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 300_000, generator=g)
    z = PhiloxNormal(seed=9, stream=2, draw=0, sample_ids=torch.arange(3000), sample_shape=(100,))
    terms = [(0.5, x.view(3000, 100)), (-1.5, y.view(3000, 100)), (0.25, z)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native_step(terms)
        torch.set_num_threads(2)
        two = _native_step(terms)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_step_declines_what_it_does_not_take():
    """None (torch does it) for: mixed dtypes or shapes, non-contiguous operands, half
    precision, noise before another term, a deferred prediction, and operands that need
    grad while grad is on (the torch operations record the graph; the library would not)."""
    x = torch.randn(128, 256)
    z = PhiloxNormal(seed=1, stream=2, draw=0, sample_ids=torch.arange(128), sample_shape=(256,))
    assert _native_step([(1.0, x), (2.0, x.double())]) is None
    assert _native_step([(1.0, x), (2.0, x.T.contiguous().T)]) is None
    assert _native_step([(1.0, x.T)]) is None
    assert _native_step([(1.0, x.half())]) is None
    assert _native_step([(1.0, x), (0.5, z), (2.0, x)]) is None
    assert _native_step([(1.0, x), (2.0, torch.randn(64, 512))]) is None
    leaf = x.clone().requires_grad_()
    assert _native_step([(1.0, leaf), (2.0, x)]) is None
    with torch.no_grad():
        assert _native_step([(1.0, leaf), (2.0, x)]) is not None
    out = fused.executor(x, "torch").step(((1.0, leaf), (2.0, x)))[0]
    assert out.grad_fn is not None  # autograd kept


def test_torch_backend_uses_it_above_the_threshold_only(monkeypatch):
    """The torch backend hands a step to the library from STEP_MIN_ELEMENTS (from
    STEP_NOISE_MIN_ELEMENTS when the step draws fresh noise), where it is faster."""
    calls = []
    real = _native.step
    monkeypatch.setattr(_native, "step", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex = fused.executor(torch.zeros(1), "torch")
    small = torch.randn(_native.STEP_MIN_ELEMENTS - 1)
    big = torch.randn(_native.STEP_MIN_ELEMENTS)
    ex.step(((0.5, small), (0.5, small)))
    assert calls == []
    terms = ((0.5, big), (0.25, big))
    (got,) = ex.step(terms)
    assert calls == [1]
    _assert_agree(got, _chain(terms, big.dtype), terms)
    rows = _native.STEP_NOISE_MIN_ELEMENTS // 64
    for n_rows, used in ((rows - 1, False), (rows, True)):
        calls.clear()
        x = torch.randn(n_rows, 64)
        z = PhiloxNormal(seed=3, stream=2, draw=1, sample_ids=torch.arange(n_rows), sample_shape=(64,))
        (got,) = ex.step(((0.5, x), (0.25, z)))
        assert calls == ([1] if used else [])
        _assert_agree(got, _chain(((0.5, x), (0.25, z)), x.dtype), ((0.5, x), (0.25, z)))


def test_sampling_with_and_without_the_library_agrees(monkeypatch):
    """A stochastic sampler at a size where every step and draw goes through the library gives
    the samples of the NumPy + torch path (FUNDIFF_NATIVE=0): the same Philox words, float32
    noise identical but where a float64 value sits within a few ulp of a float32 rounding
    boundary, and step arithmetic rounded alike; allowed: one float32 rounding per step."""
    import fundiff

    registry = fundiff.Registry.discover()
    chain = registry.build("chain", "ve")
    levels = [chain.level(-2.0 * math.log(s)) for s in (80.0, 20.0, 5.0, 1.0, 0.2, 0.05)] + [chain.level(math.inf)]
    sampler = registry.build("sampler", "euler-ancestral")
    batch, dim = 1024, 64
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0)) * 80.0

    def run():
        with torch.no_grad():
            return sampler.sample(lambda y, level: 0.5 * y, x, levels, NoiseStream(5, torch.arange(batch), (dim,)))

    compiled = run()
    monkeypatch.setenv("FUNDIFF_NATIVE", "0")
    _native.reset()
    try:
        assert _native.library() is None
        reference = run()
    finally:
        monkeypatch.undo()
        _native.reset()
    tolerance = len(levels) * torch.finfo(torch.float32).eps * float(x.abs().max())
    assert float((compiled - reference).abs().max()) <= tolerance


def test_transforms_keep_torch_doing_the_work():
    """Under torch.func.vmap the operands are wrappers without storage of their own: the step
    falls back to the torch operations (and gives their result) instead of failing; so does
    fresh noise added in place to such a tensor."""
    x = torch.randn(8, 40000)
    ex = fused.executor(x, "torch")
    out = torch.func.vmap(lambda row: ex.step(((0.5, row), (0.25, row)))[0])(x)
    assert torch.equal(out, (x * 0.5).add_(x, alpha=0.25))
    seen = []
    torch.func.vmap(lambda row: seen.append(_native._plain_tensors([row])) or row)(x)
    assert seen == [False] and _native._plain_tensors([x])


def test_cpu_steps_benchmark_runs():
    """benchmarks/cpu_steps.py checks every variant against the torch operations before it
    times them: a tiny run exits 0 and prints its table (the figures mean nothing here)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "cpu_steps.py"), "--sizes", "0.25", "--reps", "1", "--no-compile"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "multistep" in done.stdout and "ancestral" in done.stdout
