"""The fused-step Triton kernels against the torch reference (fundiff.fused).

Without CUDA the kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET=1
is set here, before the kernel module is first imported (``triton.jit`` reads it when a
kernel is created; nothing imports fundiff.fused._kernels before a triton step runs). With
CUDA the same tests run the compiled kernels on the GPU.

Tolerances (Higham 2002, "Accuracy and Stability of Numerical Algorithms", sec. 3.1): an
output sum_i c_i T_i evaluated in float32 with n terms and coefficients rounded to float32
is within (n + 2) u32 sum_i |c_i| |T_i| of the exact value (u32 = 2^-24), elementwise. Both the
kernel and the torch backend are held to that bound against a float64 evaluation of the same
step (same inputs, exactly representable). A prediction enters the bound through its own
envelope sum_k |w_k| |B_k| (times the rescale factor, plus the rescale's x term); the per-
sample std ratio of a rescale adds RESCALE_ULPS; a dynamic threshold doubles the envelope
(the quantile s itself moves by the prediction's rounding). In-kernel Box-Muller noise
differs from the float64 reference by at most NOISE_ATOL (see test_noise_matches_rng).
float16 outputs add half an ulp of float16 rounding, 2^-11 |value|.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module import (see the docstring)

import attrs
import pytest
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fundiff import FundiffError, fused, rng
from fundiff.fused import PhiloxNormal, Prediction, Rescale, _kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
U32 = 2.0**-24
#: |z_kernel - z_float64| <= r (|d theta| + |d r| / r) with r <= sqrt(2 ln 2^33) = 6.76, the
#: angle good to 4e-7 (the centred uniform's float32 rounding and 2 pi's) and r to 2.5e-7
#: relative: 6.76 * 6.5e-7 = 4.4e-6 (measured under the interpreter: 1.05e-6 over 1M draws)
NOISE_ATOL = 5e-6
#: the rescale factor m = phi std(r) / std(g) + 1 - phi: two float32 stds of n <= 10^4
#: elements (pairwise sums, log2 n + 4 roundings each) and a ratio
RESCALE_ULPS = 40.0

TRITON = fused.executor(torch.empty(1, device=DEVICE), "triton")
TORCH = fused.TorchExecutor()


def _as64(operand):
    if isinstance(operand, torch.Tensor):
        return operand.double()
    if isinstance(operand, Prediction):
        return attrs.evolve(
            operand, branches=tuple(b.double() for b in operand.branches), x=None if operand.x is None else operand.x.double()
        )
    return operand  # PhiloxNormal: materialised in the step's dtype (float64 here)


def _rescale_factor64(p: Prediction) -> torch.Tensor:
    """m per sample in float64 (for the error envelope)."""
    r = p.rescale
    x = p.x.double() if r.to_x != 0.0 else 0.0
    guided = sum(w * b.double() for w, b in zip(p.weights, p.branches))
    dims = tuple(range(1, guided.ndim))
    std_g = (r.to_x * x + r.to_pred * guided).std(dim=dims, keepdim=True, correction=0)
    std_r = (r.to_x * x + r.to_pred * p.branches[r.reference].double()).std(dim=dims, keepdim=True, correction=0)
    factor = torch.where(std_g > 0, std_r / torch.where(std_g > 0, std_g, 1.0), 1.0)
    return r.phi * factor + (1.0 - r.phi)


def _prediction_envelope(p: Prediction) -> tuple[torch.Tensor, float]:
    """(envelope, roundings): |p| bound of the summands and the number of roundings in p."""
    env = sum(abs(w) * b.double().abs() for w, b in zip(p.weights, p.branches))
    ulps = len(p.branches) + 2.0
    if p.rescale is not None:
        m = _rescale_factor64(p)
        env = m.abs() * env
        if p.rescale.to_x != 0.0:
            env = env + abs(p.rescale.x_factor) * (m - 1.0).abs() * p.x.double().abs()
        ulps += 4.0 + RESCALE_ULPS
    if p.threshold is not None:
        env = 2.0 * env
        ulps += 2.0
    return env, ulps


def _tolerance(terms, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The elementwise bound of the module docstring for one output."""
    env = torch.zeros_like(ref)
    ulps = len(terms) + 2.0
    noise = 0.0
    for c, operand in terms:
        if isinstance(operand, Prediction):
            p_env, p_ulps = _prediction_envelope(operand)
            env = env + abs(c) * p_env
            ulps += p_ulps
        elif isinstance(operand, PhiloxNormal):
            noise += abs(c) * NOISE_ATOL
            env = env + abs(c) * 6.8
        else:
            env = env + abs(c) * operand.double().abs()
    tol = ulps * U32 * env + noise
    if dtype == torch.float16:
        tol = tol + 2.0**-11 * ref.abs() + 2.0**-24
    return tol


