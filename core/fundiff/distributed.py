"""Multi-process training and sampling on ``torch.distributed`` (launched by ``torchrun``).

The same recipe runs on one CPU or many GPUs. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
process group is created on first use: NCCL when the run's device is CUDA, gloo otherwise.

Because every random number is a function of (seed, step, position), splitting a global
batch across ranks is exact: rank r takes positions [r B / W, (r + 1) B / W) of step s, the
same examples, noise levels and noise a single process would draw for them, and
DistributedDataParallel averages the gradients (or, with ``train.parallel: fsdp``, FSDP2
reduce-scatters them to the slices each rank keeps; see the FSDP section below). Sampling
assigns whole batches to ranks by index, so the samples equal a single-process run's bit for
bit.
"""

from __future__ import annotations

import copy
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


def shutdown() -> None:
    """Destroy the process group if this process initialised one (end of a torchrun command).

    Left to interpreter exit, gloo's worker threads are torn down in no particular order and a
    rank can abort ("terminate called without an active exception") after its work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(w: World) -> None:
    if w.active:
        dist.barrier()


# --------------------------------------------------------------------------------------
# Fully sharded data parallel (train.parallel: fsdp)
# --------------------------------------------------------------------------------------
#
# FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a DTensor that
# holds rank r's slice of dim 0; a unit's full weights exist only while it runs forward or
# backward, and gradients are reduce-scattered (averaged) back to slices. Gradients, AdamW
# moments and the EMA copy (sharded the same way) stay slices throughout. Checkpoints hold
# full tensors in the unsharded format, gathered one tensor at a time onto rank 0.

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards as their own units (all-gathered one at a time), before the root.

    A network may say which by a method ``fsdp_units()``; otherwise the units are the blocks:
    the outermost modules held in an ``nn.ModuleList`` (looking through nested ModuleLists
    and ModuleDicts, whose ``forward`` is never called). Such a unit's parameters must be
    used only inside its own ``forward``; everything else belongs to the root unit."""
    chosen = getattr(model, "fsdp_units", None)
    if callable(chosen):
        return list(chosen())
    units: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module, in_list: bool) -> None:
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                visit(child, in_list or isinstance(child, torch.nn.ModuleList))
            elif in_list and any(True for _ in child.parameters()):
                units.append(child)  # a block: sharded as one unit, not looked into
            else:
                visit(child, False)

    visit(model, False)
    return units


def _meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory):
    the plain module that :func:`unshard` fills with the gathered weights."""
    memo: dict[int, object] = {}
    for param in module.parameters():
        memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(module, memo)


def shard(module: torch.nn.Module) -> torch.nn.Module:
    """Shard ``module`` in place with FSDP2 across the default process group (its units from
    :func:`shard_units`, then the root); returns the meta skeleton for :func:`unshard`.

    Every rank must hold the same weights before (fundiff initialises from the recipe's seed
    and loads the same checkpoint on every rank): FSDP keeps rank r's slice of what is there."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns at every forward whose output is a view (a denoiser's ``out[:, 0]``), since an
    # in-place op on that view would skip the backward all-gather. The loss only reads the
    # output out of place, so the warning says nothing about fundiff's use.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    skeleton = _meta_skeleton(module)
    for unit in shard_units(module):
        fully_shard(unit)
    fully_shard(module)
    return skeleton


def is_sharded(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local(value: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded tensor (the tensor itself when it is not sharded)."""
    return value.to_local() if is_sharded(value) else value


def unshard(module: torch.nn.Module, skeleton: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A plain module with ``module``'s full weights (a collective: every rank calls it)."""
    plain = skeleton.to_empty(device=device)
    with torch.no_grad():
        sharded = dict(module.named_parameters())
        for name, param in plain.named_parameters():
            value = sharded[name].detach()
            param.copy_(value.full_tensor() if is_sharded(value) else value)
        # FSDP shards parameters only: buffers (non-persistent ones too) are whole on every rank
        for (_, buffer), (_, source) in zip(plain.named_buffers(), module.named_buffers()):
            buffer.copy_(source)
    return plain


def gather_state(tensors: dict[str, torch.Tensor], w: World) -> dict[str, torch.Tensor]:
    """Full tensors of a state dict whose entries may be sharded, on rank 0 (other ranks get
    only the unsharded entries). Every rank must call it with the same keys; they are
    gathered in sorted order (a dict's order can differ between ranks: a checkpoint's keys
    come back from safetensors in a per-process order). Each sharded tensor is gathered and
    moved to the CPU before the next, so a rank never holds more than one full tensor on its
    device."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        value = tensors[key]
        if is_sharded(value):
            full = value.full_tensor()
            if w.is_main:
                out[key] = full.cpu()
            del full
        else:
            out[key] = value
    return out


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full`` laid out as the sharded ``param`` (no communication:
    every rank holds ``full``); ``full`` itself when ``param`` is not sharded or the shapes
    differ (a scalar such as AdamW's step count)."""
    if not is_sharded(param) or tuple(full.shape) != tuple(param.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def gradient_norm(grads: list[torch.Tensor], w: World) -> float:
    """The global 2-norm of gradients that may be sharded: squared norms of the local slices
    summed over ranks (one all-reduce), plus those of whole (replicated) gradients once."""
    device = local(grads[0]).device if grads else torch.device("cpu")
    sharded_sq = torch.zeros((), dtype=torch.float64, device=device)
    whole_sq = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        part = torch.linalg.vector_norm(local(grad).detach(), dtype=torch.float64) ** 2
        if is_sharded(grad):
            sharded_sq += part
        else:
            whole_sq += part
    if w.active:
        dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
    return float(torch.sqrt(sharded_sq + whole_sq))


def clip_gradients(grads: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)), as ``clip_grad_norm_`` does,
    given their global norm (each rank scales its own slices)."""
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for grad in grads:
            local(grad).mul_(scale)
