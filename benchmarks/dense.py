"""Dense prediction on real data: CamVid mIoU and Penn-Fudan mAP50 per tuning method.

Each (task, method) run happens in its own subprocess (so peak memory is that run's alone) and
writes a normal dense run folder; the table is then printed from the runs' metrics.json.

    .venv/bin/python benchmarks/dense.py                       # defaults below (~20 min, 2 cores)
    .venv/bin/python benchmarks/dense.py --methods linear,lora --epochs 2

CPU budget, not a GPU-scale protocol: DINOv2-S/14 at 168 px (12x12 patch grid) instead of the
512-1024 px crops of published segmentation/detection recipes, ``max-per-split`` images per split
(val and test capped too: the test numbers are *not* comparable with published ones), a few
epochs instead of 40k-80k iterations. What it measures honestly is the relative cost (tuned
parameters, img/s, memory) and the direction of the quality differences at this budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "src"))
from vistune.report import machine_lines  # noqa: E402

# Learning rates chosen once, a priori (never on test): the head starts from scratch (1e-3,
# AdamW); method modules use the classification benchmark's rates; full fine-tuning touches
# pre-trained weights and gets 10x less.
RECIPES = {
    "linear": dict(lr=1e-3, options={}),
    "protuning": dict(lr=1e-3, options={}),
    "lora": dict(lr=1e-3, options={"rank": 8}),
    "adapter": dict(lr=1e-3, options={"bottleneck": 8}),
    "vpt": dict(lr=1e-2, options={"length": 10, "deep": True}),
    "full": dict(lr=1e-4, options={}),
}
TASKS = {
    "segment": ("CamVid", "camvid", "test_miou", "mIoU"),
    "detect": ("Penn-Fudan", "pennfudan", "test_map50", "mAP50"),
}


def run_one(spec: dict) -> None:
    """Child process: one dense training run."""
    import torch

    torch.set_num_threads(spec.pop("threads"))
    from vistune.config import TrainConfig
    from vistune.workflows.train import train

    train(TrainConfig(**spec), overwrite=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2-s14")
    ap.add_argument("--img-size", type=int, default=168)
    ap.add_argument("--tasks", default="segment,detect")
    ap.add_argument("--methods", default="linear,protuning,lora,full")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-per-split", type=int, default=100)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--precision", default="auto", help="auto: bf16 where this machine runs it natively, else fp32")
    ap.add_argument("--augment", default="flip")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (1: on a shared 2-core machine two OpenMP threads "
                         "spend most of their time waiting on each other)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-dense"))
    ap.add_argument("--camvid", default=str(SHARED / "data" / "camvid"))
    ap.add_argument("--pennfudan", default=str(SHARED / "data" / "pennfudan"))
    ap.add_argument("--table-only", action="store_true", help="print the table from existing runs in --out")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        run_one(json.loads(args.run_one))
        return 0

    out = Path(args.out)
    rows = []
    t_all = time.perf_counter()
    for task in args.tasks.split(","):
        _, kind, _, _ = TASKS[task]
        data = f"{kind}:{getattr(args, kind)}"
        for method in args.methods.split(","):
            r = RECIPES[method]
            run = out / task / method
            spec = dict(backbone=args.backbone, img_size=args.img_size, method=method, options=r["options"],
                        data=data, epochs=args.epochs, batch_size=args.batch_size, lr=r["lr"],
                        optimizer="adamw", wd=0.05, warmup_epochs=0.5, precision=args.precision,
                        augment=args.augment, max_per_split=args.max_per_split, val_every=args.epochs,
                        out=str(run), progress=False, seed=0, task=task, head_lr=args.head_lr,
                        threads=args.threads)
            if args.table_only:
                if (run / "metrics.json").is_file():
                    rows.append((task, method, json.loads((run / "metrics.json").read_text()), 0.0))
                continue
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--run-one", json.dumps(spec)]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                print(f"{task}/{method} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
                continue
            m = json.loads((run / "metrics.json").read_text())
            rows.append((task, method, m, wall))
            print(f"[{time.perf_counter() - t_all:6.0f}s] {task}/{method}: {TASKS[task][2]}="
                  f"{m[TASKS[task][2]]:.4f} ({wall:.0f}s)", file=sys.stderr, flush=True)

    if args.table_only:
        cfg = json.loads((out / rows[0][0] / rows[0][1] / "metrics.json").read_text()) if rows else {}
        print(f"(table from {out}; runs made with epochs={cfg.get('epochs')}, img_size={cfg.get('img_size')})")
    print(f"\nBackbone {args.backbone} at {args.img_size}px (letterboxed), {args.epochs} epochs, "
          f"batch {args.batch_size}, <= {args.max_per_split} images per split, {args.precision}, "
          f"augment={args.augment}, {args.threads} torch thread(s)"
          + ("" if args.table_only else f"; total {time.perf_counter() - t_all:.0f}s") + "\n")
    print("\n".join(machine_lines([{"method": f"{t}/{mth}", **m} for t, mth, m, _ in rows])) + "\n")
    print("| task | data | method | metric | test | also | tuned params | head params | train img/s | "
          "train s | peak MB | train/test imgs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task, method, m, _ in rows:
        name, _, key, label = TASKS[task]
        also = f"pixel acc {m['test_pixel_acc']:.3f}" if task == "segment" else f"mAP {m['test_map']:.3f}"
        print(f"| {task} | {name} | {method} | {label} | {m[key]:.4f} | {also} | {m['tuned_params']:,} | "
              f"{m['head_params']:,} | {m['train_img_per_s']:.1f} | {m['train_seconds']:.0f} | "
              f"{m['peak_memory_mb']:.0f} | {m['num_train']}/{m['num_test']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