def _check_step(outputs, executor=TRITON):
    """Run a step on ``executor`` and on the torch backend; both within the bound of a float64
    evaluation; print the first mismatches on failure."""
    got = executor.step(*outputs)
    reference = TORCH.step(*outputs)
    exact = TORCH.step(*[[(c, _as64(op)) for c, op in terms] for terms in outputs])
    assert len(got) == len(outputs)
    for o, (terms, g, r, e) in enumerate(zip(outputs, got, reference, exact)):
        assert g.shape == e.shape and g.dtype == r.dtype, (o, g.shape, g.dtype, r.dtype)
        tol = _tolerance(terms, e, g.dtype)
        for name, value in (("triton", g), ("torch", r)):
            err = (value.double() - e).abs()
            bad = err > tol
            if bad.any():
                where = bad.nonzero()[:5].tolist()
                detail = [(w, float(value[tuple(w)]), float(e[tuple(w)]), float(tol[tuple(w)])) for w in where]
                pytest.fail(
                    f"output {o} of {name} off the float64 value by more than the bound: (index, got, exact, bound) {detail}"
                )
    return got


# --------------------------------------------------------------------------------------
# Philox and Box-Muller inside the kernel
# --------------------------------------------------------------------------------------


@triton.jit
def words_kernel(out_ptr, ids_ptr, key0, key1, ctr1, ctr3, per_sample, BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.arange(0, BLOCK)
    sample_id = tl.load(ids_ptr + sample)
    c0 = block.to(tl.uint32)
    c1 = tl.zeros_like(c0) + ctr1.to(tl.uint32)
    c2 = (tl.zeros_like(block).to(tl.int64) + sample_id) & 0xFFFFFFFF
    c3 = ctr3 ^ ((tl.zeros_like(block).to(tl.int64) + sample_id) >> 32)
    w0, w1, w2, w3 = _kernels.philox4x32_10(c0, c1, c2.to(tl.uint32), c3.to(tl.uint32), key0.to(tl.uint32), key1.to(tl.uint32))
    base = out_ptr + sample * per_sample + block * 4
    mask = block * 4 < per_sample
    tl.store(base, w0.to(tl.int64), mask=mask)
    tl.store(base + 1, w1.to(tl.int64), mask=mask)
    tl.store(base + 2, w2.to(tl.int64), mask=mask)
    tl.store(base + 3, w3.to(tl.int64), mask=mask)


@triton.jit
def radius_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, _kernels.box_muller_radius(bits), mask=mask)


def test_philox_words_are_rng_philox_bit_for_bit():
    """The kernel's Philox4x32-10 (Salmon et al. 2011) gives the words of rng._raw_bits for
    counter (element block, draw, sample id low, stream | draw high | id high), including
    64-bit seeds and ids above 2^32: read back through a test kernel."""
    for seed, stream, draw, ids in (
        (0, 0, 0, [0, 1]),
        (2**64 - 1, 65535, 2**32 - 1, [2**33 + 5, 7, 2**47]),
        (123456789, 2, 9, [4]),
    ):
        z = PhiloxNormal(seed=seed, stream=stream, draw=draw, sample_ids=torch.tensor(ids), sample_shape=(32,))
        key0, key1, ctr1, ctr3 = z.counter_words()
        out = torch.zeros(len(ids), 32, dtype=torch.int64, device=DEVICE)
        words_kernel[(len(ids),)](out, torch.tensor(ids, device=DEVICE), key0, key1, ctr1, ctr3, 32, BLOCK=8)
        expected = rng._raw_bits(seed, stream, draw, torch.tensor(ids), 32)
        assert torch.equal(out.cpu(), expected), (seed, stream, draw, ids)


