"""The reference executor: a fused step evaluated with plain torch operations.

Used on the CPU and wherever Triton cannot run. On the path samplers take (tensor operands
only, float32 or float64) a step is exactly the old ``lincomb``: one multiply, then in-place
multiply-adds in the order the terms are given, so converting a sampler to the step algebra
changes neither its cost nor its numbers there. Fresh noise (a Philox noise descriptor after
the first term) is added in place as it is drawn (:func:`fundiff.rng.add_normal_`: no noise
tensor on the CPU). On the CPU, from 2^17 elements (2^12 with fresh noise), the compiled step of
:mod:`fundiff._native` does the same combination in one pass over memory instead of one per
term, rounding as those operations do (on a CPU with FMA: bit for bit). Predictions, noise
as the first term and half-precision operands take the general path: everything resolved
to tensors, combined in float32 (or the operands' wider dtype) and rounded once to the
output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _native
from .step import PhiloxNormal, Prediction, Term, plan, threshold_scale

_REDUCED = (torch.float16, torch.bfloat16)
_Tensor = torch.Tensor


def output_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of a step's outputs: the promotion of its tensor operands' dtypes."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Coefficients and accumulation in float32 for half-precision operands (the issue's
    contract for both backends), in the operands' own dtype otherwise."""
    return torch.float32 if dtype in _REDUCED else dtype


class _General(Exception):
    """The fast path met something it does not handle: use the general one."""


def _combine(terms: Sequence[Term]) -> torch.Tensor:
    """sum_i c_i T_i for tensor operands: ``T_0 * c_0`` then ``add_(T_i, alpha=c_i)`` (c_i != 0);
    fresh noise (a PhiloxNormal after the first term) is added in place as it is drawn."""
    c0, t0 = terms[0]
    if t0.__class__ is not _Tensor:
        raise _General
    if len(terms) == 1 and c0 == 1.0:
        return t0  # the output is an operand: nothing to compute
    if c0 == 0.0 or t0.dtype in _REDUCED:
        raise _General
    if t0.numel() >= _native.STEP_NOISE_MIN_ELEMENTS and t0.device.type == "cpu":
        out = _native_step(terms, t0.numel())
        if out is not None:
            return out
    out = t0 * c0
    for c, t in terms[1:]:
        if c != 0.0:
            if t.__class__ is PhiloxNormal:
                if t.shape != out.shape:
                    raise _General
                t.add_to_(out, c)
            else:
                out.add_(t, alpha=c)  # TypeError for a Prediction: general path
    return out


def _native_step(terms: Sequence[Term], numel: int | None = None) -> torch.Tensor | None:
    """The same combination in one pass over memory by the compiled CPU step (rounded as the
    operations of ``_combine`` round), or None where it does not apply: fewer elements than
    pay for the call, fresh noise anywhere but last, a prediction, or operands it does not
    take (see :func:`fundiff._native.step`). ``numel`` None: no size threshold."""
    coefficients, tensors, noise, noise_coefficient = [], [], None, 0.0
    for c, t in terms:
        if c == 0.0:
            continue
        if noise is not None:
            return None  # noise before another term: keep the order of _combine
        if t.__class__ is _Tensor:
            coefficients.append(c)
            tensors.append(t)
        elif t.__class__ is PhiloxNormal:
            noise, noise_coefficient = t, c
        else:
            return None
    if noise is None and numel is not None and numel < _native.STEP_MIN_ELEMENTS:
        return None
    return _native.step(coefficients, tensors, noise, noise_coefficient)


