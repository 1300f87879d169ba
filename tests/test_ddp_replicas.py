"""DDP's replica check, in two real gloo processes: a nudged parameter on one rank stops the run."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mf_edge.train import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(rank: int, port: int, nudge: float, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))  # same init on both ranks
        if rank == 1 and nudge:
            with torch.no_grad():
                model[1].weight[3] += nudge  # one value of one parameter, on one rank
        context = distributed.Distributed(rank, rank, 2, torch.device("cpu"))
        try:
            distributed.check_replicas_in_sync(model, context)
            results[rank] = "in sync"
        except RuntimeError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def run_check(nudge: float) -> list[str]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_check, args=(_free_port(), nudge, results), nprocs=2, join=True)
        return [results[0], results[1]]


def test_nudged_rank_stops_the_run_on_every_rank() -> None:
    """Rank 1's copy of one LayerNorm weight moved by 1e-3: both ranks raise "DDP replicas diverged"
    (the trainer calls this check after every epoch, so the run stops); identical replicas pass.
    Catches a check that compares nothing or tolerates real drift (planted: the tolerance
    ``1e-6 * ...`` -> ``1e-2 * ...`` in ``check_replicas_in_sync``: both ranks report in sync)."""
    assert run_check(0.0) == ["in sync", "in sync"]
    nudged = run_check(1e-3)
    assert all(line.startswith("DDP replicas diverged: parameter checksums") for line in nudged), nudged
