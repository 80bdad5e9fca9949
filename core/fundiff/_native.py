"""fundiff's compiled host code: fundiff/_native.c, built once per machine and loaded with ctypes.

Two things, both accelerators only:

- the random-number generator. fundiff's noise is a pure function of (seed, stream, draw,
  sample id, element) (see :mod:`fundiff.rng`). NumPy computes it at about 30 ns a normal on
  one core, which dominates a stochastic sampler's step at large batches; the C version of
  the same arithmetic, vectorised by the compiler, takes about 2 ns. The Philox words are
  identical bit for bit, the uniforms too, and the float64 normals differ from NumPy's by
  the math libraries' log, sin and cos (a few ulp; tests/test_rng_native.py states the bound).
- the CPU form of a fused sampling step (:mod:`fundiff.fused`): out = sum_i c_i T_i (+ c_z
  z, drawn as it is added) in one pass over memory, where torch makes one pass per term. It
  rounds as the torch operations do on a CPU with FMA (tests/test_native_steps.py).

Building: the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) compiles the file
into the cache directory (``$FUNDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/fundiff``, else
``~/.cache/fundiff``), named by a hash of the source, the compiler, its flags and the CPU's
feature flags (the build uses ``-march=native``), so a machine reuses its build and another
machine sharing the directory makes its own. The library is checked against the NumPy code
before use. Without a compiler, when the build or the check fails, or with
``FUNDIFF_NATIVE=0``, fundiff uses NumPy and says why once in the log (``fundiff.rng``: a
warning when a build failed, info otherwise).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("fundiff.rng")

ABI_VERSION = 5
SOURCE = Path(__file__).with_name("_native.c")

#: compiler flags, best first; the first that builds and passes the check is used.
#: -ffp-contract=off: no implicit fused multiply-adds (NumPy's Box-Muller has none; the
#: steps' are explicit fma calls, as torch's add_ does them);
#: vector math: glibc's libmvec variants of log / sin / cos in the `omp simd` loops (sin and
#: cos stay separate calls, not a scalar sincos, so that the loop vectorises);
#: -fopenmp only where torch runs on GNU OpenMP (see _torch_uses_libgomp).
_COMMON = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_VECTOR_MATH = ["-DFUNDIFF_VECTOR_MATH", "-fno-builtin-sin", "-fno-builtin-cos"]
_OPENMP = (["-fopenmp", "-march=native", *_VECTOR_MATH], ["-lmvec", "-lm"])
FLAG_SETS: list[tuple[list[str], list[str]]] = [
    (["-fopenmp-simd", "-march=native", *_VECTOR_MATH], ["-lmvec", "-lm"]),
    (["-fopenmp-simd", "-march=native"], ["-lm"]),
    ([], ["-lm"]),
]


def _torch_uses_libgomp() -> bool:
    """True when the process has GNU libgomp loaded (torch's CPU wheels ship and load their
    own libgomp.so.1 on Linux). A library built with -fopenmp then binds to that same copy by
    its soname, and its parallel loops run on torch's intra-op threads; built against another
    OpenMP runtime, its threads would contend with torch's (whose idle workers spin-wait), so
    the library is built without OpenMP and the rows are split over Python threads instead."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


#: elements per thread below which a call runs on the calling thread alone: drawing normals
#: costs about 1 ns an element, a step without noise about 0.1 ns (measured on 2 cores:
#: below these a second thread costs more than it saves)
DRAW_GRAIN = 1 << 13
STEP_GRAIN = 1 << 16

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def status() -> str:
    """"compiled" when the C library is in use, else "numpy (<why>)" (builds on first call)."""
    return "compiled" if library() is not None else f"numpy ({_why_not})"


def library() -> ctypes.CDLL | None:
    """The loaded C library, or None when fundiff uses NumPy and torch (reason in the log)."""
    global _library, _tried, _why_not
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load()
            except _Unavailable as exc:
                _why_not = str(exc)
                # a build that failed is worth a warning; no compiler, or FUNDIFF_NATIVE=0, is a setting
                level = logging.WARNING if exc.build_failed else logging.INFO
                logger.log(
                    level, "compiled host code unavailable (%s); drawing random numbers with NumPy (same numbers, slower)", exc
                )
            _tried = True
    return _library


