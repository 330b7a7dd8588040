#!/usr/bin/env bash
# The main job: real DINOv2 ViT-S/14 weights, real images, the papers' protocol in miniature, on this
# CPU in minutes: VTAB-1k's 800 train / 200 val images, the learning rate of each method chosen on
# val (`vistune sweep`, two points of its grid), the best retrained on all 1,000 images, tested
# once on the full test split. Linear probing vs LoRA vs VPT-deep, one table at the end.
#
# Data, the first that this machine has:
#   1. ../shared/data/flowers5 (the project's machines; VISTUNE_SHARED overrides ../shared),
#   2. Fashion-MNIST from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist,
#      or VISTUNE_FASHION_MNIST_DIR),
#   3. Fashion-MNIST downloaded by torchvision (30 MB, needs the network; VISTUNE_DATA_ROOT sets where),
#   4. as root on Debian (VISTUNE_FASHION_MNIST_DIR unset), the package dataset-fashion-mnist installed
#      from the package registry,
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
    OUT=runs/demo
    WHAT="flowers-5 photos from $FLOWERS (5 classes; 800/200 train/val from the training pool, 864 test)"
elif has_fashion_mnist "$FMNIST"; then
    DATA=(--data "fashion-mnist:$FMNIST")
    OUT=runs/demo-fashion-mnist
    WHAT="Fashion-MNIST from $FMNIST (Debian package dataset-fashion-mnist; $FLOWERS is absent; 800/200 train/val, 10,000 test)"
elif ERR=$("$PY" -m vistune.data fetch tv:FashionMNIST 2>&1 >/dev/null); then
    DATA=(--data tv:FashionMNIST)
    OUT=runs/demo-fashion-mnist
    WHAT="Fashion-MNIST from torchvision in ${VISTUNE_DATA_ROOT:-~/.cache/vistune/data} ($FLOWERS is absent, no Debian package; 800/200 train/val, 10,000 test)"
elif [ -z "${VISTUNE_FASHION_MNIST_DIR:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && {
        echo "demo: no Fashion-MNIST here and no network for torchvision: installing Debian's dataset-fashion-mnist (31 MB)" >&2
        # as .ci/run does for chromium: root on a Debian machine can fetch it from the package registry
        timeout 300 bash -c 'apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }' \
            >/tmp/demo-fashion-mnist.log 2>&1; } && has_fashion_mnist "$FMNIST"; then
    DATA=(--data "fashion-mnist:$FMNIST")
    OUT=runs/demo-fashion-mnist
    WHAT="Fashion-MNIST from $FMNIST (Debian package dataset-fashion-mnist, installed by this demo; $FLOWERS is absent; 800/200 train/val, 10,000 test)"
else
    echo "demo: no data set on this machine: install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' (as root), or connect to the network so torchvision can download it, or set VISTUNE_SHARED to a folder holding data/flowers5 ($FLOWERS is absent, $FMNIST has no Fashion-MNIST, and ${ERR#*error: })" >&2
    exit 2
fi
echo "demo: data: $WHAT"

# A finished sweep folder is read back, so running the demo again prints its table at once (each
# data set has its own folder: a sweep refuses to resume with other settings).
# --precision auto: bf16 autocast only where this CPU runs it natively (AVX512-BF16/AMX), else fp32
# (emulated bf16 on an AVX2-only CPU is ~7x slower). Each trial and final run prints one line with
# its val/test number and the elapsed time, so the demo is never silent for minutes.
# Sized to finish in <= 10 minutes on 2 cores of an AVX2-only CPU in fp32 (42 px: 9 patches + CLS;
# 3 epochs; val once per trial, after its last epoch — selection uses the last epoch anyway).
COMMON=(--backbone dinov2-s14 --img-size 42 "${DATA[@]}" --subset 800/200 --trainval --seeds 1 --seed 0
        --epochs 3 --val-every 3 --batch-size 32 --warmup-epochs 1 --precision auto --grid wd=1e-4 --pruner none)
RUNS=(
    "--method linear --optimizer sgd --grid lr=0.625,0.125 --out $OUT/linear"
    "--method lora -o rank=8 --optimizer adamw --grid lr=5e-3,1e-3 --out $OUT/lora"
    "--method vpt -o length=10 -o deep=true --optimizer adamw --grid lr=1e-2,1e-3 --out $OUT/vpt-deep"
)
if [ "$DRY" = 1 ]; then
    for run in "${RUNS[@]}"; do echo "demo: would run: $V sweep ${COMMON[*]} $run"; done
    exit 0
fi
START=$SECONDS
$V weights get dinov2-s14
for run in "${RUNS[@]}"; do
    echo "demo: $V sweep $run"
    # shellcheck disable=SC2086  # each RUNS entry is a flag list split on spaces on purpose
    $V sweep "${COMMON[@]}" $run --no-progress > /dev/null
done
echo
echo "demo: data: $WHAT"
echo "demo: $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s in all"
$V report "$OUT/linear" "$OUT/lora" "$OUT/vpt-deep"
