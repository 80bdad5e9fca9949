"""Fused sampling steps: a sampler's update as a linear combination, run by one kernel.

A sampler that writes its update through an executor is fused without writing a kernel::

    from fundiff import fused

    def sample(self, denoise, x, levels, noise=None, callback=None):
        ex = fused.executor(x)                       # once per run: the backend for x's device
        predict = ex.predictor(denoise)              # once per run
        for i in range(len(levels) - 1):
            x0 = predict(x, levels[i])               # a tensor, or a deferred guided Prediction
            z = ex.noise(noise, i)                   # Philox noise by its key (or a tensor)
            x, x0 = ex.step(((c_x, x), (c_d, x0), (c_z, z)), ((1.0, x0),))

``ex.step(*outputs)`` takes one sequence of (host float, operand) terms per output and
returns one tensor per output; ``((1.0, x0),)`` asks for the prediction itself (on the fused
backend the guidance combine is done in the same pass and written there; on the torch
backend it is the denoiser's tensor, returned as is). Coefficients are Python floats
computed from the noise levels before the loop.

Backends (``sample.backend`` in a recipe, ``--backend`` on the command line):

* ``torch``: the reference, plain torch operations (:mod:`.torch_backend`; on the CPU, large
  steps run as one pass of the compiled host code, rounding alike);
* ``triton``: one generated kernel per step structure (:mod:`.triton_backend`), CUDA tensors
  (or CPU tensors under ``TRITON_INTERPRET=1``, for tests);
* ``auto`` (default): ``triton`` for float32 / half-precision CUDA tensors when Triton
  imports, ``torch`` otherwise; falling back on a CUDA tensor is logged once.

An explicitly requested backend that cannot run raises :class:`fundiff.FundiffError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..errors import FundiffError
from .step import PhiloxNormal, Prediction, Rescale, StepPlan, Term, per_sample_quantile, plan, threshold_scale
from .torch_backend import TorchExecutor, resolve_prediction

if TYPE_CHECKING:
    from .triton_backend import TritonExecutor

__all__ = [
    "BACKENDS",
    "PhiloxNormal",
    "Prediction",
    "Rescale",
    "StepPlan",
    "Term",
    "TorchExecutor",
    "backend",
    "executor",
    "interpreting",
    "per_sample_quantile",
    "plan",
    "resolve_prediction",
    "threshold_scale",
    "triton_status",
    "use_backend",
]

BACKENDS = ("auto", "torch", "triton")

logger = logging.getLogger("fundiff.fused")

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("fundiff_fused_backend", default="auto")
_torch_executor = TorchExecutor()
_triton_executors: dict[tuple[torch.device, bool], TritonExecutor] = {}
_logged: set[str] = set()
_triton_import_error: str | None = None
_triton_checked = False


def backend() -> str:
    """The backend requested in this context: "auto", "torch" or "triton"."""
    return _backend.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed sampling with backend ``name`` (the pipeline wraps ``sampler.sample``)."""
    if name not in BACKENDS:
        raise FundiffError(f"unknown fused-step backend {name!r}; choose one of {', '.join(BACKENDS)}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_status() -> str | None:
    """None when Triton imports, else the import error as text (checked once per process)."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            _triton_import_error = f"{type(exc).__name__}: {exc}"
        _triton_checked = True
    return _triton_import_error


def _why_not_triton(x: torch.Tensor) -> str | None:
    """Why the triton backend cannot run a step on ``x`` (None when it can)."""
    error = triton_status()
    if error is not None:
        return f"triton does not import ({error})"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"the sampler state is on {x.device.type}, and Triton kernels run on CUDA tensors (TRITON_INTERPRET=1 runs them on the CPU, for tests)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the sampler state is {x.dtype}, and the kernels compute in float32 on float32 / float16 / bfloat16 operands"
    return None


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def executor(x: torch.Tensor, name: str | None = None) -> TorchExecutor | TritonExecutor:
    """The executor for a sampling run on state ``x``, by the backend ``name`` (default: the
    one set by :func:`use_backend`, "auto" outside it)."""
    name = name or _backend.get()
    if name == "torch":
        return _torch_executor
    if name not in BACKENDS:
        raise FundiffError(f"unknown fused-step backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto" and x.device.type != "cuda":
        return _torch_executor  # the rule, not a fallback: nothing to report
    reason = _why_not_triton(x)
    if reason is not None:
        if name == "triton":
            raise FundiffError(
                f"fused-step backend 'triton' cannot run: {reason}; use backend auto or torch (sample.backend, --backend)"
            )
        _log_once(f"fused steps: using the torch backend because {reason}")
        return _torch_executor
    key = (x.device, name == "auto")
    ex = _triton_executors.get(key)
    if ex is None:
        from .triton_backend import TritonExecutor

        ex = _triton_executors[key] = TritonExecutor(x.device, automatic=name == "auto")
    return ex
