"""CUDA graphs of whole sampling loops: capture once per batch shape, replay for every batch.

A sampling loop built from fused steps launches a few kernels per step and never waits for
the device (coefficients are host floats, noise is drawn in the kernels, per-sample values
stay on the device), so the whole loop — denoiser and steps — can be recorded in one
``torch.cuda.CUDAGraph`` and replayed with one launch. What differs between batches of the
same shape is copied into the captured input tensors before each replay: the prior sample x,
the sample ids the kernels key their noise by, the class labels.

The first batch of a shape runs eagerly (on a side stream, which also compiles the Triton
kernels and warms up cuBLAS, as capture requires) and its result is used as it is; the loop
is then captured with that batch's objects, and later batches replay it. Anything that
synchronises with the host inside the loop, or draws noise on the host (the torch backend's
noise, a Brownian tree; see ``rng.refuse_host_draw``), cannot be captured and raises
:class:`fundiff.FundiffError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import FundiffError


class _Capture:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, out: torch.Tensor, flags: list, inputs: list):
        self.graph, self.x, self.out, self.flags, self.inputs = graph, x, out, flags, inputs


class GraphedSampling:
    """Runs ``sampler.sample`` through CUDA graphs, one per batch shape (see the module docstring)."""

    def __init__(self, name: str = "sampler"):
        self.name = name
        self._captures: dict[tuple, _Capture] = {}

    def __call__(
        self,
        sample: Callable[[torch.Tensor, Callable], torch.Tensor],
        x: torch.Tensor,
        inputs: Sequence[torch.Tensor | None],
        capture: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``sample(x, callback)`` runs the loop; ``inputs`` are the other tensors it reads that
        change between batches (in place: sample ids on the device, labels). Returns the result
        and the per-step finiteness flags the callback recorded. ``capture=False``: no later
        batch has this shape, so a new shape runs eagerly without being captured."""
        key = (tuple(x.shape), x.dtype, tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs))
        captured = self._captures.get(key)
        if captured is not None:
            captured.x.copy_(x)
            for static, new in zip(captured.inputs, inputs):
                if static is not None and new is not static:
                    static.copy_(new)
            captured.graph.replay()
            return captured.out.clone(), [f.clone() for f in captured.flags]

        def recorder(flags: list) -> Callable:
            return lambda i, x_i, x0_i: flags.append(torch.isfinite(x_i).all())

        eager_flags: list = []
        if not capture:
            return sample(x, recorder(eager_flags)), eager_flags
        # warm-up: the first batch eagerly on a side stream (compiles kernels, allocates workspaces)
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = sample(x, recorder(eager_flags))
        current.wait_stream(side)
        for t in [result, *eager_flags]:  # made on the side stream, used on this one
            t.record_stream(current)

        static_x = x.clone()
        flags: list = []
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = sample(static_x, recorder(flags))
        except FundiffError:
            raise
        except RuntimeError as exc:
            raise FundiffError(
                f"sample.cuda_graphs: the sampling loop of '{self.name}' could not be captured ({exc}); "
                "it synchronises with the host inside the loop; set sample.cuda_graphs: false"
            ) from exc
        self._captures[key] = _Capture(graph, static_x, out, flags, list(inputs))
        return result, eager_flags