def reset() -> None:
    """Forget the loaded library so the next call builds or loads again (tests use this)."""
    global _library, _tried, _why_not
    with _lock:
        _library, _tried, _why_not = None, False, None


class _Unavailable(Exception):
    def __init__(self, message: str, *, build_failed: bool = False):
        super().__init__(message)
        self.build_failed = build_failed


def cache_dir() -> Path:
    if os.environ.get("FUNDIFF_CACHE_DIR"):
        return Path(os.environ["FUNDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fundiff"


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)  # type: ignore[return-value]
    raise _Unavailable("no C compiler found ($CC, cc, gcc, clang)")


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the processor name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()[0] if done.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _load() -> ctypes.CDLL:
    if os.environ.get("FUNDIFF_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("FUNDIFF_NATIVE=0")
    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        raise _Unavailable(f"cannot read {SOURCE.name}: {exc}") from None
    cc = _compiler()
    version, cpu = _compiler_version(cc), _cpu_flags()
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        writable = os.access(directory, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # a read-only home: build for this process only
        directory = Path(tempfile.mkdtemp(prefix="fundiff-native-"))
    errors = []
    for flags, libs in ([_OPENMP] if _torch_uses_libgomp() else []) + FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags + libs).encode(), cpu.encode(), platform.platform().encode()]))
        target = directory / f"native-{digest.hexdigest()[:20]}{'.dll' if sys.platform == 'win32' else '.so'}"
        if target.exists():
            try:
                return _checked(ctypes.CDLL(str(target)))
            except (OSError, _Unavailable) as exc:  # a corrupt or stale file: build it again
                errors.append(f"cached {target.name}: {exc}")
        try:
            _build(cc, flags, libs, target)
            return _checked(ctypes.CDLL(str(target)))
        except (OSError, subprocess.SubprocessError, _Unavailable) as exc:
            errors.append(f"{' '.join(flags) or 'plain'}: {exc}")
    raise _Unavailable("; ".join(errors), build_failed=True)


