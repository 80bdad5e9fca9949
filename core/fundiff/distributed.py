"""Multi-process training and sampling on ``torch.distributed`` (launched by ``torchrun``).

The same recipe runs on one CPU or many GPUs. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
process group is created on first use: NCCL when the run's device is CUDA, gloo otherwise.

Because every random number is a function of (seed, step, position), splitting a global
batch across ranks is exact: rank r takes positions [r B / W, (r + 1) B / W) of step s, the
same examples, noise levels and noise a single process would draw for them, and
DistributedDataParallel averages the gradients. Sampling assigns whole batches to ranks by
index, so the samples equal a single-process run's bit for bit.
"""

from __future__ import annotations

import os
from typing import Optional

import attrs
import torch
import torch.distributed as dist


@attrs.frozen
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world(device: Optional[torch.device] = None) -> World:
    """The current world, initialising the process group under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process uses its own GPU (``LOCAL_RANK``); CPU stays CPU."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def mean(value: torch.Tensor, w: World) -> torch.Tensor:
    """The average of a tensor over ranks (a no-op for one process)."""
    if not w.active:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / w.size


def any_true(flag: bool, w: World) -> bool:
    if not w.active:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def gather(value: torch.Tensor, w: World) -> torch.Tensor:
    """Concatenate equally shaped per-rank tensors in rank order."""
    if not w.active:
        return value
    parts = [torch.empty_like(value) for _ in range(w.size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)


def barrier(w: World) -> None:
    if w.active:
        dist.barrier()
