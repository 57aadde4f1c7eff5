"""torch.distributed setup for runs launched by torchrun; a no-op context for plain ``python`` runs.

    torchrun --standalone --nproc_per_node=4 -m workbench train --config coco --model detector

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in each worker's environment (nanoGPT's
test: ``RANK`` present = distributed). Each process then owns one GPU (``cuda:LOCAL_RANK``, NCCL) or
runs on the CPU (gloo). Training code calls :func:`setup` once, wraps the model in
``DistributedDataParallel``, and uses the small collectives below, which all return immediately
when not distributed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank 0 of 1 when not launched by torchrun."""

    enabled: bool = False  # a process group is initialized (launched by torchrun)
    rank: int = 0  # global rank, 0..world_size-1
    local_rank: int = 0  # rank on this machine: the GPU index
    world_size: int = 1  # number of processes
    device: torch.device = torch.device("cpu")  # this process's device
    owns_group: bool = False  # this setup() created the process group, so its teardown() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and progress bars."""
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: ``cuda:local_rank`` when CUDA is available, else the CPU; ``"cuda"`` demands CUDA."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank)


def setup(device_preference: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs); pick the device."""
    if "RANK" not in os.environ:
        return DistContext(device=resolve_device(device_preference))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":  # device_id: NCCL binds this GPU now (and barrier knows which to use)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistContext(enabled=True, rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                       owns_group=owns_group)


def teardown(ctx: DistContext, clean: bool = True) -> None:
    """Wait for every rank (``clean``), then leave the process group if ``ctx``'s setup created it (a
    group cannot be created again under torchrun: a caller's group, e.g. ``reproduce``'s around several
    trainings, stays). After an error, skip the barrier: the other ranks may never reach it."""
    if ctx.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. to prepare a dataset once)."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()


def all_reduce_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ranks (a copy; ``values`` must be on ``ctx.device``)."""
    values = values.detach().clone()
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, small)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
