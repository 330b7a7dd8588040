"""Pro-tuning's scenarios, measured: corruption, adversarial attack, out-of-distribution data and
class imbalance, for every method of the evidence table on one backbone and CIFAR-10.

It stresses the runs the evidence table already made (``benchmarks/evidence.py --parts matrix``:
800 train / 200 val, learning rate chosen on val by ``vistune sweep``, retrained on 1,000 images
with seeds 0-2), so the clean column is that table's and nothing here selects on test:

* ``vistune robustness`` on each retrained seed: all 19 ImageNet-C corruptions at severities
  1-5 (mCA), PGD-10 at eps 1/255 and 4/255, and Tiny-ImageNet images of 7 CIFAR-10 classes
  (OOD), on the same 500 seeded test images for every run; the corrupted images are made once
  (``--image-cache``) and shared by all runs.
* class imbalance: the same recipe retrained with ``--imbalance 10`` (CIFAR-10-LT on the 1,000
  images) at the learning rate the balanced sweep chose on val (not searched again: say so when
  quoting it), seeds 0-2, balanced (mean per-class) test accuracy.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/scenarios.py --evidence runs/evidence   # resumable
    .venv/bin/python benchmarks/scenarios.py --evidence runs/evidence --table-only

Every number is mean ± std over the three seeds; a gap to full fine-tuning is starred when it
exceeds both spreads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VISTUNE_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
from evidence import BACKBONES, EXTRA_CELLS, TASKS  # noqa: E402

OOD = f"npz:{SHARED}/data/tinyimagenet/tinyimagenet200_val_train20_jpeg.npz"
CLASS_MAP = ROOT / "configs" / "classmaps" / "cifar10_from_tinyimagenet.yaml"
METHODS = ("linear", "full", "bitfit", "lora", "adapter", "protuning", "vpt-pad")
SEEDS = (0, 1, 2)
SEVERITIES = (1, 2, 3, 4, 5)


def evidence_cells(backbone: str) -> dict:
    """Every evidence cell of ``backbone``: table 1's methods and the cells run beside it (e.g.
    ``full-edge``, full fine-tuning with one more learning rate), which can be stressed too."""
    return {**BACKBONES[backbone][1], **EXTRA_CELLS.get(backbone, {})}


def vistune(*args: str, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ vistune " + " ".join(args) + "\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "vistune", *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT).returncode


def cell_dir(args: argparse.Namespace, label: str) -> Path:
    return args.evidence / "matrix" / args.backbone / "cifar10" / label


def robustness(args: argparse.Namespace, label: str) -> None:
    for seed in SEEDS:
        run = cell_dir(args, label) / "final" / f"seed{seed}"
        out = args.out / "robustness" / label / f"seed{seed}"
        if not (run / "tuned.safetensors").is_file() or _severities(out) == SEVERITIES:
            continue
        # a report made with other severities is extended in place: its finished cells (clean,
        # attacks, OOD, the severities it had) are reused, only the new severities are computed
        rc = vistune("robustness", "--tuned", str(run), "--out", str(out), "--corruptions", "all",
                     "--severities", ",".join(map(str, SEVERITIES)), "--attack", "pgd", "--eps", "1/255,4/255", "--pgd-steps", "10",
                     "--max-images", str(args.max_images), "--ood", OOD, "--class-map", str(CLASS_MAP),
                     "--image-cache", str(args.out / "image-cache"), "--no-progress", log=out.parent / "log.txt")
        print(f"robustness {label} seed {seed}: {'ok' if rc == 0 else f'exit {rc}'}", flush=True)


def _severities(out: Path) -> tuple[int, ...] | None:
    """The severities a finished report covers (None: no report yet)."""
    f = out / "robustness.json"
    return tuple(json.loads(f.read_text())["settings"]["severities"]) if f.is_file() else None


def imbalance(args: argparse.Namespace, label: str) -> None:
    sweep = cell_dir(args, label) / "sweep.json"
    if not sweep.is_file():
        return
    method, opts, optimizer, _ = evidence_cells(args.backbone)[label]
    lr = json.loads(sweep.read_text())["best"]["params"]["lr"]
    size = BACKBONES[args.backbone][0]
    for seed in SEEDS:
        out = args.out / "imbalance" / label / f"seed{seed}"
        if (out / "metrics.json").is_file():
            continue
        o = [x for kv in opts for x in ("-o", kv)]
        rc = vistune("train", "--backbone", args.backbone, "--img-size", str(size), "--method", method, *o,
                     "--data", TASKS["cifar10"], "--subset", "800/200", "--trainval", "--imbalance", "10",
                     "--epochs", "6", "--batch-size", "32", "--warmup-epochs", "1", "--optimizer", optimizer,
                     "--lr", str(lr), "--wd", "1e-4", "--seed", str(seed), "--out", str(out), "--no-progress",
                     log=out.parent / "log.txt")
        print(f"imbalance {label} seed {seed}: {'ok' if rc == 0 else f'exit {rc}'}", flush=True)


def _stat(values: list[float]) -> tuple[float, float] | None:
    if len(values) < len(SEEDS):
        return None
    return statistics.fmean(values), statistics.stdev(values)


def collect(args: argparse.Namespace, label: str) -> dict[str, tuple[float, float] | None]:
    """Per column, (mean, std) over seeds, or None while a seed is missing."""
    cols: dict[str, list[float]] = {k: [] for k in ("clean", "mca", "pgd1", "pgd4", "ood", "lt_bal", "lt_top1")}
    for seed in SEEDS:
        m = cell_dir(args, label) / "final" / f"seed{seed}" / "metrics.json"
        if m.is_file():
            cols["clean"].append(json.loads(m.read_text())["test_top1"])
        r = args.out / "robustness" / label / f"seed{seed}" / "robustness.json"
        if r.is_file():
            rep = json.loads(r.read_text())
            cols["mca"].append(rep["summary"]["mca"])
            pgd = rep["attacks"]["accuracy"]["pgd"]
            cols["pgd1"].append(pgd["1/255"]["top1"])
            cols["pgd4"].append(pgd["4/255"]["top1"])
            cols["ood"].append(rep["ood"][0]["top1"])
        lt = args.out / "imbalance" / label / f"seed{seed}" / "metrics.json"
        if lt.is_file():
            met = json.loads(lt.read_text())
            cols["lt_bal"].append(met["test_balanced_top1"])
            cols["lt_top1"].append(met["test_top1"])
    return {k: _stat(v) for k, v in cols.items()}


def table(args: argparse.Namespace) -> str:
    from vistune.report import machine_lines

    made = []
    for label in args.methods.split(","):
        for seed in SEEDS:
            m = cell_dir(args, label) / "final" / f"seed{seed}" / "metrics.json"
            if m.is_file():
                met = json.loads(m.read_text())
                made.append({"method": label, "machine": met.get("machine"), "precision": met.get("precision")})
    made_with = {_severities(args.out / "robustness" / label / f"seed{seed}")
                 for label in args.methods.split(",") for seed in SEEDS} - {None}
    sev = ",".join(map(str, made_with.pop())) if len(made_with) == 1 else "MIXED: rerun to complete"
    heads = {"clean": "clean top-1", "mca": f"mCA (19 corr. x sev {sev})", "pgd1": "PGD-10 1/255",
             "pgd4": "PGD-10 4/255", "ood": "OOD top-1 (Tiny-ImageNet)", "lt_bal": "LT-10 balanced top-1"}
    rows = {label: collect(args, label) for label in args.methods.split(",") if label in evidence_cells(args.backbone)}
    lines = [f"**{args.backbone}, CIFAR-10** — % (mean ± std over seeds 0-2); (gap to {args.reference}; * = it "
             "exceeds both spreads)", "", *machine_lines(made), "",
             "| method | " + " | ".join(heads.values()) + " |", "|---|" + "---|" * len(heads)]
    full = rows.get(args.reference, {})
    for label, cols in rows.items():
        cells = []
        for key in heads:
            v = cols.get(key)
            if v is None:
                cells.append("-")
                continue
            text = f"{v[0]:.1f} ± {v[1]:.1f}"
            ref = full.get(key)
            if label != args.reference and ref is not None:
                d = v[0] - ref[0]
                text += f" ({d:+.1f}{'*' if abs(d) > v[1] + ref[1] else ''})"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", type=Path, default=ROOT / "runs" / "evidence", help="evidence.py's --out")
    ap.add_argument("--out", type=Path, default=None, help="default: EVIDENCE/scenarios")
    ap.add_argument("--backbone", default="efficientnet-lite0", choices=list(BACKBONES))
    ap.add_argument("--methods", default=",".join(METHODS), help="labels of the evidence table (VPT: vpt-pad on "
                    "CNNs, vpt-deep on DINOv2)")
    ap.add_argument("--parts", default="robustness,imbalance")
    ap.add_argument("--reference", default="full", help="the row every gap is measured against (e.g. full-edge: "
                    "full fine-tuning with the grid extended one rate below)")
    ap.add_argument("--max-images", type=int, default=500)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    args.out = args.out or args.evidence / "scenarios" / args.backbone
    if not args.table_only:
        for label in [m for m in args.methods.split(",") if m in evidence_cells(args.backbone)]:
            if "robustness" in args.parts:
                robustness(args, label)
            if "imbalance" in args.parts:
                imbalance(args, label)
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