@pytest.mark.parametrize("sample_shape", [(1,), (2,), (3,), (5, 7), (4, 9), (3001,)])
def test_noise_matches_rng(sample_shape):
    """In-kernel noise is rng.normal (Box-Muller on the same Philox words) to NOISE_ATOL, on
    shapes whose sample size is and is not a multiple of 4 (one Philox call per four elements,
    or per element when quads straddle samples) and not a multiple of the block; the same
    twice; row i depends on sample id i only (the batch and position do not matter)."""
    ids = torch.tensor([5, 2**40 + 3, 0])
    seed, draw = 2**63 + 11, 7
    z = PhiloxNormal(seed=seed, stream=rng.STREAM_SAMPLER, draw=draw, sample_ids=ids, sample_shape=sample_shape)
    zero = torch.zeros(3, *sample_shape, device=DEVICE)
    (got,) = TRITON.step(((1.0, zero), (1.0, z)))
    exact = rng.normal(seed, rng.STREAM_SAMPLER, draw, ids, sample_shape)
    err = (got.cpu().double() - exact).abs()
    assert float(err.max()) <= NOISE_ATOL, float(err.max())
    assert torch.equal(TRITON.step(((1.0, zero), (1.0, z)))[0], got)
    one = PhiloxNormal(seed=seed, stream=rng.STREAM_SAMPLER, draw=draw, sample_ids=ids[1:2], sample_shape=sample_shape)
    assert torch.equal(TRITON.step(((1.0, zero[:1]), (1.0, one)))[0][0], got[1])


def test_box_muller_radius_near_the_ends_of_the_unit_interval():
    """sqrt(-2 ln u) at the extreme words (u = 2^-33 .. 1 - 2^-33) and around 2^31, where a
    float32 u would lose the radius: within 4 float32 ulps of the float64 value."""
    words = [0, 1, 2, 2**24 - 1, 2**24 + 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2**8, 2**32 - 3, 2**32 - 2, 2**32 - 1]
    bits = torch.tensor(words, dtype=torch.int64, device=DEVICE)
    out = torch.zeros(len(words), device=DEVICE)
    radius_kernel[(1,)](bits, out, len(words), BLOCK=16)
    # 1 - u = (2^32 - 1 - w + 0.5) 2^-32 is exact in float64, and log1p is accurate everywhere
    complement = (2**32 - 1 - torch.tensor(words, dtype=torch.float64) + 0.5) / 2**32
    exact = torch.sqrt(-2.0 * torch.log1p(-complement))
    rel = ((out.cpu().double() - exact).abs() / exact).max()
    assert float(rel) <= 8 * U32, float(rel)  # 4 float32 ulps


# --------------------------------------------------------------------------------------
# Steps against the torch reference
# --------------------------------------------------------------------------------------

SIZES = [1, 2, 3, 5, 7, 12, 35, 129, 3001]  # odd, not multiples of 4 or of any block


@st.composite
def steps(draw):
    """A random step structure: 1-4 tensor operands, an optional prediction (1-3 branches,
    rescale in x0 or an x-dependent space, threshold, clip), optional noise, 1-3 outputs."""
    batch = draw(st.integers(1, 4))
    size = draw(st.sampled_from(SIZES))
    shape = (batch, size) if draw(st.booleans()) else (batch, 1, size)
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**32 - 1))
    gen = torch.Generator().manual_seed(seed)
    state_dtype = torch.float32 if draw(st.booleans()) else dtype

    def tensor(dt, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dt).to(DEVICE)

    leaves = [tensor(state_dtype)] + [
        tensor(dtype, draw(st.sampled_from([0.5, 1.0, 3.0]))) for _ in range(draw(st.integers(0, 3)))
    ]
    operands: list = list(leaves)
    coefficient = st.floats(-3.0, 3.0, allow_nan=False).filter(lambda c: abs(c) > 1e-3)
    prediction = None
    if draw(st.booleans()):
        k = draw(st.integers(1, 3))
        rescale = None
        if draw(st.booleans()):
            phi = draw(st.floats(0.0, 1.0))
            rescale = Rescale(phi=phi) if draw(st.booleans()) else Rescale(phi=phi, to_x=1.0 / 0.6, to_pred=-0.8 / 0.6)
        prediction = Prediction(
            branches=tuple(tensor(dtype) for _ in range(k)),
            weights=tuple(draw(coefficient) for _ in range(k)),
            x=leaves[0],
            rescale=rescale,
            threshold=draw(st.sampled_from([None, 0.9, 1.0])),
            clip=draw(st.sampled_from([None, 0.75])),
        )
        operands.append(prediction)
    if draw(st.booleans()):
        ids = torch.arange(batch) * 3 + draw(st.integers(0, 2**40))
        operands.append(
            PhiloxNormal(seed=seed, stream=2, draw=draw(st.integers(0, 2**32 - 1)), sample_ids=ids, sample_shape=shape[1:])
        )
    outputs = []
    for _ in range(draw(st.integers(1, 3))):
        chosen = draw(st.lists(st.sampled_from(range(len(operands))), min_size=1, max_size=len(operands), unique=True))
        outputs.append([(draw(coefficient), operands[j]) for j in chosen])
    if prediction is not None and draw(st.booleans()):
        outputs.append([(1.0, prediction)])  # the prediction itself, as a sampler keeps it
    return outputs


