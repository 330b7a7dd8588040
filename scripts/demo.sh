#!/usr/bin/env bash
# The main job: real DINOv2 ViT-S/14 weights, real images, few-shot, on this CPU in minutes.
# VPT-deep vs linear probing vs LoRA on the same 10-shot split, the same test split, one table at the end.
#
# Data, the first that this machine has:
#   1. ../shared/data/flowers5 (the project's machines; VISTUNE_SHARED overrides ../shared),
#   2. Fashion-MNIST from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist,
#      or VISTUNE_FASHION_MNIST_DIR),
#   3. Fashion-MNIST downloaded by torchvision (30 MB, needs the network; VISTUNE_DATA_ROOT sets where),
# else it stops with one line saying what to install. `scripts/demo.sh --dry-run` only says which
# data it would use (fetching it if that is the choice) and the commands it would run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VISTUNE_PYTHON:-.venv/bin/python}
V=${VISTUNE_BIN:-.venv/bin/vistune}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi

has_fashion_mnist() {  # the four IDX files, gzipped (as the Debian package ships them) or not
    local f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f "$1/$f.gz" ] || [ -f "$1/$f" ] || return 1
    done
}

FLOWERS=${VISTUNE_SHARED:-../shared}/data/flowers5
FMNIST=${VISTUNE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -d "$FLOWERS" ]; then
    DATA=(--data "folder:$FLOWERS")
    WHAT="flowers-5 photos from $FLOWERS (5 classes, seeded 70/10/20 split)"
elif has_fashion_mnist "$FMNIST"; then
    DATA=(--data "fashion-mnist:$FMNIST" --max-per-split 1000)
    WHAT="Fashion-MNIST from $FMNIST (Debian package dataset-fashion-mnist; $FLOWERS is absent; val and test capped at 1,000 images)"
elif ERR=$("$PY" -m vistune.data fetch tv:FashionMNIST 2>&1 >/dev/null); then
    DATA=(--data tv:FashionMNIST --max-per-split 1000)
    WHAT="Fashion-MNIST from torchvision in ${VISTUNE_DATA_ROOT:-~/.cache/vistune/data} ($FLOWERS is absent, no Debian package; val and test capped at 1,000 images)"
else
    echo "demo: no data set on this machine: install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' (as root), or connect to the network so torchvision can download it, or set VISTUNE_SHARED to a folder holding data/flowers5 ($FLOWERS is absent, $FMNIST has no Fashion-MNIST, and ${ERR#*error: })" >&2
    exit 2
fi
echo "demo: data: $WHAT"

COMMON=(--backbone dinov2-s14 --img-size 84 "${DATA[@]}" --shots 10 --seed 0
        --epochs 15 --batch-size 25 --precision bf16 --val-every 15 --overwrite)
RUNS=(
    "--method linear --optimizer sgd --lr 0.1 --out runs/demo/linear"
    "--method vpt -o length=10 -o deep=true --optimizer sgd --lr 0.05 --out runs/demo/vpt-deep"
    "--method lora -o rank=8 --optimizer adamw --lr 1e-3 --out runs/demo/lora"
)
if [ "$DRY" = 1 ]; then
    for run in "${RUNS[@]}"; do echo "demo: would run: $V train ${COMMON[*]} $run"; done
    exit 0
fi
$V weights get dinov2-s14
for run in "${RUNS[@]}"; do
    # shellcheck disable=SC2086  # each RUNS entry is a flag list split on spaces on purpose
    $V train "${COMMON[@]}" $run
done
echo
echo "demo: data: $WHAT"
$V report runs/demo/linear runs/demo/vpt-deep runs/demo/lora
