"""The CUDA paths, checked on a machine with a GPU: precision, training, resume, serving.

The test suite runs on CPU (CI has no GPU), so what only a GPU exercises is checked here, on
real CUDA, with assertions that fail loudly: ``--precision auto`` resolving to bf16 (and why),
fp16 training with its gradient scaler, exact resume on the device, and the multi-task server
(LoRA, VPT deep as keys/values and shallow as tokens, Adapter, BitFit, linear, full fine-tuning)
giving each row its own model's output on the GPU in fp32 and staying close in bf16::

    python benchmarks/cuda_check.py                 # on the GPU machine (exits 1 on a failed check)
    python benchmarks/cuda_check.py --device cpu    # the same checks on CPU (smoke; fp16 skipped)

Synthetic data (an npz of coloured squares, learnable in one epoch) and the tiny timm ViT, so
nothing is downloaded. Prints one line per check and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vistune import attach, load_tuned
from vistune.backbones import seeded_backbone
from vistune.precision import machine_line, resolve_precision
from vistune.serve.multitask import MultiTaskModel

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def squares_npz(path: Path, n: int = 256, size: int = 32, classes: int = 4) -> Path:
    """Each class a colour in one quadrant, on noise: a linear probe separates them in an epoch."""
    rng = np.random.default_rng(0)
    out = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 4)):
        labels = rng.integers(0, classes, count)
        imgs = rng.integers(0, 80, (count, size, size, 3)).astype(np.uint8)
        h = size // 2
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            imgs[i, r * h:(r + 1) * h, q * h:(q + 1) * h, c % 3] = 230
        out[f"{split}_images"], out[f"{split}_labels"] = imgs, labels
    np.savez(path, **out)
    return path


def train(data: Path, out: Path, device: str, precision: str, *extra: str) -> tuple[int, dict, str]:
    """``vistune train`` through its own entry point (argument parsing, precision resolution, run
    files), in this process: a second interpreter would add only another torch import."""
    from vistune.cli import main

    argv = ["train", "--backbone", "test_vit", "--img-size", "32", "--data", f"npz:{data}", "--method", "lora",
            "--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--optimizer", "adamw", "--device", device,
            "--precision", precision, "--out", str(out), "--no-progress", *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    return rc, metrics, err.getvalue()[-2000:]


def check_precision(device: str) -> None:
    p = resolve_precision("auto", device)
    if device.startswith("cuda"):
        want = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        check("auto resolves by the device", p.name == want, f"{p.name} ({p.reason})")
        fp16 = resolve_precision("fp16", device)
        check("fp16 on CUDA has a gradient scaler", fp16.grad_scaler("cuda") is not None, fp16.reason)
    else:
        check("auto resolves by the device", p.name in ("fp32", "bf16"), f"{p.name} ({p.reason})")


def check_training(device: str, work: Path) -> None:
    data = squares_npz(work / "squares.npz")
    precisions = ["auto", "fp32", "fp16"] if device.startswith("cuda") else ["auto"]  # CPU: a smoke run
    for prec in precisions:
        t0 = time.perf_counter()
        rc, m, log = train(data, work / f"train-{prec}", device, prec)
        ok = rc == 0 and m.get("device", "").startswith(device.split(":")[0])
        check(f"train lora --precision {prec}", ok,
              f"ran {m.get('precision')} on {m.get('device')}, test_top1 {m.get('test_top1')}, "
              f"{time.perf_counter() - t0:.1f} s" if ok else f"rc {rc}: {log}")
        if ok:
            check(f"  learns ({prec})", float(m.get("test_top1", 0)) > 50.0, f"test_top1 {m.get('test_top1')} (4 classes)")
    # exact resume on the device: 2 epochs straight vs stopped after 1 and resumed (engine test's protocol)
    from vistune.config import make_config
    from vistune.workflows.train import train as train_api

    def cfg(out: str):
        return make_config(backbone="test_vit", img_size=32, method="lora", data=f"npz:{data}", epochs=2,
                           batch_size=32, lr=3e-3, optimizer="adamw", out=str(work / out), progress=False,
                           device=device, precision="fp32")

    full = train_api(cfg("straight"))
    stopped = train_api(cfg("resumed"), stop_after_epoch=1)
    resumed = train_api(cfg("resumed"), resume=True)
    same = all(resumed[k] == full[k] for k in ("val_top1", "test_top1", "test_loss"))
    check("exact resume on the device", stopped == {"stopped_after_epoch": 1} and same,
          f"test_loss {full['test_loss']:.6f} straight, {resumed['test_loss']:.6f} resumed")


def check_serving(device: str, work: Path) -> None:
    specs = {"lora": ("lora", {"rank": 4}), "vptdeep": ("vpt", {"length": 5, "deep": True}),
             "vpt": ("vpt", {"length": 3}), "adapter": ("adapter", {"bottleneck": 4}), "bitfit": ("bitfit", {}),
             "linear": ("linear", {}), "full": ("full", {})}
    files = {}
    for i, (name, (method, opts)) in enumerate(specs.items()):
        tuned = attach(seeded_backbone("test_vit", None, 32), method, num_classes=3, **opts)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in tuned.tuned_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        files[name] = tuned.save_tuned(work / f"{name}.safetensors")
    mt = MultiTaskModel(seeded_backbone("test_vit", None, 32), device=device, precision="fp32")
    for name, path in files.items():
        mt.add_task(name, path)
    check("deep prompts served as keys/values", bool(mt.tasks["vptdeep"].kv) and mt.tasks["vptdeep"].tokens == 0)
    tasks = [n for n in files for _ in range(3)]
    x = torch.randn(len(tasks), 3, 32, 32, generator=torch.Generator().manual_seed(9))
    out = mt.forward(x, tasks)
    worst = 0.0
    for name, path in files.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        own = load_tuned(path, seeded_backbone("test_vit", None, 32)).to(device).eval()
        with torch.no_grad():
            want = own(x[idx].to(device))
        got = torch.cat([out[i] for i in idx])
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    check(f"serve: every row equals its own model on {device} (fp32)", worst < 1e-4, f"max difference {worst:.2e}")
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        mt.precision = resolve_precision("bf16", device)
        approx = mt.forward(x, tasks)
        gap = max((a.float() - b.float()).abs().max().item() for a, b in zip(approx, out))
        check("serve: bf16 stays close to fp32", gap < 0.05, f"max difference {gap:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_check: no CUDA device here (use --device cpu for the smoke run)", file=sys.stderr)
        return 2
    print(machine_line(resolve_precision("auto", args.device).name, threads=torch.get_num_threads()))
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in (check_precision, check_training, check_serving):
            try:
                part(args.device) if part is check_precision else part(args.device, work)
            except Exception as err:  # noqa: BLE001 - one broken part must not hide the others
                check(part.__name__, False, f"{type(err).__name__}: {err}")
    print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
