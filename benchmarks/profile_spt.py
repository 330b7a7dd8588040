"""Where SPT's train step spends time beyond LoRA's: op-level profiles and round-robin ratios.

Why: issue 22 asks SPT-LoRA and SPT-Adapter at 0.15 M to run at <= 0.75x full fine-tuning per step
in fp32 (<= 0.80x in bf16). The gap to LoRA q,v is in the ops SPT adds around its sparse hosts, so
this prints, per variant, the top ops by self CPU time with their call counts, and the median step
time of every variant measured round-robin in this one process (drift hits all alike) as a ratio
to LoRA q,v and to full fine-tuning. Ratios, not milliseconds, are the result on a shared machine::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_spt.py [--threads 1] [--rounds 5] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import VARIANTS, build, make_step, sensitivity_file  # noqa: E402

from vistune.backbones import seeded_backbone, set_fused_attention  # noqa: E402
from vistune.precision import machine_line  # noqa: E402

DEFAULT = "full;lora r8 q,v;adapter b8;spt-lora 0.15M;spt-adapter 0.15M"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2-s14")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds of one step per variant (0: none)")
    ap.add_argument("--profile", default="lora r8 q,v;spt-lora 0.15M;spt-adapter 0.15M",
                    help="variants to profile, separated by ; (empty: none)")
    ap.add_argument("--variants", default=DEFAULT, help="variants to time, separated by ;")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--bf16", action="store_true", help="autocast bf16 instead of fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = seeded_backbone(args.backbone, img_size=args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    scores, _ = sensitivity_file(backbone, x, y, 10, Path(tempfile.mkdtemp()) / "s.safetensors")
    timed = [v for v in args.variants.split(";") if v]
    profiled = [v for v in args.profile.split(";") if v]
    steps = {}
    for label in dict.fromkeys(timed + profiled):
        model = build(backbone, *VARIANTS[label], 10, scores)
        set_fused_attention(model, False)
        steps[label] = make_step(model, x, y, args.bf16)
        steps[label]()  # warm-up
    print(machine_line("bf16" if args.bf16 else "fp32") + f", {args.threads} thread(s)\n")
    for label in profiled:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            steps[label]()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1000
        print(f"{label}: {total:.0f} ms self CPU in one step, {sum(e.count for e in events)} op calls")
        print("| op | ms | share | calls | MB allocated |\n|---|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            ms = e.self_cpu_time_total / 1000
            print(f"| {e.key} | {ms:.1f} | {100 * ms / total:.1f}% | {e.count} | {e.self_cpu_memory_usage / 2**20:.0f} |")
        print()
    if args.rounds:
        wall: dict[str, list[float]] = {label: [] for label in timed}
        cpu: dict[str, list[float]] = {label: [] for label in timed}
        for _ in range(args.rounds):
            for label in timed:
                t0, c0 = time.perf_counter(), time.thread_time()
                steps[label]()
                wall[label].append(time.perf_counter() - t0)
                cpu[label].append(time.thread_time() - c0)
        print(f"median of {args.rounds} round-robin rounds, one step each; CPU = this thread's CPU time "
              "(less sensitive than wall time to other processes on a shared machine)")
        print("| variant | wall ms | CPU ms | wall x lora q,v | CPU x lora q,v | wall x full | CPU x full |")
        print("|---|---|---|---|---|---|---|")
        for label in timed:
            w, c = statistics.median(wall[label]), statistics.median(cpu[label])
            lw, lc = (statistics.median(t["lora r8 q,v"]) if "lora r8 q,v" in t else float("nan") for t in (wall, cpu))
            fw, fc = (statistics.median(t["full"]) if "full" in t else float("nan") for t in (wall, cpu))
            print(f"| {label} | {1000 * w:.0f} | {1000 * c:.0f} | {w / lw:.2f} | {c / lc:.2f} | {w / fw:.2f} | {c / fc:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
