"""Every method on the same real task: test top-1, tuned params, train img/s, peak memory.

Each method runs in its own subprocess (``vistune train``) so that peak memory is that
method's alone, then the table is printed from the runs' metrics.json by vistune's report code.

    .venv/bin/python benchmarks/methods.py                     # defaults below (~10 min on 2 cores)
    .venv/bin/python benchmarks/methods.py --methods linear,lora --epochs 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Learning rates per method: SGD for head/prompt-style methods, AdamW for the rest (as in the
# papers' recipes), scaled for few-shot batch sizes. Not tuned on test: chosen once, a priori.
RECIPES = {
    "linear": dict(optimizer="sgd", lr=0.1, options=[]),
    "bitfit": dict(optimizer="adamw", lr=1e-3, options=[]),
    "vpt": dict(optimizer="sgd", lr=0.05, options=["length=10", "deep=true"]),
    "lora": dict(optimizer="adamw", lr=1e-3, options=["rank=8"]),
    "adapter": dict(optimizer="adamw", lr=1e-3, options=["bottleneck=8"]),
    "protuning": dict(optimizer="adamw", lr=1e-3, options=[]),
    "spt": dict(optimizer="adamw", lr=1e-3, options=["budget=147456", "structured=lora"]),  # = LoRA r8 q,v on ViT-S
    "full": dict(optimizer="adamw", lr=1e-4, options=[]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2-s14")
    ap.add_argument("--img-size", type=int, default=84)
    ap.add_argument("--data", default=f"folder:{SHARED / 'data' / 'flowers5'}")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--precision", default="auto", help="auto: bf16 where this machine runs it natively, else fp32")
    ap.add_argument("--methods", default="linear,bitfit,vpt,lora,adapter,spt,protuning,full")
    ap.add_argument("--force", action="store_true", help="re-run methods whose run folder already has metrics.json")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-methods"))
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from vistune.report import load_metrics, machine_lines, markdown_table

    out = Path(args.out)
    dirs = []
    for method in args.methods.split(","):
        r = RECIPES[method]
        run = out / method
        cmd = [sys.executable, "-m", "vistune.cli", "train", "--backbone", args.backbone,
               "--img-size", str(args.img_size), "--method", method, "--data", args.data,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(r["lr"]),
               "--optimizer", r["optimizer"], "--precision", args.precision, "--val-every", str(args.epochs),
               "--out", str(run), "--no-progress"]
        if args.shots:
            cmd += ["--shots", str(args.shots)]
        for o in r["options"]:
            cmd += ["-o", o]
        dirs.append(run)
        if (run / "metrics.json").is_file() and not args.force:
            print(f"reusing {run}/metrics.json (--force to re-run)", flush=True)
            continue
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = load_metrics(dirs)
    first = rows[0]
    print(f"\nbackbone {args.backbone} @ {args.img_size}px, data {args.data}, shots {args.shots}, "
          f"{args.epochs} epochs, {args.precision}; train {first['num_train']} / test {first['num_test']} images\n")
    print("\n".join(machine_lines(rows)) + "\n")
    print(markdown_table(rows))
    sens = out / "spt" / "sensitivity.safetensors"
    if sens.is_file():
        from safetensors import safe_open

        with safe_open(str(sens), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("vistune.sensitivity", "{}"))
        spt = next((r for r in rows if r["method"] == "spt"), None)
        epoch_s = spt["train_seconds"] / spt["epochs"] if spt else float("nan")
        print(f"\nSPT sensitivity pass: {meta.get('num_batches')} batches of {meta.get('batch_size')} in "
              f"{meta.get('seconds', float('nan')):.1f} s; one SPT training epoch: {epoch_s:.1f} s")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
