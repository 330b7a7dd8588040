"""Tuned-parameter counts of every method on ViT-B/16, Swin-B and ConvNeXt-B (and the CNNs), built
on the meta device (no weights, no memory), beside the closed form each method's docs give.

    .venv/bin/python benchmarks/family_counts.py            # the README's method x family table
    .venv/bin/python benchmarks/family_counts.py --archs resnet50,efficientnet_lite0

A cell a family cannot carry prints the method's own one-line refusal (shortened). The head is
excluded everywhere (1000-class heads would dominate); counts are of the backbone-side modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = {  # label: (method, options)
    "bitfit": ("bitfit", {}),
    "vpt-shallow p50": ("vpt", {"length": 50}),
    "vpt-deep p50": ("vpt", {"length": 50, "deep": True}),
    "vpt pad p30": ("vpt", {"length": 30, "location": "pad"}),
    "lora r8 (family default)": ("lora", {"rank": 8}),
    "adapter b8": ("adapter", {"bottleneck": 8}),
    "protuning": ("protuning", {}),
}
ARCHS = ("vit_base_patch16_224", "swin_base_patch4_window7_224", "convnext_base", "resnet50", "efficientnet_lite0",
         "mobilenetv2_100")


def count(arch: str, method: str, options: dict, notes: list[str]) -> str:
    from vistune.backbones import create_backbone
    from vistune.errors import MethodError
    from vistune.tuning import attach

    with torch.device("meta"):
        model = create_backbone(arch, load_weights=False)
        try:
            tuned = attach(model, method, num_classes=10, **options)
        except MethodError as err:
            why = str(err).replace(arch, "the backbone")
            if why not in notes:
                notes.append(why)
            return f"refused ({notes.index(why) + 1})"
    n = sum(p.numel() for p in tuned.method.tuned_parameters(tuned.model))
    return f"{n / 1e6:.3f} M"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    print("| method | " + " | ".join(archs) + " |")
    print("|---|" + "---|" * len(archs))
    notes: list[str] = []
    for label, (method, options) in METHODS.items():
        print(f"| {label} | " + " | ".join(count(a, method, options, notes) for a in archs) + " |")
    print()
    for i, why in enumerate(notes, 1):
        print(f"({i}) {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
