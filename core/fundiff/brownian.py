"""Per-sample Brownian trees: Brownian-motion increments over any interval, on demand.

An SDE sampler that draws fresh noise per step gives each step an independent normal, so a
run with 20 steps and one with 40 steps follow unrelated Brownian paths. A *Brownian tree*
(the idea behind torchsde's ``BrownianTree`` and k-diffusion's ``BrownianTreeNoiseSampler``)
instead fixes one path W on [0, 1] per sample and answers W(b) - W(a) for any queried
interval, consistently: the same interval gives the same increment, increments over
adjacent intervals add up, and refining the grid refines the same path.

Construction (Levy-Ciesielski, i.e. Brownian bridges on the dyadic tree): W is evaluated at
points snapped to the grid m / 2^depth, where it is exactly

    W(u) = u z_root + sum_{k=0}^{depth-1} 2^(-k/2) tent(2^k u - j_k) z_{k, j_k},
    j_k = floor(2^k u),   tent(v) = min(v, 1 - v) on [0, 1],

with one standard normal per tree node: z_root is W(1), and z_{k, j} is the midpoint
displacement of the bridge over the cell [j 2^-k, (j + 1) 2^-k]. A point needs ``depth + 1``
normals, drawn in *one* vectorised Philox call (the nodes a point needs are known on the host),
so there is no recursion and no cache to keep in order. Each normal is a pure function of
(seed, stream, sample id, node) through :mod:`fundiff.rng`'s Philox4x32-10 with the counter

    (node id, element block, low 32 bits of the sample id, stream << 16 | high 16 bits),

the same key layout as ``fundiff.rng`` streams, so sample i's path is the same in any batch
and at any position, and does not depend on the order in which points are queried. Values
at queried points are memoised per tree (they are deterministic, so this only saves work).

Resolution: ``depth = 24`` snaps points to 6e-8; two query points closer than that would
share a grid point, which :meth:`BrownianTree.normal` refuses rather than divide by zero.
:func:`level_time` maps a noise level to the tree's time; with the default depth it resolves
logSNR to ~2e-6 near 0 and ~1e-3 at |logSNR| = 60.

This module names no design; SDE samplers use it through :class:`StepNoise`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from . import rng
from .noiselevel import Level

#: stream id of Brownian-tree nodes (reserved in fundiff.rng)
STREAM_BROWNIAN = rng.STREAM_BROWNIAN
#: default depth of the dyadic tree (points snapped to multiples of 2^-depth)
DEFAULT_DEPTH = 24
#: logSNR scale of the map from noise levels to tree time (see :func:`level_time`)
LEVEL_TIME_SCALE = 8.0
#: how many normals (batch x nodes x elements) one prefetch call may draw at most
_PREFETCH_BUDGET = 1 << 20


def level_time(level: Level) -> float:
    """Tree time of a noise level: u = sigmoid(-logSNR / 8), in [0, 1].

    0 at the clean level, 1 at logSNR = -inf, strictly decreasing in logSNR: a bounded,
    chain-free clock with resolution ~1e-6 in logSNR near 0 and ~1e-3 at |logSNR| = 60 for
    the default depth. Any monotone clock gives every step exactly N(0, 1) normalised noise
    and independent noise over disjoint steps; this one only decides how finely the path
    is resolved where.
    """
    lam = level.logsnr
    if lam == math.inf or level.sigma == 0.0:
        return 0.0
    if lam == -math.inf:
        return 1.0
    x = -lam / LEVEL_TIME_SCALE
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class BrownianTree:
    """One Brownian path W on [0, 1] per sample (W(0) = 0), evaluated on demand.

    ``seed`` and ``sample_ids`` key the paths exactly as :class:`fundiff.NoiseStream` keys
    its draws; ``sample_shape`` is the shape of one sample. :meth:`value` and
    :meth:`increment` return float64 CPU tensors of shape ``(batch, *sample_shape)``;
    :meth:`normal` returns the normalised increment in the tree's ``dtype`` on its ``device``.
    """

    def __init__(
        self,
        seed: int,
        sample_ids: torch.Tensor | Sequence[int],
        sample_shape: Sequence[int],
        *,
        depth: int = DEFAULT_DEPTH,
        stream: int = STREAM_BROWNIAN,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not 1 <= depth <= 31:
            raise ValueError(f"depth must be in [1, 31] (node ids are 32-bit), got {depth}")
        if not 0 <= stream < 2**16:
            raise ValueError(f"stream must be in [0, 65535], got {stream!r}")
        self.seed = rng._check_seed(seed)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
        if self.sample_ids.numel() and not (0 <= int(self.sample_ids.min()) and int(self.sample_ids.max()) < 2**48):
            raise ValueError("sample ids must be in [0, 2^48)")
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.depth = depth
        self.stream = stream
        self.device = torch.device(device)
        self.dtype = dtype
        self._numel = math.prod(self.sample_shape)
        self._blocks = max(1, math.ceil(self._numel / 4))  # 4 normals per Philox counter
        ids = self.sample_ids.numpy().astype(np.uint64)
        self._c2 = (ids & np.uint64(0xFFFFFFFF)).reshape(-1, 1, 1)
        self._c3 = (np.uint64(stream << 16) | (ids >> np.uint64(32))).reshape(-1, 1, 1)
        self._values: dict[int, np.ndarray] = {}

    @classmethod
    def from_source(cls, source: Any, **kwargs) -> "BrownianTree":
        """A tree keyed like a sampler's noise source: a :class:`fundiff.NoiseStream`, or an
        object whose ``stream`` attribute is one (the pipeline's source of the recipe's noise)."""
        stream = source if isinstance(source, rng.NoiseStream) else getattr(source, "stream", None)
        if not isinstance(stream, rng.NoiseStream):
            raise TypeError(
                "Brownian-tree noise needs a per-sample noise source (a fundiff.NoiseStream, or an object "
                f"with a .stream that is one) to key its paths by seed and sample id; got {type(source).__name__}"
            )
        kwargs.setdefault("device", stream.device)
        kwargs.setdefault("dtype", stream.dtype)
        return cls(stream.seed, stream.sample_ids, stream.sample_shape, **kwargs)

    @property
    def resolution(self) -> float:
        return 2.0**-self.depth

    def snap(self, u: float) -> int:
        """The grid index m of the point m / 2^depth nearest to u (u is clamped to [0, 1])."""
        if not (0.0 <= u <= 1.0):
            if math.isnan(u):
                raise ValueError("Brownian tree time is NaN")
            u = min(max(u, 0.0), 1.0)
        return int(round(u * (1 << self.depth)))

    # ----------------------------------------------------------------------------------
    # evaluation
    # ----------------------------------------------------------------------------------

    def _terms(self, ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Node ids and coefficients of W(m / 2^depth) for grid indices ``ms``: two (P, depth + 1)
        arrays, column 0 the root (coefficient u), column 1 + k the level-k node whose cell
        holds the point (coefficient 2^(-k/2) tent, zero where the point is on a cell edge)."""
        D = self.depth
        ms = ms.astype(np.int64).reshape(-1, 1)
        k = np.arange(D, dtype=np.int64).reshape(1, -1)
        width = np.left_shift(np.int64(1), D - k)  # cell width at level k, in grid units
        j = ms // width
        r = ms - j * width
        tent = np.minimum(r, width - r)
        coef = np.exp2(-0.5 * k) * tent / width
        nodes = np.concatenate([np.zeros_like(ms), np.left_shift(np.int64(1), k) + j], axis=1)
        coefs = np.concatenate([ms / float(1 << D), coef], axis=1)
        return nodes, coefs

    def _normals(self, nodes: np.ndarray) -> np.ndarray:
        """Standard normals of shape (batch, len(nodes), numel), float64 (Box-Muller on Philox)."""
        batch, blocks = self.sample_ids.numel(), self._blocks
        shape = (batch, nodes.size, blocks)
        c0 = np.broadcast_to(nodes.astype(np.uint64).reshape(1, -1, 1), shape)
        c1 = np.broadcast_to(np.arange(blocks, dtype=np.uint64).reshape(1, 1, -1), shape)
        c2 = np.broadcast_to(self._c2, shape)
        c3 = np.broadcast_to(self._c3, shape)
        words = rng.philox4x32(c0, c1, c2, c3, self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF)
        u = (np.stack([w.numpy() for w in words], axis=-1).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
        u1, u2 = u[..., 0::2], u[..., 1::2]  # (batch, nodes, blocks, 2) each
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = (2.0 * math.pi) * u2
        z = np.stack((radius * np.cos(angle), radius * np.sin(angle)), axis=-1)  # (..., blocks, 2, 2)
        return z.reshape(batch, nodes.size, 4 * blocks)[:, :, : self._numel]

    def _fill(self, ms: Iterable[int]) -> None:
        """Compute and memoise W at the grid indices ``ms`` not yet known (one Philox call)."""
        todo = np.array(sorted({m for m in ms if m not in self._values}), dtype=np.int64)
        if todo.size == 0:
            return
        nodes, coefs = self._terms(todo)
        unique, index = np.unique(nodes, return_inverse=True)
        index = index.reshape(nodes.shape)
        z = self._normals(unique)  # (batch, len(unique), numel)
        acc = np.zeros((self.sample_ids.numel(), todo.size, self._numel))
        # the same summation order for every point (root, then levels 0..depth-1), so W at a
        # point is bitwise the same whichever other points are computed with it
        for col in range(nodes.shape[1]):
            acc += coefs[None, :, col, None] * z[:, index[:, col], :]
        for i, m in enumerate(todo.tolist()):
            self._values[m] = acc[:, i, :]

    def prefetch(self, points: Iterable[float]) -> None:
        """Compute W at many points ahead of a loop, in few vectorised calls (optional)."""
        ms = sorted({self.snap(u) for u in points} - set(self._values))
        per_point = max(1, self.sample_ids.numel() * (self.depth + 1) * self._numel)
        chunk = max(1, _PREFETCH_BUDGET // per_point)
        for begin in range(0, len(ms), chunk):
            self._fill(ms[begin : begin + chunk])

    def _value(self, m: int) -> np.ndarray:
        if m not in self._values:
            self._fill([m])
        return self._values[m]

    def value(self, u: float) -> torch.Tensor:
        """W(u), u snapped to the grid: float64 CPU tensor (batch, *sample_shape)."""
        return torch.from_numpy(self._value(self.snap(u)).reshape(-1, *self.sample_shape).copy())

    def increment(self, a: float, b: float) -> torch.Tensor:
        """W(b) - W(a) (float64 CPU tensor); variance |b - a| up to the grid's snapping."""
        d = self._value(self.snap(b)) - self._value(self.snap(a))
        return torch.from_numpy(d.reshape(-1, *self.sample_shape))

    def normal(self, a: float, b: float) -> torch.Tensor:
        """(W(b) - W(a)) / sqrt(|b - a|) on the snapped points: exactly N(0, 1) per element, in
        the tree's dtype and on its device. Refuses points that snap to the same grid point."""
        ma, mb = self.snap(a), self.snap(b)
        if ma == mb:
            raise ValueError(
                f"Brownian tree: times {a!r} and {b!r} are closer than its resolution 2^-{self.depth}; "
                "use fewer steps or fresh noise"
            )
        rng.refuse_host_draw(self.device, "Brownian-tree noise")
        d = (self._value(mb) - self._value(ma)) * (1.0 / math.sqrt(abs(mb - ma) * self.resolution))
        return torch.from_numpy(d.reshape(-1, *self.sample_shape)).to(device=self.device, dtype=self.dtype, non_blocking=True)


class StepNoise:
    """The per-step noise of an SDE sampler: fresh draws or normalised Brownian increments.

    ``StepNoise(source, "fresh")`` returns ``source.sample(draw)``: independent noise of the
    recipe's noise type per step. ``StepNoise(source, "brownian", levels)`` returns
    (W(u_b) - W(u_a)) / sqrt(|u_b - u_a|) for a step from level a to level b, u =
    :func:`level_time`, from a :class:`BrownianTree` keyed like ``source``; the tree is
    prefetched at the grid's levels (``levels``) so the loop rarely draws. Both are N(0, 1)
    per element and per step; Brownian noise is Gaussian whatever the recipe's noise type.
    """

    def __init__(self, source: Any, mode: str = "fresh", levels: Optional[Sequence[Level]] = None, *, sampler: str = "sampler"):
        if source is None:
            raise ValueError(f"{sampler} needs a noise stream")
        self.source = source
        self.mode = mode
        self.tree: Optional[BrownianTree] = None
        if mode == "brownian":
            self.tree = BrownianTree.from_source(source)
            if levels is not None:
                self.tree.prefetch(level_time(lv) for lv in levels)
        elif mode != "fresh":
            raise ValueError(f"noise must be 'fresh' or 'brownian', got {mode!r}")

    def __call__(self, draw: int, a: Level, b: Level) -> torch.Tensor:
        if self.tree is None:
            return self.source.sample(draw)
        return self.tree.normal(level_time(a), level_time(b))

    def operand(self, executor: Any, draw: int, a: Level, b: Level):
        """As a call, for a fused step (:mod:`fundiff.fused`): fresh draws through
        ``executor.noise`` (drawn inside the kernel where the backend can), Brownian
        increments as tensors."""
        if self.tree is None:
            return executor.noise(self.source, draw)
        return self.tree.normal(level_time(a), level_time(b))
