"""What torch.compile costs and saves per method: the numbers ``--compile auto`` decides with.

For each variant the eager step and the compiled step are timed on the same fixed batch (the
engine's step: forward under the precision, cross-entropy, backward, clip, AdamW, schedule —
``speed.py``'s ``make_step``), the compiled ones round-robin with the eager ones so drift hits both.
The compile time is the first compiled step minus a steady compiled step. ``break-even steps`` =
compile seconds / seconds saved per step: a run with fewer training steps left is faster eager,
which is the rule ``vistune train --compile auto`` applies with these numbers (measured again on
each machine the first time it compiles, see ``vistune.engine.autocompile``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compile_cost.py                 # DINOv2-S @112, batch 32
    .venv/bin/python benchmarks/compile_cost.py --backbone test_vit --img-size 32 --variants "lora r8 q,v" --rounds 2

Time nothing while anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speed import VARIANTS, build, make_step

DEFAULT_VARIANTS = "full;lora r8 q,v;adapter b8;vpt-deep p10;bitfit"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", "--arch", default="dinov2-s14")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 where this CPU runs it natively, else fp32 (what a run would use)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="speed.py labels separated by ;")
    args = ap.parse_args()

    from vistune.backbones import seeded_backbone, set_fused_attention
    from vistune.precision import machine_line, native_bf16

    prec = args.precision
    if prec == "auto":
        prec = "bf16" if native_bf16(torch.device("cpu"))[0] else "fp32"
    bf16 = prec == "bf16"
    torch.manual_seed(0)
    backbone = seeded_backbone(args.backbone, img_size=args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    labels = [v.strip() for v in args.variants.split(";") if v.strip()]
    eager, compiled, first = {}, {}, {}
    for label in labels:
        models = [build(backbone, *VARIANTS[label], args.num_classes, None) for _ in range(2)]
        for m in models:
            set_fused_attention(m, False)
        eager[label] = make_step(models[0], x, y, bf16)
        eager[label]()  # allocator warm-up
        torch._dynamo.reset()
        compiled[label] = make_step(torch.compile(models[1]), x, y, bf16)
        t0 = time.perf_counter()
        compiled[label]()
        first[label] = time.perf_counter() - t0
        print(f"{label}: first compiled step {first[label]:.1f} s", file=sys.stderr, flush=True)
        compiled[label]()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for label in labels:
            for kind, fn in (("eager", eager[label]), ("compiled", compiled[label])):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times.setdefault((label, kind), []).append((time.perf_counter() - t0) / args.steps)

    print("\n" + machine_line(prec))
    print(f"{args.backbone} @{args.img_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, inductor, median of {args.rounds} rounds x {args.steps} steps\n")
    print("| variant | eager ms/step | compiled ms/step | saved | compile s | break-even steps |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        e = statistics.median(times[(label, "eager")])
        c = statistics.median(times[(label, "compiled")])
        compile_s = first[label] - c
        saved = e - c
        even = f"{compile_s / saved:,.0f}" if saved > 0 else "never"
        print(f"| {label} | {e * 1000:.0f} | {c * 1000:.0f} | {saved / e:+.0%} | {compile_s:.0f} | {even} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