def _build(cc: str, flags: list[str], libs: list[str], target: Path) -> None:
    # compile to a private name, then rename: processes building at once never load a half-written file
    fd, partial = tempfile.mkstemp(prefix=target.stem + "-", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *_COMMON, *flags, "-o", partial, str(SOURCE), *libs], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise _Unavailable(f"compiler exit {done.returncode}: {last}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_uint32] * 4 + [ctypes.c_void_p, ctypes.c_int]
_FUNCTIONS = ("fundiff_philox_words", "fundiff_philox_uniform", "fundiff_philox_normal_f64", "fundiff_philox_normal_f32")
_STEP_NOISE_FUNCTIONS = ("fundiff_step_normal_f64", "fundiff_step_normal_f32")
_STEP_FUNCTIONS = ("fundiff_step_f64", "fundiff_step_f32")


def _checked(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the signatures, then compare with the NumPy code on a few counters: a library that
    disagrees (a miscompile, another source version) is not used."""
    try:
        lib.fundiff_native_abi.restype = ctypes.c_int
        if lib.fundiff_native_abi() != ABI_VERSION:
            raise _Unavailable("ABI version mismatch")
        lib.fundiff_native_openmp.restype = ctypes.c_int
        lib.openmp = bool(lib.fundiff_native_openmp())
        for name in _FUNCTIONS + _STEP_NOISE_FUNCTIONS:
            extra = [ctypes.c_double, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] if name in _STEP_NOISE_FUNCTIONS else []
            getattr(lib, name).argtypes = _ARGS + extra
            getattr(lib, name).restype = None
        for name in _STEP_FUNCTIONS:
            getattr(lib, name).argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            getattr(lib, name).restype = None
    except AttributeError as exc:
        raise _Unavailable(f"missing symbol: {exc}") from None
    from . import rng

    ids = torch.tensor([0, 1, 2**32 + 5, 2**48 - 1])
    key = (0x0123456789ABCDEF, 7, 2**32 - 1)
    for n in (1, 6, 1030):  # one partial block; a partial last pass of more than one pass
        words = torch.empty(len(ids), n, dtype=torch.int32)
        _call(lib, "fundiff_philox_words", ids, n, rng._counter_words(*key), words, parallel=False)
        expected = rng._raw_bits_numpy(*key, ids, n)[:, :n]
        if not np.array_equal(words.numpy().view(np.uint32).astype(np.int64), expected):
            raise _Unavailable("its Philox words differ from the NumPy reference")
        z = torch.empty(len(ids), n, dtype=torch.float64)
        _call(lib, "fundiff_philox_normal_f64", ids, n, rng._counter_words(*key), z, parallel=False)
        reference = rng._normal_numpy(*key, ids, n)
        if not np.allclose(z.numpy(), reference, rtol=1e-13, atol=1e-15):
            raise _Unavailable("its normals differ from the NumPy reference")
    x = torch.linspace(-3.0, 3.0, 5000, dtype=torch.float64)
    square = x * x
    out = torch.empty_like(x)
    lib.fundiff_step_f64(x.numel(), out.data_ptr(), 1, 2, (ctypes.c_void_p * 2)(x.data_ptr(), square.data_ptr()), (ctypes.c_double * 2)(0.5, -0.25))
    if not torch.allclose(out, 0.5 * x - 0.25 * square, rtol=1e-15, atol=1e-15):
        raise _Unavailable("its step arithmetic differs from torch's")
    return lib


def _thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < workers:  # a forked child has no threads
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fundiff-rng")
        _pool_pid = os.getpid()
    return _pool


def _call(
    lib: ctypes.CDLL,
    name: str,
    ids: torch.Tensor,
    n: int,
    counter: tuple[int, int, int, int],
    out: torch.Tensor,
    *extra: float,
    parallel: bool = True,
) -> torch.Tensor:
    """Run one of the C functions on int64 ``ids`` into the contiguous ``out`` (rows x n) with
    torch's intra-op thread count when the work is large: inside the library where it has
    OpenMP, else by rows over Python threads (ctypes releases the GIL)."""
    function = getattr(lib, name)
    ids = ids.contiguous()
    rows = ids.numel()
    threads = max(1, min(torch.get_num_threads(), (rows * n) // DRAW_GRAIN)) if parallel else 1
    if threads == 1 or lib.openmp:
        function(ids.data_ptr(), rows, n, *counter, out.data_ptr(), threads, *extra)
        return out
    item = out.element_size()
    bounds = [rows * w // threads for w in range(threads + 1)]
    jobs = [
        _thread_pool(threads).submit(function, ids.data_ptr() + 8 * a, b - a, n, *counter, out.data_ptr() + item * n * a, 1, *extra)
        for a, b in zip(bounds[1:-1], bounds[2:])
        if b > a
    ]
    function(ids.data_ptr(), bounds[1], n, *counter, out.data_ptr(), 1, *extra)  # the first share on this thread
    for job in jobs:
        job.result()
    return out


def words(seed: int, stream: int, draw: int, ids: torch.Tensor, n: int) -> torch.Tensor | None:
    """(rows, n) int64 tensor of Philox words (uint32 values), or None without the library."""
    lib = library()
    if lib is None:
        return None
    from . import rng

    out = torch.empty(ids.numel(), n, dtype=torch.int32)
    _call(lib, "fundiff_philox_words", ids, n, rng._counter_words(seed, stream, draw), out)
    return out.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def uniform(seed: int, stream: int, draw: int, ids: torch.Tensor, n: int) -> torch.Tensor | None:
    """(rows, n) float64 uniforms, or None without the library."""
    lib = library()
    if lib is None:
        return None
    from . import rng

    out = torch.empty(ids.numel(), n, dtype=torch.float64)
    return _call(lib, "fundiff_philox_uniform", ids, n, rng._counter_words(seed, stream, draw), out)


def normal(seed: int, stream: int, draw: int, ids: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(rows, n) normals in float64 or float32 (the float64 value rounded once), or None
    without the library."""
    lib = library()
    if lib is None:
        return None
    from . import rng

    name = "fundiff_philox_normal_f32" if dtype == torch.float32 else "fundiff_philox_normal_f64"
    out = torch.empty(ids.numel(), n, dtype=torch.float32 if dtype == torch.float32 else torch.float64)
    return _call(lib, name, ids, n, rng._counter_words(seed, stream, draw), out)


def _plain_tensors(tensors) -> bool:
    """Whether the library may read these tensors' memory: not while torch.compile traces (it
    would break the graph), and not for tensors without storage of their own (torch.func's
    vmap and grad wrappers), where the torch operations do the work instead."""
    if torch.compiler.is_compiling():
        return False
    try:
        for t in tensors:
            t.data_ptr()
    except RuntimeError:
        return False
    return True


def add_normal(seed: int, stream: int, draw: int, ids: torch.Tensor, out: torch.Tensor, scale: float) -> bool:
    """``out += scale * normal(...)`` in place on a contiguous CPU float32 / float64 ``out`` of
    ``len(ids)`` rows; False (nothing done) without the library."""
    lib = library()
    if lib is None or not _plain_tensors((out,)):
        return False
    from . import rng

    name = "fundiff_step_normal_f32" if out.dtype == torch.float32 else "fundiff_step_normal_f64"
    # a step with no tensor terms: out += scale * z (rows split freely: there are no inputs to offset)
    _call(lib, name, ids, out.numel() // max(1, ids.numel()), rng._counter_words(seed, stream, draw), out, float(scale), 0, None, None)
    return True


#: the smallest step (elements) worth a call into the library, without and with fresh noise:
#: below them torch's operations (and the in-place noise of rng.add_normal_) cost less than
#: the call and its argument checks (measured crossovers on 2 cores: about 2^17 and 2^12)
STEP_MIN_ELEMENTS = 1 << 17
STEP_NOISE_MIN_ELEMENTS = 1 << 12
_STEP_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def step(coefficients: list[float], tensors: list[torch.Tensor], noise=None, noise_coefficient: float = 0.0) -> torch.Tensor | None:
    """``sum_i coefficients[i] tensors[i] (+ noise_coefficient * noise)`` in one pass into a new
    tensor, rounded as ``tensors[0] * c_0`` then ``add_(T_i, alpha=c_i)`` in order (then
    ``add_(noise)``) round on a CPU with FMA; ``noise`` a :class:`fundiff.fused.PhiloxNormal`.

    None (nothing done) without the library, or when the operands do not fit: every tensor
    contiguous, on the CPU, float32 or float64 alike, of one shape, not requiring grad where
    grad is on, with storage of its own, and not under torch.compile.
    """
    first = tensors[0]
    suffix = _STEP_DTYPES.get(first.dtype)
    if suffix is None or first.device.type != "cpu" or not _plain_tensors(tensors):
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype != first.dtype or t.shape != first.shape or not t.is_contiguous() or t.device.type != "cpu" or (grad and t.requires_grad):
            return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty_like(first, memory_format=torch.contiguous_format)
    count = len(tensors)
    pointers = (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])
    coefs = (ctypes.c_double * count)(*coefficients)
    if noise is None:
        threads = max(1, min(torch.get_num_threads(), first.numel() // STEP_GRAIN)) if lib.openmp else 1
        getattr(lib, f"fundiff_step_{suffix}")(first.numel(), out.data_ptr(), threads, count, pointers, coefs)
        return out
    if noise.shape != first.shape:
        return None
    from . import rng

    ids = noise.sample_ids.contiguous()
    rows = ids.numel()
    n = first.numel() // max(1, rows)
    threads = max(1, min(torch.get_num_threads(), first.numel() // DRAW_GRAIN)) if lib.openmp else 1
    getattr(lib, f"fundiff_step_normal_{suffix}")(
        ids.data_ptr(), rows, n, *rng._counter_words(noise.seed, noise.stream, noise.draw), out.data_ptr(), threads,
        float(noise_coefficient), count, pointers, coefs,
    )
    return out
