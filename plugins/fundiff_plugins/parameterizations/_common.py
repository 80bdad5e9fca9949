"""Shared helpers of the built-in parameterizations (not a plugin: no entry point)."""

from __future__ import annotations


def refuse_zero_terminal_snr(what: str, components) -> list[str]:
    """The problem sentence for parameterizations whose x0 divides by alpha, when the
    recipe's schedule reaches zero SNR (logSNR(1) = -inf, so alpha = 0 at the last level)."""
    schedule = components.get("schedule")
    if schedule is not None and schedule.reaches_zero_snr():
        return [
            f"{what} cannot be used with schedule {type(schedule).__name__}, whose logSNR at t = 1 is -inf "
            "(zero terminal SNR): recovering x0 divides by alpha = 0 at the last step; use "
            "'parameterization: v', x0, edm or switch instead"
        ]
    return []


def as_tensor(value):
    """A tensor as it is; a Python number as a float64 tensor (never torch's float32 default)."""
    import torch

    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
