"""Per-sample random streams: sample i gets the same numbers whatever the batch.

fundiff draws every random number (the prior, the fresh noise of a stochastic sampler step,
the training noise, data indices, noise levels) from a counter-based generator, Philox4x32-10
(Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), computed by the
compiled host code of :mod:`fundiff._native` where it builds and by the NumPy code here
otherwise (the same words bit for bit). A number is a pure function of

    key     = the 64-bit seed
    counter = (element block, draw index, sample index, stream id)

so a sample's numbers depend on its global index, not on the batch it is computed in or on
its position there; there is no generator state to save, checkpoint or restore. The same
construction runs inside a GPU kernel (Triton's ``tl.randn`` is Philox too), which is what
the fused sampling steps build on.

Stream ids used by the core are below; third-party code picks ids from 1000 to 65535.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import _native

STREAM_PRIOR = 1  # the initial state of a sampler
STREAM_SAMPLER = 2  # fresh noise inside sampler steps, draw index = step (and sub-step)
STREAM_TRAIN_NOISE = 3  # perturbation noise during training, draw index = optimizer step
STREAM_TRAIN_LEVEL = 4  # noise levels during training
STREAM_TRAIN_DATA = 5  # which data examples form a batch
STREAM_TRAIN_COND = 6  # condition dropout during training
STREAM_DATA = 7  # data sets that generate their points
STREAM_BROWNIAN = 8  # Brownian-tree nodes of the SDE samplers (fundiff.brownian)
#: a chain's own training draws (``Chain.training_losses``): draw k >= 1 of optimizer step s
#: uses stream STREAM_TRAIN_CHAIN + k with draw index s (k < 2^15)
STREAM_TRAIN_CHAIN = 2**15

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85


def _philox_rounds(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on numpy uint64 arrays holding uint32 values.

    numpy on the host: a 32x32-bit product fits uint64 exactly, so each round is a handful
    of whole-array operations (far fewer, and cheaper per call, than torch for the small
    arrays of a sampling loop).
    """
    m0, m1 = np.uint64(_PHILOX_M0), np.uint64(_PHILOX_M1)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    for _ in range(10):
        p0 = c0 * m0
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ np.uint64(k0), p1 & mask, (p0 >> shift) ^ c3 ^ np.uint64(k1), p0 & mask
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox4x32(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds; counters are integer tensors (or arrays) of uint32 values.

    Returns four int64 tensors of uint32 values.
    """
    words = [np.asarray(c.numpy() if isinstance(c, torch.Tensor) else c).astype(np.uint64) for c in (c0, c1, c2, c3)]
    out = _philox_rounds(*words, int(k0), int(k1))
    return tuple(torch.from_numpy(w.astype(np.int64)) for w in out)  # type: ignore[return-value]


def refuse_host_draw(device: torch.device, what: str = "the sampler's fresh noise") -> None:
    """Raise when numbers drawn here, on the host, are about to be copied to a CUDA device
    inside a CUDA graph capture: the captured copy would replay stale host memory."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        from .errors import FundiffError

        raise FundiffError(
            f"{what} is drawn on the host and cannot be captured in a CUDA graph; use sample.backend: triton "
            "(noise drawn in the kernels) with gaussian noise and fresh (not brownian) draws, or set sample.cuda_graphs: false"
        )


def _uniform_from_bits(bits):
    """uint32 -> float64 uniform on the open interval (0, 1) (tensor in, tensor out; array in, array out)."""
    if isinstance(bits, torch.Tensor):
        return (bits.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    return (bits.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return seed


def _counter_words(seed: int, stream: int, draw: int) -> tuple[int, int, int, int]:
    """(key0, key1, counter1, counter3 before the sample id's high bits are xor-ed in): the
    Philox key and the counter words that one (seed, stream, draw) fixes."""
    return seed & _MASK32, (seed >> 32) & _MASK32, draw & _MASK32, ((stream & 0xFFFF) << 16) ^ ((draw >> 32) & 0xFFFF)


def _validate(stream: int, draw: int, sample_ids: torch.Tensor) -> None:
    """Each counter field must fit its bits, or two different (stream, draw, sample) triples
    would share a counter."""
    if not 0 <= stream < 2**16:
        raise ValueError(f"stream must be in [0, 65535], got {stream!r}")
    if not 0 <= draw < 2**32:
        raise ValueError(f"draw index must be in [0, 2^32), got {draw!r}")
    if sample_ids.numel() and not (0 <= int(sample_ids.min()) and int(sample_ids.max()) < 2**48):
        raise ValueError(
            f"sample ids must be in [0, 2^48), got values in [{int(sample_ids.min())}, {int(sample_ids.max())}]"
        )


def _raw_bits_numpy(seed: int, stream: int, draw: int, sample_ids: torch.Tensor, n_per_sample: int) -> np.ndarray:
    """Four uint32 words per counter, in NumPy: a (B, 4 * blocks) uint64 array of random bits.

    Counter words: c0 = element block, c1 = draw, c2 = low 32 bits of the sample id,
    c3 = stream (high 16 bits) | high 16 bits of the sample id. The reference for the
    compiled generator (fundiff/_native.c), which gives the same words.
    """
    blocks = max(1, math.ceil(n_per_sample / 4))
    batch = sample_ids.numel()
    k0, k1, ctr1, ctr3 = _counter_words(seed, stream, draw)
    ids = sample_ids.numpy().astype(np.uint64).reshape(batch, 1)
    c0 = np.broadcast_to(np.arange(blocks, dtype=np.uint64), (batch, blocks))
    c2 = ids & np.uint64(_MASK32)
    c3 = np.uint64(ctr3) ^ (ids >> np.uint64(32))
    words = _philox_rounds(c0, np.uint64(ctr1), c2, c3, k0, k1)
    words = np.broadcast_arrays(*words)
    return np.stack(words, axis=-1).reshape(batch, blocks * 4)


def _raw_bits(seed: int, stream: int, draw: int, sample_ids: torch.Tensor, n_per_sample: int) -> torch.Tensor:
    """The first ``n_per_sample`` Philox words of each sample: (B, n) int64 tensor of uint32 values."""
    _validate(stream, draw, sample_ids)
    words = _native.words(seed, stream, draw, sample_ids, n_per_sample)
    if words is None:
        words = torch.from_numpy(_raw_bits_numpy(seed, stream, draw, sample_ids, n_per_sample)[:, :n_per_sample].astype(np.int64))
    return words


def _normal_numpy(seed: int, stream: int, draw: int, sample_ids: torch.Tensor, n: int) -> np.ndarray:
    """(B, n) float64 Box-Muller normals in NumPy: pair p of a sample takes words 2p (radius,
    r = sqrt(-2 ln u)) and 2p + 1 (angle, 2 pi u), u = (word + 1/2) 2^-32."""
    pairs = max(1, math.ceil(n / 2))
    u = _uniform_from_bits(_raw_bits_numpy(seed, stream, draw, sample_ids, 2 * pairs)[:, : 2 * pairs])
    u1, u2 = u[:, 0::2], u[:, 1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = (2.0 * math.pi) * u2
    z = np.stack((radius * np.cos(angle), radius * np.sin(angle)), axis=-1).reshape(sample_ids.numel(), 2 * pairs)
    return np.ascontiguousarray(z[:, :n])


def uniform(
    seed: int, stream: int, draw: int, sample_ids: torch.Tensor | Sequence[int], shape: Sequence[int] = ()
) -> torch.Tensor:
    """Uniforms on (0, 1), float64 on the CPU, shape ``(len(sample_ids), *shape)``."""
    _check_seed(seed)
    sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
    _validate(stream, draw, sample_ids)
    n = math.prod(shape)
    u = _native.uniform(seed, stream, draw, sample_ids, n)
    if u is None:
        u = torch.from_numpy(_uniform_from_bits(_raw_bits_numpy(seed, stream, draw, sample_ids, n)[:, :n]))
    return u.reshape(sample_ids.numel(), *shape)


def normal(
    seed: int,
    stream: int,
    draw: int,
    sample_ids: torch.Tensor | Sequence[int],
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Standard normals (Box-Muller on Philox uniforms, computed in float64) on the CPU.

    Shape ``(len(sample_ids), *shape)``; row i depends only on (seed, stream, draw,
    sample_ids[i]). In ``dtype``: the float64 value rounded once (float32 is written so
    directly, without a float64 tensor in between).

    The compiled generator (:mod:`fundiff._native`) and the NumPy fallback give the same
    Philox words; their float64 normals differ by their math libraries' log, sin and cos, a
    few ulp, and so their float32 normals almost never (where a float64 value lies within
    those ulp of a float32 rounding boundary).
    """
    _check_seed(seed)
    sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
    _validate(stream, draw, sample_ids)
    n = math.prod(shape)
    direct = dtype if dtype in (torch.float32, torch.float64) else torch.float64
    z = _native.normal(seed, stream, draw, sample_ids, n, direct)
    if z is None:
        z = torch.from_numpy(_normal_numpy(seed, stream, draw, sample_ids, n))
    return z.reshape(sample_ids.numel(), *shape).to(dtype)


def add_normal_(
    out: torch.Tensor,
    scale: float,
    seed: int,
    stream: int,
    draw: int,
    sample_ids: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """``out.add_(normal(seed, stream, draw, sample_ids, out.shape[1:], out.dtype), alpha=scale)``
    without the noise tensor: on a contiguous CPU float32 / float64 ``out`` the compiled
    generator adds the normals as it draws them (one pass, no allocation; each element one
    fused multiply-add, as torch's ``add_`` rounds on a CPU with FMA). Elsewhere, or without
    the compiled generator, the noise is drawn and added with ``add_``. Returns ``out``."""
    _check_seed(seed)
    sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
    _validate(stream, draw, sample_ids)
    if out.shape[:1] != (sample_ids.numel(),):
        raise ValueError(f"out has {tuple(out.shape)[:1]} rows for {sample_ids.numel()} sample ids")
    if not (
        out.device.type == "cpu"
        and out.dtype in (torch.float32, torch.float64)
        and out.is_contiguous()
        and not out.requires_grad
        and _native.add_normal(seed, stream, draw, sample_ids, out, scale)
    ):
        refuse_host_draw(out.device)
        z = normal(seed, stream, draw, sample_ids, tuple(out.shape[1:]), dtype=out.dtype)
        out.add_(z.to(out.device), alpha=scale)
    return out


class NoiseStream:
    """Random numbers for one batch of samples, keyed by (seed, stream, global sample index).

    ``normal(draw)`` returns a tensor of shape ``(batch, *sample_shape)`` on ``device`` in
    ``dtype``; calling it twice with the same draw index gives the same numbers. Samplers
    use the step index (and a sub-step offset) as the draw index.
    """

    def __init__(
        self,
        seed: int,
        sample_ids: torch.Tensor | Sequence[int],
        sample_shape: Sequence[int],
        *,
        stream: int = STREAM_SAMPLER,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.seed = _check_seed(seed)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.stream = stream
        self.device = torch.device(device)
        self.dtype = dtype
        self._device_ids: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.sample_ids.numel()

    @property
    def device_ids(self) -> torch.Tensor:
        """The sample ids on ``device`` (copied once): what a fused kernel drawing this stream's
        noise reads, and what a replayed CUDA graph gets new ids through (updated in place)."""
        if self._device_ids is None:
            self._device_ids = self.sample_ids.to(self.device)
        return self._device_ids

    def philox(self, draw: int):
        """``normal(draw)`` by its key instead of its values: a :class:`fundiff.fused.PhiloxNormal`
        that a fused sampling step draws inside its kernel from the same Philox counters."""
        from .fused.step import PhiloxNormal

        return PhiloxNormal(
            seed=self.seed,
            stream=self.stream,
            draw=draw,
            sample_ids=self.sample_ids,
            sample_shape=self.sample_shape,
            device_ids=self.device_ids,
        )

    def normal(self, draw: int) -> torch.Tensor:
        refuse_host_draw(self.device)
        z = normal(self.seed, self.stream, draw, self.sample_ids, self.sample_shape, dtype=self.dtype)
        return z.to(device=self.device, non_blocking=True)

    def sample(self, draw: int) -> torch.Tensor:
        """The noise samplers draw: for a plain stream, standard normal (same as ``normal``).

        Samplers call ``noise.sample(draw)``; the pipeline passes a source that draws the
        recipe's noise type, so a stochastic sampler adds fresh noise of that type.
        """
        return self.normal(draw)

    def uniform(self, draw: int) -> torch.Tensor:
        refuse_host_draw(self.device)
        u = uniform(self.seed, self.stream, draw, self.sample_ids, self.sample_shape)
        return u.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def with_stream(self, stream: int) -> "NoiseStream":
        return NoiseStream(
            self.seed, self.sample_ids, self.sample_shape, stream=stream, device=self.device, dtype=self.dtype
        )
