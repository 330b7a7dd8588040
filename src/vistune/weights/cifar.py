"""CIFAR-10 ResNet-20/56 from the project's shared weights folder, as timm weights.

The files (``pytorch_resnet_cifar10``, BSD-2-Clause) are not on any package index; on the
project's machines they live in ``../shared/weights`` next to the repository. They hold
``{'best_prec1', 'state_dict'}`` with keys prefixed ``module.`` (saved from DataParallel). We
verify the sha256, load with ``weights_only=True`` (never unpickle arbitrary objects), strip the
prefix, add the BatchNorm ``num_batches_tracked`` counters the old files lack, and save a plain
state dict for :mod:`vistune.cifar_resnet`, whose module names were
chosen to match these keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from vistune.weights.errors import WeightsError

if TYPE_CHECKING:
    import torch

ENV_SHARED_WEIGHTS = "VISTUNE_SHARED_WEIGHTS"

FILES = {
    "resnet20-cifar": (
        "resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    ),
    "resnet56-cifar": (
        "resnet56-4bfd9763.th",
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
    ),
}


def shared_weights_dir() -> Path:
    """``$VISTUNE_SHARED_WEIGHTS``, else ``<repo>/../shared/weights`` (a source checkout's sibling)."""
    env = os.environ.get(ENV_SHARED_WEIGHTS)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # src/vistune/weights/cifar.py -> repo root
    return repo.parent / "shared" / "weights"


def source_file(name: str) -> tuple[Path, str]:
    """(path, expected sha256) of the shared file for a zoo name; WeightsError if it is absent."""
    filename, sha = FILES[name]
    path = shared_weights_dir() / filename
    if not path.is_file():
        raise WeightsError(
            f"{name}: {filename} not found in {path.parent} (expected sha256 {sha}); "
            f"set {ENV_SHARED_WEIGHTS} to the folder holding it"
        )
    return path, sha


def convert_th(path: str | Path) -> dict[str, torch.Tensor]:
    """Plain state dict (``module.`` stripped) for :class:`vistune.cifar_resnet.CifarResNet`."""
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types
        raise WeightsError(f"{Path(path).name} is not a readable torch checkpoint: {err}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{Path(path).name}: no state_dict inside")
    out = {k.removeprefix("module."): v for k, v in state.items()}
    # Saved before BatchNorm had num_batches_tracked; torch fills it in only for state dicts
    # that still carry their old version metadata, which a safetensors file cannot, so add the
    # zero counters explicitly to keep the converted file loading strictly.
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
    return out
