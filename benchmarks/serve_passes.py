"""How a mixed batch runs: deep prompts as keys/values, one padded pass, or a pass per prompt length.

Why: a VPT task's rows carry extra prompt tokens, so a mixed batch used to run as one pass per
prompt length. ``MultiTaskModel.passes`` merges them into one pass, padded at the end of each
shorter row and masked out of attention, when the padding is cheaper than the pass it saves
(``pass_cost_tokens``); and deep prompts (``Routing.kv_prompts``) are served as constant keys and
values of each block's attention, so their rows need neither. This measures the three on the same
batches, round-robin in one process (drift hits all alike), median of rounds, and each batch
against an all-LoRA batch of the same size (the single-task cost)::

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
BATCHES = ("LLLL", "VVVV", "LV", "LVAl", "LVLV", "LLLLLLLL", "LVAlLVAl", "L" * 16, "LVAl" * 4)


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
    models = {}
    for kv in (True, False):  # deep prompts as keys/values, or as tokens (two backbones, same weights)
        models[kv] = MultiTaskModel.for_file(next(iter(files.values())), weights=args.weights,
                                             precision=args.precision, kv_prompts=kv)
        for name, path in files.items():
            models[kv].add_task(name, path)
    policy = models[True].pass_cost_tokens if args.pass_cost_tokens is None else args.pass_cost_tokens
    variants = {"kv": (models[True], policy), "padded": (models[False], policy), "split": (models[False], 0)}
    by_letter = dict(zip("LVAl", files))
    batches = {b: [by_letter[c] for c in b] for b in BATCHES}
    x = torch.randn(max(len(t) for t in batches.values()), 3, args.img_size, args.img_size,
                    generator=torch.Generator().manual_seed(0))
    times: dict[tuple[str, str], list[float]] = {(b, v): [] for b in batches for v in variants}
    passes = {}
    for v, (model, cost) in variants.items():  # warm-up, and the number of passes each runs
        model.pass_cost_tokens = cost
        for b, tasks in batches.items():
            model(x[:len(tasks)], tasks)
            passes[b, v] = len(model.passes(tasks))
    for _ in range(args.rounds):
        for b, tasks in batches.items():
            for v, (model, cost) in variants.items():
                model.pass_cost_tokens = cost
                t0 = time.perf_counter()
                model(x[:len(tasks)], tasks)
                times[b, v].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(t) for k, t in times.items()}
    print(machine_line(models[True].precision.name, threads=args.threads))
    print(f"{args.backbone} @{args.img_size} px; tasks L=LoRA r8, V=VPT-deep 10 prompts, A=adapter b8, l=linear; "
          f"median of {args.rounds} round-robin rounds; kv = deep prompts as attention keys/values (the default), "
          f"padded / split = prompts as tokens with pass_cost_tokens {policy} / 0; x LoRA = kv ms over the "
          "all-LoRA batch of the same size\n")
    print("| batch | rows | passes (kv / padded / split) | kv ms | padded ms | split ms | kv / best tokens | x LoRA |")
    print("|---|---|---|---|---|---|---|---|")
    for b, tasks in batches.items():
        lora = ms.get(("L" * len(b), "kv"))
        x_lora = f"{ms[b, 'kv'] / lora:.2f}" if lora else "-"
        print(f"| {b if len(b) <= 8 else b[:4] + ' x' + str(len(b) // 4)} | {len(tasks)} | "
              f"{passes[b, 'kv']} / {passes[b, 'padded']} / {passes[b, 'split']} | {ms[b, 'kv']:.1f} | "
              f"{ms[b, 'padded']:.1f} | {ms[b, 'split']:.1f} | {ms[b, 'kv'] / min(ms[b, 'padded'], ms[b, 'split']):.2f} "
              f"| {x_lora} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
