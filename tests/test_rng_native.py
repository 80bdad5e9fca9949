"""The compiled generator (fundiff/_native.c via fundiff._native) against the NumPy reference
in fundiff.rng, and its build, cache and fallback behaviour.

What must hold, and why:

- Philox words and uniforms are integer arithmetic (uniforms: a word plus 1/2 times 2^-32,
  exact in float64): compiled and NumPy agree bit for bit.
- Normals are float64 Box-Muller, the same operations in the same order on both paths, so
  they differ only by the math libraries' log, sin and cos. Each is accurate to 4 ulp (glibc's
  libmvec documents 4 ulp for its vector variants; NumPy's float64 ufuncs stay within 4 ulp).
  In z = sqrt(-2 log u) cos(2 pi u'), log's relative error is halved by the square root, cos
  adds its own, and two roundings add 1/2 ulp each: at most 2 + 0.5 + 4 + 0.5 = 7 ulp from
  the exact value per path, 14 ulp between two paths; ULP_BOUND = 16.
- A compiled value depends only on its counter: not on the batch, the sample's position, the
  sample size (prefixes agree), the thread count or how the threads split the work.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fundiff import _native, rng
from fundiff.testing import seeds

ULP_BOUND = 16


def _compiler_found() -> bool:
    return any(c and shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang"))


needs_compiled = pytest.mark.skipif(
    not _compiler_found() or os.environ.get("FUNDIFF_NATIVE", "") == "0", reason="no C compiler here, or FUNDIFF_NATIVE=0"
)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A generator built (or not) from scratch in a private cache; the process's own is restored after."""
    monkeypatch.setenv("FUNDIFF_CACHE_DIR", str(tmp_path))
    _native.reset()
    yield tmp_path
    monkeypatch.undo()
    _native.reset()


@needs_compiled
def test_compiled_generator_builds_and_is_used():
    """With a C compiler present the compiled generator is in use (a build failure here would
    silently cost the 10-30x speed-up: this test makes it loud)."""
    assert _native.status() == "compiled", _native.status()


@needs_compiled
@given(
    seed=seeds(),
    stream=st.integers(0, 65535),
    draw=st.integers(0, 2**32 - 1),
    ids=st.lists(st.integers(0, 2**48 - 1), min_size=1, max_size=9, unique=True),
    n=st.integers(0, 1100),
)
@example(seed=0, stream=0, draw=0, ids=[0], n=1)
@example(seed=2**64 - 1, stream=65535, draw=2**32 - 1, ids=[2**48 - 1, 0, 2**32], n=1025)  # a second pass of a row
def test_compiled_matches_numpy(seed, stream, draw, ids, n):
    """Words and uniforms bit for bit; float64 normals within ULP_BOUND ulp; float32 normals
    are the compiled float64 values rounded once, and within half a float32 ulp plus the
    float64 bound of NumPy's values."""
    sample_ids = torch.tensor(ids)
    reference_words = rng._raw_bits_numpy(seed, stream, draw, sample_ids, n)[:, :n]
    assert np.array_equal(rng._raw_bits(seed, stream, draw, sample_ids, n).numpy(), reference_words.astype(np.int64))
    assert np.array_equal(rng.uniform(seed, stream, draw, sample_ids, (n,)).numpy(), rng._uniform_from_bits(reference_words))

    reference = rng._normal_numpy(seed, stream, draw, sample_ids, n)
    z64 = rng.normal(seed, stream, draw, sample_ids, (n,)).numpy()
    assert np.all(np.abs(z64 - reference) <= ULP_BOUND * np.spacing(np.abs(reference)))
    z32 = rng.normal(seed, stream, draw, sample_ids, (n,), dtype=torch.float32).numpy()
    assert z32.dtype == np.float32 and np.array_equal(z32, z64.astype(np.float32))
    half_ulp32 = 0.5 * np.spacing(np.abs(reference).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(z32 - reference) <= half_ulp32 + ULP_BOUND * np.spacing(np.abs(reference)))


