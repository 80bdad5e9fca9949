"""Triton device code for the fused steps: Philox4x32-10, Box-Muller, and kernel generation.

Imported only when the triton backend runs a step (``triton.jit`` reads ``TRITON_INTERPRET``
when a kernel is created, so tests set it before this module loads).

Each kernel is generated as source text for one step *structure* — how many tensor operands,
which of them are prediction branches, which coefficients are nonzero, whether there is a
rescale, a threshold, a clip or noise — and compiled once; the coefficients themselves are
float32 scalar arguments, so a whole sampling run reuses a handful of kernels. A kernel works
on the flattened (batch * sample_size) elements in tiles of BLOCK = 4 * QUADS, viewed as
(QUADS, 4): four consecutive elements share one Philox call when the sample size is a
multiple of 4 (rng._raw_bits draws four 32-bit words per counter, one counter per four
elements of a sample). Operands are loaded once, converted to float32, combined in float32,
and every output is written once in its dtype.
"""

from __future__ import annotations

import linecache
import math
import threading

import attrs
import triton
import triton.language as tl

# Philox4x32-10 constants (Salmon et al. 2011, as fundiff.rng)
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)  # 2^-32
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint32 tensors; the same rounds as ``rng._philox_rounds``."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def box_muller_radius(bits):
    """sqrt(-2 ln u) for u = (bits + 0.5) 2^-32 (``rng._uniform_from_bits``), in float32.

    For u >= 1/2, -ln u = -log1p(-v) with v = 1 - u = (~bits + 0.5) 2^-32 formed from the
    integer (exact to float32 rounding) and log1p by Goldberg's identity log1p(y) = log(w) y
    / (w - 1), w = 1 + y (Goldberg 1991, "What every computer scientist should know about
    floating-point arithmetic", Theorem 4): the radius keeps full relative accuracy where u
    is close to 1, instead of losing it to the rounding of u.
    """
    upper = bits >= 0x80000000
    # each branch gets a harmless argument where the other one is taken (no log(0), no 0 / 0)
    u = tl.where(upper, 0.5, (bits.to(tl.float32) + 0.5) * TWO_POW_M32)
    v = tl.where(upper, ((~bits).to(tl.float32) + 0.5) * TWO_POW_M32, 0.25)
    w = 1.0 - v
    # log1p(-v) = log(w) (-v) / (w - 1) = log(w) v / (1 - w), and -v where w rounds to 1
    log1p_minus_v = tl.where(w == 1.0, -v, tl.log(w) * v / tl.where(w == 1.0, 1.0, 1.0 - w))
    neg_log = tl.where(upper, -log1p_minus_v, -tl.log(u))
    return tl.sqrt(2.0 * neg_log)


@triton.jit
def box_muller_angle(bits):
    """(cos, sin) of 2 pi u for u = (bits + 0.5) 2^-32, from the centred t = u - 1/2 formed
    in the integers (bits - 2^31 is exact in int32): cos(2 pi u) = -cos(2 pi t), sin(2 pi u)
    = -sin(2 pi t) with |2 pi t| <= pi, so the angle carries no rounding of the offset."""
    centred = (bits ^ 0x80000000).to(tl.int32, bitcast=True)
    angle = (centred.to(tl.float32) + 0.5) * (TWO_PI * TWO_POW_M32)
    return -tl.cos(angle), -tl.sin(angle)