def resolve_prediction(prediction: Prediction, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Evaluate a deferred prediction with torch (see :class:`fundiff.fused.Prediction`).

    Arithmetic in ``compute_dtype`` of the branches' dtype; the result in ``dtype`` (default:
    the branches' promoted dtype).
    """
    dtype = dtype or output_dtype(prediction.branches)
    work = compute_dtype(torch.promote_types(dtype, output_dtype(prediction.branches)))
    p: torch.Tensor | None = None
    for w, b in zip(prediction.weights, prediction.branches):
        if w == 0.0:
            continue
        b = b.to(work)
        p = b * w if p is None else p.add_(b, alpha=w)
    if p is None:
        p = torch.zeros(prediction.shape, dtype=work, device=prediction.branches[0].device)
    rescale = prediction.rescale
    if rescale is not None:
        x = prediction.x.to(work) if rescale.to_x != 0.0 else None

        def space(x0: torch.Tensor) -> torch.Tensor:  # v = to_x x + to_pred x0
            return x0 * rescale.to_pred if x is None else torch.add(x * rescale.to_x, x0, alpha=rescale.to_pred)

        dims = tuple(range(1, p.ndim))
        std_g = space(p).std(dim=dims, keepdim=True, correction=0)
        std_r = space(prediction.branches[rescale.reference].to(work)).std(dim=dims, keepdim=True, correction=0)
        # a constant guided prediction has nothing to rescale: factor 1
        factor = torch.where(std_g > 0, std_r / torch.where(std_g > 0, std_g, 1.0), 1.0)
        m = rescale.phi * factor + (1.0 - rescale.phi)
        # x0 = (m v(p) - to_x x) / to_pred = m p + (to_x / to_pred) (m - 1) x
        p = p * m if x is None else p * m + (m - 1.0) * rescale.x_factor * x
    if prediction.threshold is not None:
        s = threshold_scale(p, prediction.threshold).to(work).reshape(-1, *([1] * (p.ndim - 1)))
        p = torch.maximum(torch.minimum(p, s), -s) / s
    if prediction.clip is not None:
        p = p.clamp(-prediction.clip, prediction.clip)
    return p.to(dtype)


class TorchExecutor:
    """Evaluates fused steps with torch: the reference backend (see :mod:`fundiff.fused`)."""

    name = "torch"
    #: predictions are not deferred: ``predict`` calls the denoiser, whose guidance combines
    defers = False
    #: False: an intermediate result is cheaper to reuse than to fold into a later output
    #: (each term is a pass over memory here); samplers may choose their step layout by it
    single_pass = False

    def __init__(self, device: torch.device | None = None):
        self.device = device

    def predict(self, denoise, x: torch.Tensor, level) -> torch.Tensor:
        return denoise(x, level)

    def predictor(self, denoise):
        """``predict`` bound to ``denoise`` once per run: here ``denoise`` itself (no cost per step)."""
        return denoise

    def noise(self, source, draw: int):
        """Fresh noise for ``draw``: a :class:`PhiloxNormal` when the source offers
        ``philox(draw)`` (a step adds it as it draws it, without a noise tensor), else the
        tensor ``source.sample(draw)``."""
        philox = getattr(source, "philox", None)
        z = philox(draw) if philox is not None else None
        return z if z is not None else source.sample(draw)

    def step(self, *outputs: Sequence[Term]) -> tuple[torch.Tensor, ...]:
        try:  # the samplers' usual shapes spelt out: each Python-level step costs ~0.1 us here
            if len(outputs) == 2:
                return _combine(outputs[0]), _combine(outputs[1])
            if len(outputs) == 1:
                return (_combine(outputs[0]),)
            if len(outputs) == 3:
                return _combine(outputs[0]), _combine(outputs[1]), _combine(outputs[2])
            return tuple([_combine(terms) for terms in outputs])
        except (_General, TypeError):
            return self._general(outputs)

    def combine(self, terms: Sequence[Term]) -> torch.Tensor:
        """One output: ``step(terms)[0]``."""
        return self.step(terms)[0]

    def _general(self, outputs: Sequence[Sequence[Term]]) -> tuple[torch.Tensor, ...]:
        step = plan(outputs, self._materialize)
        if all(keep is not None for keep in step.passthrough):
            return step.passthrough  # every output is an operand: nothing to compute
        tensors = list(step.leaves) + (list(step.prediction.branches) if step.prediction is not None else [])
        tensors = tensors or ([step.first] if step.first is not None else [])
        if tensors:
            shape, device, dtype = tensors[0].shape, tensors[0].device, output_dtype(tensors)
        else:  # noise alone: its shape, float32, on the device of its ids
            z = step.noise
            shape, device, dtype = (
                z.shape,
                z.device_ids.device if z.device_ids is not None else torch.device("cpu"),
                torch.float32,
            )
        work = compute_dtype(dtype)
        n = len(step.leaves)
        p = resolve_prediction(step.prediction, work) if step.uses_prediction else None
        z = step.noise.tensor(device, work) if step.uses_noise else None  # rounded once, to the working dtype
        results = []
        for row, keep in zip(step.coefficients, step.passthrough):
            if keep is not None:
                results.append(keep)
                continue
            acc: torch.Tensor | None = None
            for c, t in list(zip(row[:n], step.leaves)) + [(row[n], p), (row[n + 1], z)]:
                if c == 0.0:
                    continue
                t = t.to(work)
                acc = t * c if acc is None else acc.add_(t, alpha=c)
            if acc is None:
                acc = torch.zeros(shape, dtype=work, device=device)
            results.append(acc.to(dtype))
        return tuple(results)

    def _materialize(self, operand) -> torch.Tensor:
        if isinstance(operand, Prediction):
            return resolve_prediction(operand)
        if isinstance(operand, PhiloxNormal):
            device = operand.device_ids.device if operand.device_ids is not None else "cpu"
            return operand.tensor(device, torch.float32)
        return operand
