#!/usr/bin/env bash
# The main job: real DINOv2 ViT-S/14 weights, real flower photos, few-shot, on this CPU in minutes.
# VPT-deep vs linear probing on the same 10-shot split, the same test split, one table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/vistune
FLOWERS=${VISTUNE_SHARED:-../shared}/data/flowers5
if [ ! -d "$FLOWERS" ]; then
    echo "demo: $FLOWERS not found (the project's machines have ../shared/data/flowers5)." >&2
    echo "      Try any image folder instead: $V train --data folder:PATH ..." >&2
    exit 2
fi
$V weights get dinov2-s14
COMMON=(--backbone dinov2-s14 --img-size 84 --data "folder:$FLOWERS" --shots 10 --seed 0
        --epochs 15 --batch-size 25 --precision bf16 --val-every 15)
$V train "${COMMON[@]}" --method linear --optimizer sgd --lr 0.1 --out runs/demo/linear
$V train "${COMMON[@]}" --method vpt -o length=10 -o deep=true --optimizer sgd --lr 0.05 --out runs/demo/vpt-deep
$V train "${COMMON[@]}" --method lora -o rank=8 --optimizer adamw --lr 1e-3 --out runs/demo/lora
echo
$V report runs/demo/linear runs/demo/vpt-deep runs/demo/lora
