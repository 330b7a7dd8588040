"""How fast this machine is right now, in two fixed single-thread workloads.

Why: the project's 2-core VMs run the same code at very different speeds from hour to hour (on the
AVX2 EPYC the Python loop below took 0.11-0.59 s within one session, with no steal time reported),
so a suite or benchmark time means little without the machine's speed when it was taken. Run it
just before and after a measurement and quote both::

    .venv/bin/python benchmarks/calibrate.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vistune.precision import machine_line  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    for _ in range(200):
        a @ a
    matmul = time.perf_counter() - t
    t = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i
    loop = time.perf_counter() - t
    print(machine_line("fp32", threads=1))
    print(f"calibration: 200 fp32 matmuls 512x512 {matmul:.3f} s, 3M-step Python loop {loop:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
