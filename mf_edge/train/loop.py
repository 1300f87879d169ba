"""One training epoch and one evaluation pass, with mixed precision on CUDA and a rich progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from mf_edge.console import console, is_quiet
from mf_edge.errors import UserError
from mf_edge.train.distributed import Distributed, all_reduce_sum


@dataclass
class MixedPrecision:
    """Autocast dtype (``None``: float32) and the gradient scaler fp16 needs."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def describe(self) -> str:
        """What the run computes in, for its first lines."""
        if self.dtype is None:
            return "float32"
        if self.scaler is None:
            return "AMP bf16 autocast"
        return "AMP fp16 autocast with a gradient scaler"


def mixed_precision(device: torch.device, enabled: bool) -> MixedPrecision:
    """bf16 autocast where the GPU computes bf16 natively, else fp16 with a ``GradScaler``; CUDA only.

    Below compute capability 8.0 (T4, V100, Jetson Xavier) bf16 is only emulated, so those GPUs take fp16.
    ``device`` must be the current CUDA device (``distributed.setup`` makes it so).
    """
    if not enabled:
        return MixedPrecision()
    if device.type != "cuda":
        raise UserError("--amp needs a CUDA device (mixed precision is for GPU training); "
                        "drop --amp or pass --device cuda.")
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return MixedPrecision(torch.bfloat16)
    return MixedPrecision(torch.float16, torch.amp.GradScaler("cuda"))


def describe_precision(precision: MixedPrecision, device: torch.device) -> str:
    """One line on the precision a run took and why: the GPU's name and compute capability with AMP."""
    if precision.dtype is None or device.type != "cuda":
        return f"precision: {precision.describe()}"
    major, minor = torch.cuda.get_device_capability(device)
    native = "native bf16" if precision.scaler is None else "no native bf16"
    return (f"precision: {precision.describe()} ({torch.cuda.get_device_name(device)}, compute capability "
            f"{major}.{minor}: {native})")


@dataclass
class EpochStats:
    loss: float
    top1: float = float("nan")
    top5: float = float("nan")
    samples: int = 0


@contextmanager
def progress_bar(total: int, description: str, show: bool) -> Iterator[Callable[[float], None]]:
    """A rich bar over ``total`` steps; yields ``advance(loss)``. Hidden when quiet or not rank 0."""
    if not show or is_quiet():
        yield lambda loss: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total, loss="-")
        yield lambda loss: progress.update(task, advance=1, loss=f"{loss:.4f}")


def steps_in_epoch(loader: DataLoader, max_steps: int | None) -> int:
    return min(len(loader), max_steps) if max_steps else len(loader)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    criterion: nn.Module,
    context: Distributed,
    precision: MixedPrecision,
    clip_grad: float | None = None,
    ema: AveragedModel | None = None,
    max_steps: int | None = None,
    description: str = "train",
    before_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """Run one epoch of optimiser steps (the scheduler steps every iteration); mean loss over all ranks.

    ``before_step(step)`` runs before each step (QAT freezes its observers there).
    """
    model.train()
    total = steps_in_epoch(loader, max_steps)
    loss_sum, count = 0.0, 0
    with progress_bar(total, description, context.is_main) as advance:
        for step, (images, labels) in enumerate(loader):
            if step >= total:
                break
            if before_step is not None:
                before_step(step)
            images = images.to(context.device, non_blocking=True)
            labels = labels.to(context.device, non_blocking=True)
            with precision.autocast(context.device):
                loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            if precision.scaler is not None:
                precision.scaler.scale(loss).backward()
                precision.scaler.unscale_(optimizer)
            else:
                loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if precision.scaler is not None:
                precision.scaler.step(optimizer)
                precision.scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model.module if context.enabled else model)
            loss_value = float(loss.detach())
            loss_sum += loss_value * len(labels)
            count += len(labels)
            advance(loss_value)
    loss_sum, count = all_reduce_sum([loss_sum, count], context)
    return EpochStats(loss_sum / max(count, 1), samples=int(count))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    context: Distributed,
    precision: MixedPrecision,
    description: str = "val",
) -> EpochStats:
    """Loss, top-1 and top-5 accuracy (%) over the whole validation set, summed across ranks."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    with progress_bar(len(loader), description, context.is_main) as advance:
        for images, labels in loader:
            images = images.to(context.device, non_blocking=True)
            labels = labels.to(context.device, non_blocking=True)
            with precision.autocast(context.device):
                logits = model(images)
            logits = logits.float()
            loss = criterion(logits, labels)
            k = min(5, logits.shape[1])
            ranked = logits.topk(k, dim=1).indices
            top1 += float((ranked[:, 0] == labels).sum())
            top5 += float((ranked == labels[:, None]).any(dim=1).sum())
            loss_sum += float(loss) * len(labels)
            count += len(labels)
            advance(float(loss))
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], context)
    count = max(count, 1)
    return EpochStats(loss_sum / count, 100 * top1 / count, 100 * top5 / count, int(count))
