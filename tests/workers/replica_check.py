"""Two gloo ranks run ``check_replicas_in_sync`` on one small model; rank 1's copy of one LayerNorm
weight is moved by ``argv[1]``. Prints one JSON list: each rank's "in sync" or its error line.

Run as a script (``python tests/workers/replica_check.py 1e-3``), so the spawned ranks import this file
by path: pytest's importlib mode leaves the ``tests`` package unimportable for child processes."""

from __future__ import annotations

import json
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mf_edge.train import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(rank: int, port: int, nudge: float, results) -> None:
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(check, args=(free_port(), float(sys.argv[1]), shared), nprocs=2, join=True)
        print(json.dumps([shared[0], shared[1]]))
