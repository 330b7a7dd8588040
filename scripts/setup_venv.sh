#!/usr/bin/env bash
# Creates .venv with the torch build that exists on this kind of machine (pinned here only;
# pyproject keeps ranges so users elsewhere can bring their own CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e '.[dev]'