@needs_compiled
@pytest.mark.parametrize("n", [2, 63, 64, 1024, 1030])
def test_compiled_value_depends_on_its_counter_only(n):
    """Batches large enough to take the parallel paths (OpenMP in the library, or rows split
    over Python threads) give row i the same numbers as a batch of one; so do other thread
    counts and a shorter sample (its prefix). Short rows are packed several to a task and long
    rows cut into tasks: both layouts are covered by the sizes."""
    ids = torch.arange(5, 5 + max(8, (1 << 18) // n)) * 7919
    one_thread = rng.normal(11, 3, 2, ids, (n,), dtype=torch.float32)
    previous = torch.get_num_threads()
    lib = _native.library()
    try:
        torch.set_num_threads(2)
        assert torch.equal(rng.normal(11, 3, 2, ids, (n,), dtype=torch.float32), one_thread)
        built_with_openmp = lib.openmp
        lib.openmp = not built_with_openmp  # the other split: Python threads over rows, or one call
        try:
            assert torch.equal(rng.normal(11, 3, 2, ids, (n,), dtype=torch.float32), one_thread)
        finally:
            lib.openmp = built_with_openmp
    finally:
        torch.set_num_threads(previous)
    for i in (0, len(ids) // 2, len(ids) - 1):
        assert torch.equal(rng.normal(11, 3, 2, ids[i : i + 1], (n,), dtype=torch.float32)[0], one_thread[i])
    assert torch.equal(rng.normal(11, 3, 2, ids[:3], (n // 2 + 1,), dtype=torch.float32), one_thread[:3, : n // 2 + 1])


def test_numpy_fallback_when_disabled(fresh_native, monkeypatch):
    """FUNDIFF_NATIVE=0: no build, the NumPy code draws (its normals exactly), and status says why."""
    monkeypatch.setenv("FUNDIFF_NATIVE", "0")
    assert _native.status() == "numpy (FUNDIFF_NATIVE=0)"
    assert list(fresh_native.iterdir()) == []
    ids = torch.tensor([3, 2**40])
    assert np.array_equal(rng.normal(5, 1, 0, ids, (9,)).numpy(), rng._normal_numpy(5, 1, 0, ids, 9))
    z32 = rng.normal(5, 1, 0, ids, (9,), dtype=torch.float32)
    assert torch.equal(z32, torch.from_numpy(rng._normal_numpy(5, 1, 0, ids, 9)).float())


def test_no_compiler_is_a_setting_not_a_fault(fresh_native, monkeypatch, caplog):
    """No C compiler on the PATH: NumPy draws, status says so, and the log line is info (a
    machine without a compiler is not broken)."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh_native))
    caplog.set_level(logging.INFO, logger="fundiff.rng")
    assert _native.status() == "numpy (no C compiler found ($CC, cc, gcc, clang))"
    records = [r for r in caplog.records if r.name == "fundiff.rng"]
    assert len(records) == 1 and records[0].levelno == logging.INFO


def test_failed_build_falls_back_and_says_why(fresh_native, monkeypatch, caplog):
    """A compiler that fails every flag set: fundiff draws with NumPy and logs the reason once."""
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    caplog.set_level(logging.INFO, logger="fundiff.rng")
    assert _native.library() is None
    assert _native.status().startswith("numpy (") and "compiler exit 1" in _native.status()
    assert _native.library() is None
    records = [r for r in caplog.records if r.name == "fundiff.rng"]
    assert len(records) == 1 and "drawing random numbers with NumPy (same numbers, slower)" in records[0].getMessage()
    assert records[0].levelno == logging.WARNING  # a compiler that fails is a fault worth showing
    ids = torch.tensor([1, 2])
    assert np.array_equal(rng.uniform(5, 1, 0, ids, (6,)).numpy(), rng._uniform_from_bits(rng._raw_bits_numpy(5, 1, 0, ids, 6)[:, :6]))


_PROBE = textwrap.dedent(
    """
    import torch
    from fundiff import _native, rng
    print(_native.status())
    print(repr(rng.normal(7, 2, 1, torch.tensor([0, 9]), (5,)).tolist()))
    """
)


@needs_compiled
def test_corrupt_cached_library_is_rebuilt(tmp_path):
    """A cached library that does not load (here: truncated to garbage) is built again, not
    trusted or fatal; the numbers are those of a fresh build."""
    env = {**os.environ, "FUNDIFF_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    built = [p for p in tmp_path.iterdir() if p.suffix in (".so", ".dll")]
    assert len(built) == 1 and first.stdout.splitlines()[0] == "compiled"
    built[0].write_bytes(b"not a shared library")
    second = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert built[0].stat().st_size > 1000


def _draw_in_child(queue) -> None:
    torch.set_num_threads(1)  # as torch.utils.data's worker loop does
    queue.put((torch.get_num_threads(), torch.ones(1 << 20).sum().item()))
    queue.put(rng.normal(7, 2, 1, torch.arange(4096), (64,), dtype=torch.float32).sum().item())


@needs_compiled
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_draws_after_parent_used_threads():
    """A process forked after the parent drew with two threads, which sets one thread as
    torch's data-loader workers do, draws the same numbers and does not hang. (GNU OpenMP is
    not fork-safe: a forked child that keeps two threads hangs in torch's own parallel ops
    just as in the generator's, which runs on torch's libgomp and so follows torch's rule.)"""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = rng.normal(7, 2, 1, torch.arange(4096), (64,), dtype=torch.float32).sum().item()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_draw_in_child, args=(queue,))
        child.start()
        child.join(timeout=120)
    finally:
        torch.set_num_threads(previous)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the forked child hung or failed"
    threads, ones = queue.get(timeout=5)
    assert threads == 1 and ones == 1 << 20
    assert queue.get(timeout=5) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 64, 1030])
def test_add_normal_in_place_matches_drawing_then_adding(dtype, n):
    """rng.add_normal_(out, c, key) is out.add_(rng.normal(key), alpha=c) without the noise
    tensor: within one ulp of the result (both are one multiply-add per element; torch's CPU
    kernels fuse it where the CPU has FMA, as the compiled path does), and row i the same in any
    batch. Non-contiguous or half-precision outputs take the draw-then-add path exactly."""
    ids = torch.arange(40, 40 + max(4, 4096 // n))
    start = rng.normal(1, 9, 0, ids, (n,), dtype=dtype)
    expected = start.clone().add_(rng.normal(3, 2, 5, ids, (n,), dtype=dtype), alpha=0.37)
    got = rng.add_normal_(start.clone(), 0.37, 3, 2, 5, ids)
    assert got.dtype == dtype
    ulp = torch.from_numpy(np.spacing(np.abs(expected.numpy())))
    assert bool(((got - expected).abs() <= ulp).all())
    assert torch.equal(rng.add_normal_(start[1:2].clone(), 0.37, 3, 2, 5, ids[1:2])[0], got[1])
    strided = torch.zeros(n, len(ids), dtype=dtype).T  # not contiguous
    assert torch.equal(rng.add_normal_(strided, 2.0, 3, 2, 5, ids), 2.0 * rng.normal(3, 2, 5, ids, (n,), dtype=dtype))
    half = rng.add_normal_(torch.zeros(len(ids), n, dtype=torch.bfloat16), 1.0, 3, 2, 5, ids)
    assert torch.equal(half, rng.normal(3, 2, 5, ids, (n,), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        rng.add_normal_(torch.zeros(len(ids) + 1, n, dtype=dtype), 1.0, 3, 2, 5, ids)


def test_torch_backend_adds_fresh_noise_in_place():
    """The torch backend gets fresh noise as a Philox descriptor and adds it as it draws it: an
    ancestral step equals the step written with the noise tensor (to one ulp), with no
    noise-sized allocation beyond the output."""
    from fundiff import NoiseStream, fused
    from fundiff.fused.step import PhiloxNormal

    ids = torch.arange(300)
    stream = NoiseStream(4, ids, (6, 7))
    ex = fused.executor(torch.zeros(1), "torch")
    z = ex.noise(stream, 3)
    assert isinstance(z, PhiloxNormal)
    x, x0 = torch.randn(300, 6, 7, dtype=torch.float64).float(), torch.randn(300, 6, 7).float()
    (got,) = ex.step(((0.8, x), (0.3, x0), (0.5, z)))
    expected = (x * 0.8).add_(x0, alpha=0.3).add_(stream.normal(3), alpha=0.5)
    ulp = torch.from_numpy(np.spacing(np.abs(expected.numpy())))
    assert bool(((got - expected).abs() <= ulp).all())


@needs_compiled
@pytest.mark.parametrize("flag_set", range(len(_native.FLAG_SETS) + 1))
def test_every_build_variant_is_correct(flag_set, tmp_path):
    """Each compiler flag set the loader may fall back to (with OpenMP on torch's libgomp; with
    vector math; -march=native alone; plain) builds a library that passes the load-time check,
    gives NumPy's words bit for bit and normals within ULP_BOUND, and splits large draws over
    two threads (in the library with OpenMP, over Python threads without) without changing them."""
    import ctypes

    flags, libs = _native._OPENMP if flag_set == 0 else _native.FLAG_SETS[flag_set - 1]
    if flag_set == 0 and not _native._torch_uses_libgomp():
        pytest.skip("torch does not run on GNU OpenMP here")
    target = tmp_path / "variant.so"
    _native._build(_native._compiler(), flags, libs, target)
    lib = _native._checked(ctypes.CDLL(str(target)))
    assert lib.openmp == ("-fopenmp" in flags)
    ids = torch.arange(3, 3 + 4096) * 31
    counter = rng._counter_words(2**50 + 1, 7, 12)
    words = torch.empty(len(ids), 70, dtype=torch.int32)
    _native._call(lib, "fundiff_philox_words", ids, 70, counter, words)
    assert np.array_equal(words.numpy().view(np.uint32).astype(np.int64), rng._raw_bits_numpy(2**50 + 1, 7, 12, ids, 70)[:, :70].astype(np.int64))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = _native._call(lib, "fundiff_philox_normal_f64", ids, 70, counter, torch.empty(len(ids), 70, dtype=torch.float64))
    finally:
        torch.set_num_threads(previous)
    alone = _native._call(lib, "fundiff_philox_normal_f64", ids, 70, counter, torch.empty(len(ids), 70, dtype=torch.float64), parallel=False)
    assert torch.equal(split, alone)
    reference = rng._normal_numpy(2**50 + 1, 7, 12, ids, 70)
    assert np.all(np.abs(alone.numpy() - reference) <= ULP_BOUND * np.spacing(np.abs(reference)))
