"""Every import the serving package takes from the engine, the dense task and the data pipeline.

The engine is being reorganised (issue 11); keeping these links in one file means a move of
``seeded_backbone`` or ``segmentation_to_original`` is a one-line change here, and nothing else
in ``vistune.serve`` reaches into those modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_backbone(name: str, weights: str | None, img_size: int | None) -> nn.Module:
    """The backbone a tuned file was trained on, built exactly as training and ``vistune eval`` build it
    (same seed for random-init test backbones, so the weights fingerprint matches)."""
    from vistune.engine.trainer import seeded_backbone

    return seeded_backbone(name, weights, img_size)


def backbone_args_from_meta(meta: dict[str, Any]) -> tuple[str, str | None, int]:
    """(name, weights, img_size) recorded in a tuned file, in the form :func:`build_backbone` takes
    (as ``evaluate_file`` reads them: weights equal to the name mean "the zoo's own")."""
    bb = meta["backbone"]
    weights = bb.get("weights")
    return bb["name"], (weights if weights != bb["name"] else None), int(bb["img_size"])


def resolve_device(name: str) -> torch.device:
    from vistune.engine.trainer import resolve_device as _resolve

    return _resolve(name)


def segmentation_to_original(logits: torch.Tensor, lb: Any) -> torch.Tensor:
    """Canvas logits (K, S, S) -> label map of the original image, as the dense metrics score it."""
    from vistune.dense.train import segmentation_to_original as _to_original

    return _to_original(logits, lb)


def palette(n: int) -> list[tuple[int, int, int]]:
    """The class colours ``vistune predict`` draws with, so the page and the CLI agree."""
    from vistune.dense.predict import palette as _palette

    return _palette(n)
