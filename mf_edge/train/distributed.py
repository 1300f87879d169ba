"""One process or many: the device, the process group under ``torchrun``, and who may write."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mf_edge.errors import UserError

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank 0 alone writes files and shows progress."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | None, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """``cuda``/``cuda:N`` or ``cpu``; ``None`` picks CUDA when there is one. Under torchrun each of the
    ``local_world_size`` processes on this host takes the GPU of its local rank, one GPU each."""
    kind, _, index = (requested or "").partition(":")
    if requested is not None and (kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit()))):
        raise UserError(f"unknown device {requested!r}; choose one of cpu, cuda or cuda:N.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was asked for but no CUDA GPU is visible to PyTorch; "
                        "pass --device cpu or run on a host with an NVIDIA GPU.")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index:
        if local_world_size > 1:
            raise UserError(f"--device {requested} names one GPU, but torchrun gives each process the GPU of "
                            "its local rank; pass --device cuda.")
        if int(index) >= count:
            raise UserError(f"--device {requested} asks for GPU {index}, but this host has {count} "
                            f"(cuda:0 to cuda:{count - 1}); pick one of those.")
        return torch.device("cuda", int(index))
    if local_world_size > count:
        raise UserError(f"torchrun started {local_world_size} processes on this host, which has {count} "
                        f"GPU(s); NCCL needs one GPU per process: pass --nproc-per-node {count}.")
    return torch.device("cuda", local_rank)


def setup(requested_device: str | None) -> Distributed:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    device = resolve_device(requested_device, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device: where AMP, NCCL and bare "cuda" tensors go
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return Distributed(rank, local_rank, world_size, device)


def teardown(context: Distributed) -> None:
    """Leave the process group, if this run joined one."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], context: Distributed) -> list[float]:
    """Element-wise sum of ``values`` over all processes (the values themselves when alone)."""
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather(value: object, context: Distributed) -> list:
    """``value`` of every process, in rank order (``[value]`` when alone)."""
    if not context.enabled:
        return [value]
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def check_replicas_in_sync(model: nn.Module, context: Distributed) -> None:
    """Raise if the processes' parameters differ (DDP must keep every replica identical)."""
    if not context.enabled:
        return
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(context.world_size)]
    dist.all_gather(gathered, checksum.to(context.device))
    values = [float(g) for g in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"DDP replicas diverged: parameter checksums {values}")


def barrier(context: Distributed) -> None:
    """Wait for every process (no-op when alone)."""
    if context.enabled:
        dist.barrier()
