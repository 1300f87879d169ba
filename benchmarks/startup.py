"""Start-up time of the light commands: ``mf-edge --help``, ``models`` and ``info`` (goal: under 1.5 s).

Runs each command ``--repeat`` times in a fresh process and prints a markdown table of the median
wall time and the median CPU time (user + system; steadier on a shared machine)::

    python benchmarks/startup.py --repeat 5 [--mf-edge PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["models"], ["info", "convformer_s18"])


def measure(script: str, argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``script ARGV`` run."""
    before = os.times()
    started = time.perf_counter()
    subprocess.run([script, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mf-edge", default=str(Path(sys.executable).parent / "mf-edge"),
                        help="the mf-edge script to time (default: this environment's)")
    args = parser.parse_args()
    print("| command | wall s (median) | CPU s (median) |\n|---|---|---|")
    for argv in COMMANDS:
        runs = [measure(args.mf_edge, argv) for _ in range(args.repeat)]
        print(f"| mf-edge {' '.join(argv)} | {statistics.median(r[0] for r in runs):.2f} | "
              f"{statistics.median(r[1] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
