"""One padded pass vs a pass per prompt length: the multi-task model's forward, in-process.

Why: a VPT task's rows carry extra prompt tokens, so a mixed batch used to run as one pass per
prompt length. ``MultiTaskModel.passes`` now merges them into one pass, padded at the end of each
shorter row and masked out of attention, when the padding is cheaper than the pass it saves
(``pass_cost_tokens``). This measures both policies on the same batches, round-robin in one
process (drift hits both alike), median of rounds, so the break-even behind
``PASS_COST_TOKENS`` can be re-measured on other hardware::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_passes.py                 # DINOv2-S @84 px
    .venv/bin/python benchmarks/serve_passes.py --backbone test_vit --img-size 32 --rounds 1   # smoke

The HTTP benchmark (``benchmarks/serve.py``) adds decoding, batching and the clients around this.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import make_tasks

from vistune.precision import machine_line
from vistune.serve.multitask import MultiTaskModel

#: batch compositions over the loaded tasks L(oRA), V(PT-deep), A(dapter), l(inear)
BATCHES = ("LLLL", "VVVV", "LV", "LVAl", "LVLV", "LLLLLLLL", "LVAlLVAl", "LVAlLVAlLVAlLVAl")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2-s14")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--img-size", type=int, default=84)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--pass-cost-tokens", type=int, default=None,
                    help="the merging policy measured against 0 (a pass per prompt length); default: the library's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = make_tasks(Path(tempfile.mkdtemp()), args.backbone, args.weights, args.img_size, 4,
                       ["lora", "vpt", "adapter", "linear"])
    model = MultiTaskModel.for_file(next(iter(files.values())), weights=args.weights, precision=args.precision)
    for name, path in files.items():
        model.add_task(name, path)
    policy = model.pass_cost_tokens if args.pass_cost_tokens is None else args.pass_cost_tokens
    by_letter = dict(zip("LVAl", files))
    batches = {b: [by_letter[c] for c in b] for b in BATCHES}
    x = torch.randn(max(len(t) for t in batches.values()), 3, args.img_size, args.img_size,
                    generator=torch.Generator().manual_seed(0))
    times: dict[tuple[str, int], list[float]] = {(b, c): [] for b in batches for c in (policy, 0)}
    passes = {}
    for cost in (policy, 0):  # warm-up, and the number of passes each policy runs
        model.pass_cost_tokens = cost
        for b, tasks in batches.items():
            model(x[:len(tasks)], tasks)
            passes[b, cost] = len(model.passes(tasks))
    for _ in range(args.rounds):
        for b, tasks in batches.items():
            for cost in (policy, 0):
                model.pass_cost_tokens = cost
                t0 = time.perf_counter()
                model(x[:len(tasks)], tasks)
                times[b, cost].append(time.perf_counter() - t0)
    print(machine_line(model.precision.name, threads=args.threads))
    print(f"{args.backbone} @{args.img_size} px; tasks L=LoRA r8, V=VPT-deep 10 prompts, A=adapter b8, l=linear; "
          f"median of {args.rounds} round-robin rounds; policy = pass_cost_tokens {policy}, split = 0\n")
    print("| batch | rows | passes (policy / split) | policy ms | split ms | policy / split |")
    print("|---|---|---|---|---|---|")
    for b, tasks in batches.items():
        p, s = (1000 * statistics.median(times[b, c]) for c in (policy, 0))
        print(f"| {b} | {len(tasks)} | {passes[b, policy]} / {passes[b, 0]} | {p:.1f} | {s:.1f} | {p / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
