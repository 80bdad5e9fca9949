"""The step algebra: a sampler update as linear combinations of a few operands.

Nearly every sampler step is

    out_o = sum_j c_oj * T_j  +  c_oP * P  +  c_oZ * Z            (o = 1 .. number of outputs)

with host-float coefficients c that depend only on the noise levels, and operands:

* ``T_j``: tensors of one shape (batch, *sample_shape): the current state, history terms;
* ``P``: at most one :class:`Prediction`, the denoiser's x0 estimate before its guidance
  combine: ``sum_k w_k B_k`` over branch tensors (the conditional and unconditional outputs
  under classifier-free guidance), then optionally a per-sample std rescale, a per-sample
  dynamic threshold and a static clip;
* ``Z``: at most one :class:`PhiloxNormal`, fresh standard normal noise named by its
  counter-based key (seed, stream, draw, sample id) rather than by its values.

An executor (``fundiff.fused.executor``) evaluates a step with plain torch (the reference) or
with one Triton kernel that reads each operand once and writes each output once. The types
here are what samplers and guidances hand to it; :func:`plan` normalises a step into leaves
and a coefficient matrix for the backends. Nothing here names a sampler or a guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .. import rng
from ..errors import FundiffError

#: one term of a linear combination: (host-float coefficient, operand)
Term = tuple[float, "Operand"]


@attrs.frozen(kw_only=True)
class Rescale:
    """Per-sample std matching of a guided prediction (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", sec. 3.4, eqs. 15-17), in any space linear in x0.

    The space is ``v = to_x * x + to_pred * x0`` (x0 space: (0, 1); eps space, eps = (x - alpha
    x0) / sigma: (1 / sigma, -alpha / sigma)). With g = v(guided x0) and r = v(branch
    ``reference``), per sample m = phi * std(r) / std(g) + (1 - phi) (factor 1 where std(g) = 0)
    and the result is the x0 whose v is m g:

        x0 = (m g - to_x x) / to_pred = m * x0_guided + (to_x / to_pred) (m - 1) x.

    std is the population std (correction 0) over each sample's elements. Needs two passes
    over the data: the stds, then the step.
    """

    phi: float
    reference: int = 0
    to_x: float = 0.0
    to_pred: float = 1.0

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.phi <= 1.0:
            raise ValueError(f"Rescale.phi must be in [0, 1], got {self.phi}")
        if not (math.isfinite(self.to_pred) and self.to_pred != 0.0 and math.isfinite(self.to_x)):
            raise ValueError(f"Rescale needs a finite, invertible space map, got to_x={self.to_x}, to_pred={self.to_pred}")

    @property
    def x_factor(self) -> float:
        """k = to_x / to_pred in x0 = m x0_guided + k (m - 1) x."""
        return self.to_x / self.to_pred


@attrs.frozen(kw_only=True, eq=False)
class Prediction:
    """A deferred x0 estimate: ``sum_k weights[k] * branches[k]``, then optionally

    1. ``rescale``: per-sample std matching (:class:`Rescale`; needs ``x``, the state the
       prediction was made at, when its space involves x);
    2. ``threshold``: dynamic thresholding (Saharia et al. 2022, "Photorealistic text-to-image
       diffusion models with deep language understanding", sec. 2.3): per sample
       s = max(quantile_p(|x0|), 1) and x0 <- clamp(x0, -s, s) / s;
    3. ``clip``: static clipping to [-clip, clip].

    A guidance returns one from ``denoise_deferred`` so that a fused step combines the
    branches in the same pass as the update; ``resolve`` on the torch backend evaluates it.
    """

    branches: tuple[torch.Tensor, ...] = attrs.field(converter=tuple)
    weights: tuple[float, ...] = attrs.field(converter=lambda ws: tuple(float(w) for w in ws))
    x: torch.Tensor | None = None
    rescale: Rescale | None = None
    threshold: float | None = None
    clip: float | None = None

    def __attrs_post_init__(self) -> None:
        if not self.branches or len(self.branches) != len(self.weights):
            raise ValueError(
                f"Prediction needs one weight per branch, got {len(self.branches)} branches and {len(self.weights)} weights"
            )
        shape = self.branches[0].shape
        if any(b.shape != shape for b in self.branches):
            raise ValueError(f"Prediction branches must share one shape, got {[tuple(b.shape) for b in self.branches]}")
        if self.rescale is not None:
            if not 0 <= self.rescale.reference < len(self.branches):
                raise ValueError(
                    f"Rescale.reference {self.rescale.reference} is not a branch index (0..{len(self.branches) - 1})"
                )
            if self.rescale.to_x != 0.0 and (self.x is None or self.x.shape != shape):
                raise ValueError("a Rescale whose space involves x needs Prediction.x, the state of the branches' shape")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"Prediction.threshold is a quantile in (0, 1], got {self.threshold}")
        if self.clip is not None and not self.clip > 0.0:
            raise ValueError(f"Prediction.clip must be > 0, got {self.clip}")

    @property
    def shape(self) -> torch.Size:
        return self.branches[0].shape

    @property
    def is_plain(self) -> bool:
        """True when the prediction is one branch with weight 1 and nothing else: that tensor."""
        return (
            len(self.branches) == 1
            and self.weights[0] == 1.0
            and self.rescale is None
            and self.threshold is None
            and self.clip is None
        )


@attrs.frozen(kw_only=True, eq=False)
class PhiloxNormal:
    """Standard normal noise named by its key: ``rng.normal(seed, stream, draw, sample_ids,
    sample_shape)``, Box-Muller on Philox4x32-10 (see :mod:`fundiff.rng` for the counter
    layout). The torch backend materialises it with :func:`fundiff.rng.normal`; the Triton
    kernel draws the same Philox words in registers (its float32 Box-Muller may differ from
    the float64 one in the last bits). ``device_ids`` is the sample ids on the step's device
    (the kernel reads them there, so a captured CUDA graph replays with new ids in place)."""

    seed: int
    stream: int
    draw: int
    sample_ids: torch.Tensor
    sample_shape: tuple[int, ...]
    device_ids: torch.Tensor | None = None

    def __attrs_post_init__(self) -> None:
        rng._check_seed(self.seed)
        if not 0 <= self.stream < 2**16:
            raise ValueError(f"stream must be in [0, 65535], got {self.stream}")
        if not 0 <= self.draw < 2**32:
            raise ValueError(f"draw index must be in [0, 2^32), got {self.draw}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.sample_ids.numel(), *self.sample_shape))

    def tensor(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The noise as a tensor, exactly ``NoiseStream.normal(draw)`` (float64 Box-Muller, rounded once)."""
        rng.refuse_host_draw(torch.device(device))  # drawn here on the host: not inside a CUDA graph capture
        z = rng.normal(self.seed, self.stream, self.draw, self.sample_ids, self.sample_shape, dtype=dtype)
        return z.to(device=device)

    def add_to_(self, out: torch.Tensor, scale: float) -> torch.Tensor:
        """``out += scale * self.tensor(...)`` in place (:func:`fundiff.rng.add_normal_`: on the
        CPU the compiled generator adds the noise as it draws it, without a noise tensor)."""
        if out.shape != self.shape:
            raise ValueError(f"noise of shape {tuple(self.shape)} added to a tensor of shape {tuple(out.shape)}")
        return rng.add_normal_(out, scale, self.seed, self.stream, self.draw, self.sample_ids)

    def counter_words(self) -> tuple[int, int, int, int]:
        """(key0, key1, counter1, counter3 without the sample id's high bits): the Philox key and
        the counter words that do not vary inside a step (rng._raw_bits' layout)."""
        return rng._counter_words(self.seed, self.stream, self.draw)


Operand = torch.Tensor | Prediction | PhiloxNormal


@attrs.frozen(kw_only=True, eq=False)
class StepPlan:
    """A step normalised for a backend.

    ``leaves``: the distinct tensors (by identity) with a nonzero coefficient somewhere or
    used as a prediction branch or rescale state; ``branch_leaves`` and ``rescale_x_leaf``
    index into them. ``coefficients[o]`` has one entry per leaf, then P, then Z (0.0 where
    absent). ``passthrough[o]`` is the tensor itself when output o is exactly ``1.0 * T``
    (returned as is, nothing written). ``first`` is the first tensor operand of the step (its
    shape and device are the outputs', also when every coefficient is zero).
    """

    leaves: tuple[torch.Tensor, ...]
    prediction: Prediction | None
    branch_leaves: tuple[int, ...]
    rescale_x_leaf: int | None
    noise: PhiloxNormal | None
    coefficients: tuple[tuple[float, ...], ...]
    passthrough: tuple[torch.Tensor | None, ...]
    first: torch.Tensor | None = None

    @property
    def uses_prediction(self) -> bool:
        n = len(self.leaves)
        return any(row[n] != 0.0 for row, keep in zip(self.coefficients, self.passthrough) if keep is None)

    @property
    def uses_noise(self) -> bool:
        n = len(self.leaves)
        return any(row[n + 1] != 0.0 for row, keep in zip(self.coefficients, self.passthrough) if keep is None)


def _coefficient(c: Any) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise FundiffError(
            f"fused step coefficients must be host floats (computed from the noise levels before the loop), got {type(c).__name__}; "
            "a tensor coefficient would need a device-to-host synchronisation every step"
        )
    return float(c)


def plan(outputs: Sequence[Sequence[Term]], materialize: Callable[[Operand], torch.Tensor]) -> StepPlan:
    """Normalise a step: distinct leaves, one prediction, one noise, one coefficient row per output.

    Repeated operands within an output are merged (coefficients summed in float64); a
    second, different prediction or noise draw is turned into a tensor by ``materialize``
    (a backend's one-output evaluation), so any well-formed step is accepted.
    """
    if not outputs:
        raise ValueError("a fused step needs at least one output")
    leaves: list[torch.Tensor] = []
    leaf_index: dict[int, int] = {}
    prediction: Prediction | None = None
    noise: PhiloxNormal | None = None
    rows: list[dict[Any, float]] = []
    passthrough: list[torch.Tensor | None] = []

    def leaf(t: torch.Tensor) -> int:
        key = id(t)
        if key not in leaf_index:
            leaf_index[key] = len(leaves)
            leaves.append(t)
        return leaf_index[key]

    for terms in outputs:
        if len(terms) == 0:
            raise ValueError("each output of a fused step needs at least one (coefficient, operand) term")
        row: dict[Any, float] = {}
        for c, operand in terms:
            c = _coefficient(c)
            if isinstance(operand, Prediction) and operand.is_plain:
                operand = operand.branches[0]
            if isinstance(operand, Prediction):
                if prediction is None:
                    prediction = operand
                if operand is not prediction:
                    operand = materialize(operand)
            elif isinstance(operand, PhiloxNormal):
                if noise is None:
                    noise = operand
                if operand is not noise:
                    operand = materialize(operand)
            elif not isinstance(operand, torch.Tensor):
                raise TypeError(
                    f"a fused step operand must be a tensor, a Prediction or a PhiloxNormal, got {type(operand).__name__}"
                )
            key = "P" if operand is prediction else "Z" if operand is noise else leaf(operand)
            row[key] = row.get(key, 0.0) + c
        rows.append(row)
        only = list(row.items())
        passthrough.append(leaves[only[0][0]] if len(only) == 1 and isinstance(only[0][0], int) and only[0][1] == 1.0 else None)

    # keep a leaf only when something reads it: a nonzero coefficient in a written output,
    # a prediction branch or the rescale's state
    used = {k for row, keep in zip(rows, passthrough) if keep is None for k, c in row.items() if c != 0.0 and isinstance(k, int)}
    branch_ids: list[int] = []
    rescale_x: int | None = None
    if prediction is not None:
        branch_ids = [leaf(b) for b in prediction.branches]
        used.update(branch_ids)
        if prediction.rescale is not None and prediction.rescale.to_x != 0.0:
            rescale_x = leaf(prediction.x)
            used.add(rescale_x)
    order = sorted(used)
    remap = {old: new for new, old in enumerate(order)}
    n = len(order)
    coefficients = []
    for row in rows:
        coefs = [0.0] * (n + 2)
        for key, c in row.items():
            if key == "P":
                coefs[n] = c
            elif key == "Z":
                coefs[n + 1] = c
            elif key in remap:
                coefs[remap[key]] = c
        coefficients.append(tuple(coefs))
    return StepPlan(
        leaves=tuple(leaves[i] for i in order),
        prediction=prediction,
        branch_leaves=tuple(remap[i] for i in branch_ids),
        rescale_x_leaf=None if rescale_x is None else remap[rescale_x],
        noise=noise,
        coefficients=tuple(coefficients),
        passthrough=tuple(passthrough),
        first=leaves[0] if leaves else None,
    )


def per_sample_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each row of ``values`` (batch, n) with linear interpolation (as
    ``torch.quantile``), by ``kthvalue``: no size limit, no host synchronisation."""
    n = values.shape[1]
    position = q * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    v_low = values.kthvalue(low + 1, dim=1).values
    if high == low or position == low:
        return v_low
    v_high = values.kthvalue(high + 1, dim=1).values
    return v_low + (position - low) * (v_high - v_low)


def threshold_scale(x0: torch.Tensor, q: float) -> torch.Tensor:
    """Dynamic thresholding's per-sample s = max(quantile_q(|x0|), 1) (Saharia et al. 2022,
    sec. 2.3), shape (batch,), in x0's dtype (float32 for half-precision x0)."""
    flat = x0.detach().reshape(x0.shape[0], -1).abs()
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return per_sample_quantile(flat, q).clamp(min=1.0)