@triton.jit
def normal_quads(quad, sample_id, key0, key1, ctr1, ctr3):
    """Four standard normals per quad (elements 4q .. 4q + 3 of a sample): Box-Muller on the
    Philox words of counter (q, draw, id low, stream | draw high | id high), as rng.normal.

    Returns the (QUADS, 4) tile: lane 0 = r_a cos, 1 = r_a sin from words (0, 1), lanes 2, 3
    from words (2, 3)."""
    c0 = quad.to(tl.uint32)
    c1 = tl.zeros_like(c0) + ctr1.to(tl.uint32)
    c2 = (sample_id & 0xFFFFFFFF).to(tl.uint32)
    c3 = (ctr3 ^ (sample_id >> 32)).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, key0.to(tl.uint32), key1.to(tl.uint32))
    r_a = box_muller_radius(w0)
    cos_a, sin_a = box_muller_angle(w1)
    r_b = box_muller_radius(w2)
    cos_b, sin_b = box_muller_angle(w3)
    lane = tl.arange(0, 4)[None, :]
    first = tl.where(lane == 0, (r_a * cos_a)[:, None], (r_a * sin_a)[:, None])
    second = tl.where(lane == 2, (r_b * cos_b)[:, None], (r_b * sin_b)[:, None])
    return tl.where(lane < 2, first, second)


@triton.jit
def normal_elements(element, sample_id, key0, key1, ctr1, ctr3):
    """One standard normal per element index ``element`` (within its sample), any shape: the
    Philox block element // 4, words (0, 1) or (2, 3) by (element % 4) // 2, cos for even
    and sin for odd elements (the layout of rng.normal when a tile's quads straddle samples)."""
    c0 = (element // 4).to(tl.uint32)
    c1 = tl.zeros_like(c0) + ctr1.to(tl.uint32)
    c2 = (sample_id & 0xFFFFFFFF).to(tl.uint32)
    c3 = (ctr3 ^ (sample_id >> 32)).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, key0.to(tl.uint32), key1.to(tl.uint32))
    lane = element % 4
    second_pair = lane >= 2
    r = box_muller_radius(tl.where(second_pair, w2, w0))
    cos, sin = box_muller_angle(tl.where(second_pair, w3, w1))
    return tl.where(lane % 2 == 1, r * sin, r * cos)


# --------------------------------------------------------------------------------------
# Kernel generation
# --------------------------------------------------------------------------------------


@attrs.frozen
class StepSignature:
    """The structure of a fused step that a generated kernel is specialised for.

    ``outputs[o]`` lists the indices (into leaves + [P, Z], P = n_leaves, Z = n_leaves + 1)
    with nonzero coefficients, in that order; ``branches`` the leaf index of each prediction
    branch; ``rescale_x`` the leaf index of the state when the rescale space involves it
    (-1: rescale in a space of x0 alone; None: no rescale).
    """

    n_leaves: int
    outputs: tuple[tuple[int, ...], ...]
    branches: tuple[int, ...] = ()
    rescale_x: int | None = None
    rescale: bool = False
    threshold: bool = False
    clip: bool = False
    noise: bool = False
    aligned: bool = True
    wide: bool = False

    @property
    def needs_sample(self) -> bool:
        return self.noise or self.rescale or self.threshold

    @property
    def needs_prediction(self) -> bool:
        return any(self.n_leaves in row for row in self.outputs)


