"""Where a LoRA training step's time goes, vistune's LoRA q,v vs HF PEFT's LoRA on the fused qkv.

Why: issue 23 asks vistune's LoRA to be >= 5% faster per step than PEFT's, "or a profile that shows
why that is the floor". Both run the same frozen timm backbone; this prints each one's top ops by
self CPU time (torch.profiler, the engine's classification step from ``speed.py``), so the share
that the LoRA branch can still influence is visible. Run on a quiet machine::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_lora.py [--img-size 112] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build, build_peft, make_step  # noqa: E402

from vistune.backbones import seeded_backbone, set_fused_attention  # noqa: E402
from vistune.precision import machine_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2-s14")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    backbone = seeded_backbone(args.backbone, img_size=args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    models = {"vistune lora r8 q,v": build(backbone, "lora", {"rank": 8, "targets": "q,v"}, 10, None),
              "peft lora r8 qkv": build_peft(backbone, ["qkv"], 8, 10)}
    print(machine_line("fp32") + "\n")
    for name, model in models.items():
        if model is None:
            print(f"{name}: peft is not installed")
            continue
        set_fused_attention(model, False)
        step = make_step(model, x, y, False)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / args.steps / 1000
        gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        print(f"{name}: {total:.0f} ms self CPU per step, GEMMs (mm/addmm/bmm) "
              f"{gemm / args.steps / 1000:.0f} ms = {100 * gemm / args.steps / 1000 / total:.0f}%")
        print("| op | ms/step | calls/step |\n|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"| {e.key} | {e.self_cpu_time_total / args.steps / 1000:.1f} | {e.count // args.steps} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
