#!/usr/bin/env bash
# PVP few-shot benchmark (issue 6): DINOv2 ViT-S/14 (real weights) at 56 px.
# Source: Fashion-MNIST (capped to 3,000 train images, 3 epochs) -> modules for VPT-deep and LoRA.
# Targets: PneumoniaMNIST and flowers-5, 1/2/4/8/16 shots x 3 seeds, full test splits.
# Variants: random-init vs PVP-init modules for VPT-deep and LoRA, plus linear probing.
# Usage: bash benchmarks/pvp_fewshot.sh [OUT]   (about 40 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/vistune
OUT=${1:-runs/bench-pvp}
SHARED=${VISTUNE_SHARED:-../shared}
COMMON=(--backbone dinov2-s14 --img-size 56 --batch-size 16 --precision auto --optimizer adamw --no-progress)
for m in vpt lora; do
    opts=(-o rank=8); [ $m = vpt ] && opts=(-o length=10 -o deep=true)
    [ -f $OUT/source-$m/modules.safetensors ] || \
        $V pretrain "${COMMON[@]}" --method $m "${opts[@]}" --data fashion-mnist --max-per-split 3000 \
            --epochs 3 --lr 1e-3 --out $OUT/source-$m
done
for target in "npz:$SHARED/data/pneumoniamnist.npz pneumonia" "folder:$SHARED/data/flowers5 flowers5"; do
    set -- $target
    $V fewshot "${COMMON[@]}" --data "$1" --shots 1,2,4,8,16 --seeds 3 \
        --compare linear,vpt,vpt+pvp,lora,lora+pvp -o vpt:length=10 -o vpt:deep=true -o lora:rank=8 \
        --pvp vpt=$OUT/source-vpt/modules.safetensors --pvp lora=$OUT/source-lora/modules.safetensors \
        --epochs 10 --val-every 10 --lr 1e-3 --lr-for linear=1e-2 --lr-for vpt=1e-2 --out $OUT/$2
done