def step_kernel_source(sig: StepSignature, name: str) -> str:
    """Source text of the kernel for ``sig`` (see the module docstring for the layout)."""
    n, P, Z = sig.n_leaves, sig.n_leaves, sig.n_leaves + 1
    args = [f"t{i}" for i in range(n)] + [f"o{o}" for o in range(len(sig.outputs))]
    args += [f"c{o}_{k}" for o, row in enumerate(sig.outputs) for k in row]
    if sig.needs_prediction:
        args += [f"w{b}" for b in range(len(sig.branches))]
        if sig.rescale:
            args += ["factor_ptr", "rescale_k"]
        if sig.threshold:
            args += ["scale_ptr"]
        if sig.clip:
            args += ["clip"]
    if sig.noise:
        args += ["ids_ptr", "key0", "key1", "ctr1", "ctr3"]
    args += ["total", "per_sample", "BLOCK: tl.constexpr"]
    index = "tl.int64" if sig.wide else "tl.int32"
    lines = [
        "@triton.jit(do_not_specialize=['key0', 'key1', 'ctr1', 'ctr3'])" if sig.noise else "@triton.jit",
        f"def {name}({', '.join(args)}):",
        "    QUADS: tl.constexpr = BLOCK // 4",
        f"    quad = tl.program_id(0).to({index}) * QUADS + tl.arange(0, QUADS).to({index})",
        "    offs = quad[:, None] * 4 + tl.arange(0, 4)[None, :]",
        "    mask = offs < total",
    ]
    for i in range(n):
        lines.append(f"    v{i} = tl.load(t{i} + offs, mask=mask, other=0.0).to(tl.float32)")
    if sig.needs_sample:
        if sig.aligned:
            # per_sample is the number of quads per sample here: every quad lies in one sample
            lines += [
                "    sample_q = quad // per_sample",
                "    mask_q = quad * 4 < total",
                "    sample = sample_q[:, None]",
            ]
        else:
            lines += ["    sample = offs // per_sample"]
    if sig.needs_prediction:
        terms = [f"w{b} * v{leaf}" for b, leaf in enumerate(sig.branches)]
        lines.append(f"    p = {' + '.join(terms)}")
        if sig.rescale:
            load = (
                "tl.load(factor_ptr + sample_q, mask=mask_q, other=1.0)[:, None]"
                if sig.aligned
                else "tl.load(factor_ptr + sample, mask=mask, other=1.0)"
            )
            lines.append(f"    m = {load}")
            if sig.rescale_x is not None and sig.rescale_x >= 0:
                # Lin et al. 2024 in a space v = to_x x + to_pred x0: x0 = m p + (to_x / to_pred) (m - 1) x
                lines.append(f"    p = m * p + rescale_k * (m - 1.0) * v{sig.rescale_x}")
            else:
                lines.append("    p = m * p")
        if sig.threshold:
            load = (
                "tl.load(scale_ptr + sample_q, mask=mask_q, other=1.0)[:, None]"
                if sig.aligned
                else "tl.load(scale_ptr + sample, mask=mask, other=1.0)"
            )
            lines.append(f"    s = {load}")
            # Saharia et al. 2022, sec. 2.3: clamp to [-s, s], then divide by s
            lines.append("    p = tl.clamp(p, -s, s, propagate_nan=tl.PropagateNan.ALL) / s")
        if sig.clip:
            lines.append("    p = tl.clamp(p, -clip, clip, propagate_nan=tl.PropagateNan.ALL)")
    if sig.noise:
        if sig.aligned:
            lines += [
                "    sample_id = tl.load(ids_ptr + sample_q, mask=mask_q, other=0)",
                "    z = normal_quads(quad - sample_q * per_sample, sample_id, key0, key1, ctr1, ctr3)",
            ]
        else:
            lines += [
                "    sample_id = tl.load(ids_ptr + sample, mask=mask, other=0)",
                "    z = normal_elements(offs - sample * per_sample, sample_id, key0, key1, ctr1, ctr3)",
            ]
    for o, row in enumerate(sig.outputs):
        operand = {P: "p", Z: "z"}
        terms = [f"c{o}_{k} * {operand.get(k, f'v{k}')}" for k in row]
        lines.append(f"    acc{o} = {terms[0]}")
        for term in terms[1:]:
            lines.append(f"    acc{o} = acc{o} + {term}")
        lines.append(f"    tl.store(o{o} + offs, acc{o}.to(o{o}.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


@attrs.frozen
class StatsSignature:
    """The rescale's first pass: per-sample partial sums of the guided and reference
    predictions in the rescale space (see :func:`stats_kernel_source`)."""

    n_leaves: int
    branches: tuple[int, ...]
    reference: int  # leaf index of the reference branch
    rescale_x: int | None  # leaf index of the state, or None for a space of x0 alone


def stats_kernel_source(sig: StatsSignature, name: str) -> str:
    """Per (chunk, sample) program: for g = to_x x + to_pred sum_b w_b B_b and r = to_x x +
    to_pred B_ref over the chunk's elements, write (sum g, M2 g, sum r, M2 r), M2 = the sum of
    squared deviations from the chunk's own mean (combined across chunks on the host side
    with Chan et al.'s pairwise formula, so no float32 cancellation of sum-of-squares)."""
    n = sig.n_leaves
    args = [f"t{i}" for i in range(n)] + [f"w{b}" for b in range(len(sig.branches))]
    args += ["to_x", "to_pred", "partial_ptr", "per_sample", "chunks", "BLOCK: tl.constexpr"]
    lines = [
        "@triton.jit",
        f"def {name}({', '.join(args)}):",
        "    chunk = tl.program_id(0)",
        "    sample = tl.program_id(1).to(tl.int64)",
        "    j = chunk * BLOCK + tl.arange(0, BLOCK)",
        "    mask = j < per_sample",
        "    offs = sample * per_sample + j",
        "    count = tl.minimum(per_sample - chunk * BLOCK, BLOCK).to(tl.float32)",
    ]
    used = set(sig.branches) | ({sig.rescale_x} if sig.rescale_x is not None else set())
    for i in sorted(used):
        lines.append(f"    v{i} = tl.load(t{i} + offs, mask=mask, other=0.0).to(tl.float32)")
    guided = " + ".join(f"w{b} * v{leaf}" for b, leaf in enumerate(sig.branches))
    if sig.rescale_x is not None:
        lines.append(f"    g = to_x * v{sig.rescale_x} + to_pred * ({guided})")
        lines.append(f"    r = to_x * v{sig.rescale_x} + to_pred * v{sig.reference}")
    else:
        lines.append(f"    g = to_pred * ({guided})")
        lines.append(f"    r = to_pred * v{sig.reference}")
    lines += [
        "    sum_g = tl.sum(tl.where(mask, g, 0.0), axis=0)",
        "    sum_r = tl.sum(tl.where(mask, r, 0.0), axis=0)",
        "    dev_g = tl.where(mask, g - sum_g / count, 0.0)",
        "    dev_r = tl.where(mask, r - sum_r / count, 0.0)",
        "    base = partial_ptr + (sample * chunks + chunk) * 4",
        "    tl.store(base, sum_g)",
        "    tl.store(base + 1, tl.sum(dev_g * dev_g, axis=0))",
        "    tl.store(base + 2, sum_r)",
        "    tl.store(base + 3, tl.sum(dev_r * dev_r, axis=0))",
    ]
    return "\n".join(lines) + "\n"


_compiled: dict[object, object] = {}
_lock = threading.Lock()


def compile_kernel(signature: object, source_of) -> object:
    """The jitted kernel for ``signature`` (generated, exec'd and cached once per process).

    The source is registered with ``linecache`` under a unique file name, which is what
    ``inspect.getsource`` (and so ``triton.jit``) reads; the kernel's globals are this
    module's, so it calls the helpers above.
    """
    kernel = _compiled.get(signature)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _compiled.get(signature)
        if kernel is None:
            name = f"fused_{type(signature).__name__.lower()}_{len(_compiled)}"
            source = source_of(signature, name)
            filename = f"<fundiff-fused {name}>"
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            namespace = dict(globals())
            exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated source
            kernel = _compiled[signature] = namespace[name]
    return kernel


def block_for(total: int, interpreting: bool = False) -> tuple[int, int]:
    """(BLOCK, num_warps) for a step over ``total`` elements: 4096 / 8 warps for large steps,
    smaller tiles for small ones so that more programs share the SMs. Triton's interpreter
    runs programs one after another with numpy, where large tiles are what is fast."""
    if interpreting:
        return min(8192, max(16, 1 << math.ceil(math.log2(max(total, 1))))), 4
    if total >= 1 << 22:
        return 4096, 8
    if total >= 1 << 16:
        return 2048, 8
    return 1024, 4


def stats_block(per_sample: int) -> int:
    """BLOCK of the rescale statistics pass: a power of two up to 4096 covering the sample."""
    return max(16, min(4096, 1 << math.ceil(math.log2(max(per_sample, 1)))))