@settings(max_examples=30, deadline=None)
@given(outputs=steps())
@example(outputs=None)
def test_step_matches_the_torch_reference(outputs):
    """Any step structure: every output of the kernel (and of the torch backend) within the
    float32 bound of the float64 value, for float32 and float16 operands (mixed: a float32
    state with float16 branches), odd shapes, 1-3 outputs; and the kernel twice, identical."""
    if outputs is None:  # pinned: the guided multistep shape of DPM-Solver++(2M) with CFG and noise
        gen = torch.Generator().manual_seed(0)
        x, c, u, prev = (torch.randn(3, 5, 7, generator=gen).to(DEVICE) for _ in range(4))
        p = Prediction(branches=(c, u), weights=(3.0, -2.0), x=x)
        z = PhiloxNormal(seed=1, stream=2, draw=3, sample_ids=torch.tensor([0, 1, 2]), sample_shape=(5, 7))
        outputs = [[(0.7, x), (1.3, p), (-0.4, prev), (0.2, z)], [(1.0, p)]]
    first = _check_step(outputs)
    again = TRITON.step(*outputs)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("case", ["transposed", "sliced", "expanded-batch"])
def test_non_contiguous_operands_are_copied_not_misread(case):
    """A kernel indexing flat memory would read a strided view's elements out of order; the
    executor makes such operands contiguous, so the result equals the contiguous one's."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 7, 6, generator=gen).to(DEVICE)
    other = torch.randn(4, 6, 7, generator=gen).to(DEVICE)
    view = {
        "transposed": base.transpose(1, 2),
        "sliced": torch.randn(4, 6, 14, generator=gen).to(DEVICE)[:, :, ::2],
        "expanded-batch": base[:1].expand(4, 7, 6).transpose(1, 2),
    }[case]
    assert not view.is_contiguous()
    p = Prediction(branches=(view, other), weights=(2.0, -1.0), x=other, rescale=Rescale(phi=0.5))
    (got, got_p) = _check_step([[(0.5, view), (1.5, other), (0.25, p)], [(1.0, p)]])
    (want, want_p) = TRITON.step(
        [(0.5, view.contiguous()), (1.5, other), (0.25, attrs.evolve(p, branches=(view.contiguous(), other)))],
        [(1.0, attrs.evolve(p, branches=(view.contiguous(), other)))],
    )
    assert torch.equal(got, want) and torch.equal(got_p, want_p)


def test_outputs_that_are_operands_are_returned_as_they_are():
    """((1.0, T),) returns T itself (nothing written); an all-zero output is zeros; a plain
    one-branch prediction is its tensor."""
    x = torch.randn(2, 3, device=DEVICE)
    same, zeros, plain = TRITON.step(((1.0, x),), ((0.0, x),), ((1.0, Prediction(branches=(x,), weights=(1.0,))),))
    assert same is x and plain is x
    assert torch.equal(zeros, torch.zeros_like(x))


def test_threshold_and_clip_match_imagen_definitions():
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): s = max(q-quantile of |x0|, 1),
    x0 -> clamp(x0, -s, s) / s; then the static clip. Checked directly in float64 on a case
    with known quantiles, and the kernel against it."""
    row = torch.tensor([[-4.0, -1.0, 0.5, 2.0, 3.0]], dtype=torch.float64)
    x0 = torch.cat([row, row / 10]).to(DEVICE)  # second sample: quantile below 1, s = 1
    p = Prediction(branches=(x0,), weights=(1.0,), threshold=0.75)
    # |row| sorted = [0.5, 1, 2, 3, 4]; the 0.75 quantile at position 3 is 3.0
    expected = torch.stack([row[0].clamp(-3.0, 3.0) / 3.0, (row[0] / 10).clamp(-1.0, 1.0)]).to(DEVICE)
    assert torch.allclose(TORCH.step(((1.0, p),))[0], expected, rtol=0, atol=1e-15)
    (got,) = TRITON.step(((1.0, attrs.evolve(p, branches=(x0.float(),))),))
    assert torch.allclose(got.double(), expected, rtol=0, atol=4 * U32)
    clipped = attrs.evolve(p, threshold=None, clip=0.25, branches=(x0.float(),))
    assert torch.equal(TRITON.step(((1.0, clipped),))[0], x0.float().clamp(-0.25, 0.25))


