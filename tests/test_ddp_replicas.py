"""DDP's replica check, in two real gloo processes: a nudged parameter on one rank stops the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "workers" / "replica_check.py"


def run_check(nudge: float) -> list[str]:
    """Each rank's result of the replica check, rank 1 nudged by ``nudge`` (a separate interpreter)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(WORKER), repr(nudge)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_nudged_rank_stops_the_run_on_every_rank() -> None:
    """Rank 1's copy of one LayerNorm weight moved by 1e-3: both ranks raise "DDP replicas diverged"
    (the trainer calls this check after every epoch, so the run stops); identical replicas pass.
    Catches a check that compares nothing or tolerates real drift (planted: the tolerance
    ``1e-6 * ...`` -> ``1e-2 * ...`` in ``check_replicas_in_sync``: both ranks report in sync)."""
    assert run_check(0.0) == ["in sync", "in sync"]
    nudged = run_check(1e-3)
    assert all(line.startswith("DDP replicas diverged: parameter checksums") for line in nudged), nudged
