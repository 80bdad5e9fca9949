"""The fused executor: one generated Triton kernel per step (see :mod:`._kernels`).

A step reads each operand once and writes each output once: the denoiser's branches are
combined by the guidance weights in registers, fresh noise is drawn in registers from the
same Philox counters as :func:`fundiff.rng.normal`, and a multistep method's outputs (the new
state, the new x0 estimate, a history term) come out of the same pass. A rescaled guidance
adds a first pass for the per-sample stds; a dynamic threshold first writes the prediction
(the quantile needs it whole). Nothing here synchronises with the host: coefficients are
kernel arguments, per-sample values stay on the device, so a sampling loop built from these
steps can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
import triton

from ..errors import FundiffError
from . import _kernels
from .step import PhiloxNormal, Prediction, StepPlan, Term, plan, threshold_scale
from .torch_backend import TorchExecutor, output_dtype

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
#: CUDA's limit on the second grid dimension (the rescale pass has one program row per sample)
_MAX_GRID_Y = 65535
_REFERENCE = TorchExecutor()


class TritonExecutor:
    """Evaluates fused steps with generated Triton kernels on ``device``."""

    name = "triton"
    #: predictions are deferred: the guidance combine runs inside the step's kernel
    defers = True
    #: True: folding an intermediate result into a later output of the same step costs a few
    #: flops, a second kernel costs another pass over memory
    single_pass = True

    def __init__(self, device: torch.device, automatic: bool = False):
        self.device = torch.device(device)
        #: chosen by backend "auto": a step that needs autograd falls back to torch (logged
        #: once); chosen explicitly, such a step is an error (the kernels have no backward)
        self.automatic = automatic
        self.interpreting = self.device.type == "cpu"  # CPU tensors reach here only under TRITON_INTERPRET=1

    # ------------------------------------------------------------------ operands

    def predict(self, denoise, x: torch.Tensor, level):
        """The denoiser's x0 estimate, deferred (a :class:`Prediction`) when the denoise
        callable offers ``deferred`` (the pipeline's does, for a guidance that can combine in
        a step), else the tensor ``denoise(x, level)``."""
        deferred = getattr(denoise, "deferred", None)
        return deferred(x, level) if deferred is not None else denoise(x, level)

    def predictor(self, denoise):
        """``predict`` bound to ``denoise`` once per run: ``predictor(denoise)(x, level)``."""
        return getattr(denoise, "deferred", denoise)

    def noise(self, source, draw: int):
        """Fresh noise for ``draw``: a :class:`PhiloxNormal` drawn in the kernel when the source
        offers ``philox(draw)`` (standard normal noise from a :class:`fundiff.NoiseStream`),
        else the tensor ``source.sample(draw)``."""
        philox = getattr(source, "philox", None)
        z = philox(draw) if philox is not None else None
        return z if z is not None else source.sample(draw)

    # ------------------------------------------------------------------ steps

    def step(self, *outputs: Sequence[Term]) -> tuple[torch.Tensor, ...]:
        step = plan(outputs, self._materialize)
        if all(keep is not None for keep in step.passthrough):
            return step.passthrough  # every output is an operand: nothing to compute
        if torch.is_grad_enabled() and any(t.requires_grad for t in step.leaves):
            return self._without_kernels(outputs)
        _, _, dtype = self._check(step)
        prediction = step.prediction if step.uses_prediction else None
        if prediction is not None and prediction.threshold is not None:
            # the quantile needs the whole prediction: write it (in float32), then threshold in the step
            unthresholded = plan([((1.0, attrs.evolve(prediction, threshold=None, clip=None)),)], self._materialize)
            whole = self._run(unthresholded, torch.float32)[0].float()
            thresholded = Prediction(branches=(whole,), weights=(1.0,), threshold=prediction.threshold, clip=prediction.clip)
            outputs = [[(c, thresholded if operand is prediction else operand) for c, operand in terms] for terms in outputs]
            step = plan(outputs, self._materialize)
        return self._run(step, dtype)

    def combine(self, terms: Sequence[Term]) -> torch.Tensor:
        """One output: ``step(terms)[0]``."""
        return self.step(terms)[0]

    def _without_kernels(self, outputs: Sequence[Sequence[Term]]) -> tuple[torch.Tensor, ...]:
        """A step whose operands need gradients: the kernels have no backward, so torch does it
        (backend auto) or the user is told (backend triton)."""
        if not self.automatic:
            raise FundiffError(
                "the triton backend's kernels have no backward pass, but this step's operands require gradients; "
                "sample under torch.no_grad() (fundiff's pipeline does), or use backend auto or torch"
            )
        from . import _log_once

        _log_once("fused steps: a step whose operands require gradients runs on the torch backend (the kernels have no backward)")
        return _REFERENCE.step(*outputs)

    def _materialize(self, operand) -> torch.Tensor:
        if isinstance(operand, Prediction):
            return self.step(((1.0, operand),))[0]
        if isinstance(operand, PhiloxNormal):  # a second noise draw in one step: drawn on the host
            return operand.tensor(self.device, torch.float32)
        return operand

    def _check(self, step: StepPlan) -> tuple[torch.Size, torch.device, torch.dtype]:
        """(shape, device, dtype) of the step's outputs, after checking that the operands agree."""
        prediction = step.prediction if step.uses_prediction else None
        tensors = list(step.leaves) or ([step.first] if step.first is not None else [])
        if not tensors:  # noise alone: its shape, float32, on the device of its ids
            z = step.noise
            return z.shape, z.device_ids.device if z.device_ids is not None else self.device, torch.float32
        shape = tensors[0].shape
        for t in tensors:
            if t.shape != shape:
                raise ValueError(
                    f"fused step operands must share one shape, got {tuple(shape)} and {tuple(t.shape)} (no broadcasting)"
                )
            if t.device != tensors[0].device:
                raise ValueError(f"fused step operands must be on one device, got {tensors[0].device} and {t.device}")
            if t.dtype not in _SUPPORTED:
                raise FundiffError(
                    f"the triton backend computes in float32 on float32 / float16 / bfloat16 operands, got {t.dtype}; "
                    "use backend torch (sample.backend, --backend) for float64 sampling"
                )
        if step.uses_noise and step.noise.shape != shape:
            raise ValueError(f"the noise has shape {tuple(step.noise.shape)} but the step's operands {tuple(shape)}")
        if prediction is not None and prediction.shape != shape:
            raise ValueError(f"the prediction has shape {tuple(prediction.shape)} but the step's operands {tuple(shape)}")
        return shape, tensors[0].device, output_dtype(tensors)

    def _run(self, step: StepPlan, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Launch the kernel of ``step``; written outputs in ``dtype``."""
        if all(keep is not None for keep in step.passthrough):
            return step.passthrough
        shape, device, _ = self._check(step)
        # flat indexing of a non-contiguous view would read the wrong elements: copy it
        leaves = [t if t.is_contiguous() else t.contiguous() for t in step.leaves]
        n = len(leaves)
        results: list[torch.Tensor | None] = []
        written_rows, written = [], []
        for row, keep in zip(step.coefficients, step.passthrough):
            if keep is not None:
                results.append(keep)
            elif all(c == 0.0 for c in row):
                results.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                out = torch.empty(shape, dtype=dtype, device=device)
                results.append(out)
                written_rows.append(row)
                written.append(out)
        total = math.prod(shape)
        if not written or total == 0:
            return tuple(results)  # type: ignore[arg-type]
        batch = shape[0]
        per_sample = total // batch
        block, warps = _kernels.block_for(total, self.interpreting)
        uses_prediction = any(row[n] != 0.0 for row in written_rows)
        uses_noise = any(row[n + 1] != 0.0 for row in written_rows)
        prediction = step.prediction if uses_prediction else None
        sig = _kernels.StepSignature(
            n_leaves=n,
            outputs=tuple(tuple(k for k, c in enumerate(row) if c != 0.0) for row in written_rows),
            branches=step.branch_leaves if prediction is not None else (),
            rescale_x=step.rescale_x_leaf if prediction is not None and prediction.rescale is not None else None,
            rescale=prediction is not None and prediction.rescale is not None,
            threshold=prediction is not None and prediction.threshold is not None,
            clip=prediction is not None and prediction.clip is not None,
            noise=uses_noise,
            aligned=per_sample % 4 == 0,
            wide=total + block >= 2**31,
        )
        args: list = list(leaves) + written
        args += [float(row[k]) for row in written_rows for k, c in enumerate(row) if c != 0.0]
        if prediction is not None:
            args += list(prediction.weights)
            if sig.rescale:
                args += [self._rescale_factors(step, leaves, per_sample), prediction.rescale.x_factor]
            if sig.threshold:
                args.append(threshold_scale(prediction.branches[0], prediction.threshold))
            if sig.clip:
                args.append(float(prediction.clip))
        if uses_noise:
            z = step.noise
            ids = z.device_ids if z.device_ids is not None and z.device_ids.device == device else z.sample_ids.to(device)
            key0, key1, ctr1, ctr3 = z.counter_words()
            args += [ids.to(torch.int64), key0, key1, ctr1, ctr3]
        args += [total, per_sample // 4 if sig.aligned else per_sample]
        kernel = _kernels.compile_kernel(sig, _kernels.step_kernel_source)
        kernel[(triton.cdiv(total, block),)](*args, BLOCK=block, num_warps=warps)
        return tuple(results)  # type: ignore[arg-type]

    def _rescale_factors(self, step: StepPlan, leaves: list[torch.Tensor], per_sample: int) -> torch.Tensor:
        """Pass 1 of a rescaled guidance: per sample m = phi std(r) / std(g) + 1 - phi (float32, (batch,))."""
        prediction = step.prediction
        rescale = prediction.rescale
        sig = _kernels.StatsSignature(
            n_leaves=len(leaves),
            branches=step.branch_leaves,
            reference=step.branch_leaves[rescale.reference],
            rescale_x=step.rescale_x_leaf,
        )
        kernel = _kernels.compile_kernel(sig, _kernels.stats_kernel_source)
        block = _kernels.stats_block(per_sample)
        chunks = triton.cdiv(per_sample, block)
        batch = leaves[0].shape[0]
        device = leaves[0].device
        partial = torch.empty((batch, chunks, 4), dtype=torch.float32, device=device)
        for begin in range(0, batch, _MAX_GRID_Y):
            end = min(batch, begin + _MAX_GRID_Y)
            args = [t[begin:end] for t in leaves] + list(prediction.weights)
            args += [float(rescale.to_x), float(rescale.to_pred), partial[begin:end], per_sample, chunks]
            kernel[(chunks, end - begin)](*args, BLOCK=block, num_warps=4)
        # Chan, Golub and LeVeque (1983): M2 = sum_c M2_c + sum_c n_c (mean_c - mean)^2
        counts = (per_sample - torch.arange(chunks, device=device, dtype=torch.float32) * block).clamp(max=block)
        sums, m2 = partial[..., 0::2], partial[..., 1::2]  # (batch, chunks, [g, r])
        mean = sums.sum(1, keepdim=True) / per_sample
        spread = (counts[None, :, None] * (sums / counts[None, :, None] - mean) ** 2).sum(1)
        std = ((m2.sum(1) + spread) / per_sample).sqrt()
        std_g, std_r = std[:, 0], std[:, 1]
        # a constant guided prediction has nothing to rescale: factor 1
        factor = torch.where(std_g > 0, std_r / torch.where(std_g > 0, std_g, 1.0), 1.0)
        return rescale.phi * factor + (1.0 - rescale.phi)