def test_nan_propagates_through_clamps():
    """A NaN in the prediction stays NaN through threshold and clip (as torch.clamp), so the
    sampler's finiteness check still sees it."""
    x0 = torch.tensor([[0.5, float("nan"), -2.0, 1.0]], device=DEVICE)
    (got,) = TRITON.step(((1.0, Prediction(branches=(x0,), weights=(2.0,), clip=1.0)),))
    assert torch.isnan(got[0, 1]) and torch.equal(got[0, [0, 2, 3]], torch.tensor([1.0, -1.0, 1.0], device=DEVICE))


def test_user_errors_name_the_cause():
    """float64 operands, mismatched shapes and tensor coefficients are refused with a message;
    an explicitly requested triton backend that cannot run is an error."""
    x = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(FundiffError, match="float64"):
        TRITON.step(((0.5, x.double()), (0.5, x.double())))
    with pytest.raises(ValueError, match="share one shape"):
        TRITON.step(((0.5, x), (0.5, torch.randn(2, 4, device=DEVICE))))
    with pytest.raises(FundiffError, match="host floats"):
        TRITON.step(((torch.tensor(0.5), x),))
    with pytest.raises(FundiffError, match="unknown fused-step backend"):
        fused.executor(x, "cuda")
    with pytest.raises(FundiffError, match="float64"):
        fused.executor(x.double(), "triton")


def test_explicit_triton_on_the_cpu_without_the_interpreter_is_an_error(monkeypatch):
    """An explicitly requested backend that cannot run is an error naming the fix."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FundiffError, match="CUDA tensors"):
        fused.executor(torch.zeros(2, 3), "triton")
    assert isinstance(fused.executor(torch.zeros(2, 3), "auto"), fused.TorchExecutor)


def test_automatic_fallback_is_logged_once(caplog):
    """auto picks triton only for float32 / half CUDA tensors; on a CUDA tensor it cannot
    fuse (float64 here) it falls back to torch and says so once in the log."""

    class CudaDouble:  # stands in for a float64 CUDA tensor: the choice reads device and dtype only
        device = torch.device("cuda")
        dtype = torch.float64

    fused._logged.clear()
    with caplog.at_level("WARNING", logger="fundiff.fused"):
        for _ in range(3):
            assert isinstance(fused.executor(CudaDouble(), "auto"), fused.TorchExecutor)
    records = [r for r in caplog.records if r.name == "fundiff.fused"]
    assert len(records) == 1 and "torch backend" in records[0].getMessage() and "float64" in records[0].getMessage()


def test_steps_that_need_gradients_fall_back_or_are_refused(caplog):
    """The kernels have no backward: with autograd on and an operand that requires gradients,
    an automatically chosen triton executor runs the step with torch (gradients flow, logged
    once), an explicitly chosen one refuses with a message naming the fix."""
    from fundiff.fused.triton_backend import TritonExecutor

    x = torch.randn(2, 5, device=DEVICE, requires_grad=True)
    c, u = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    p = Prediction(branches=(c, u), weights=(2.0, -1.0))
    fused._logged.clear()
    with caplog.at_level("WARNING", logger="fundiff.fused"):
        (out,) = TritonExecutor(DEVICE, automatic=True).step(((0.5, x), (1.5, p)))
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))
    assert torch.allclose(out, 0.5 * x + 1.5 * (2 * c - u), rtol=0, atol=1e-5)
    assert any("require gradients" in r.getMessage() for r in caplog.records)
    with pytest.raises(FundiffError, match="no backward"):
        TRITON.step(((0.5, x), (1.5, p)))
    with torch.no_grad():
        TRITON.step(((0.5, x), (1.5, p)))  # under no_grad the kernel runs
