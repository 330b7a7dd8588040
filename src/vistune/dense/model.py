"""A tuned backbone plus a dense head, and the two files a dense run writes.

Files: ``tuned.safetensors`` is the spine's tuned file, untouched (method tensors only; the
timm classifier is ``Identity``), so everything that reads tuned files (eval, info, serving,
merging) keeps working on it. The head lives next to it in ``dense_head.safetensors``: its
tensors plus JSON metadata (format, task, :class:`HeadConfig` with the feature levels, class
names, the backbone fingerprint and method spec it was trained with, and the letterbox size).
Loading checks that the pair belongs together (same backbone fingerprint and method spec), so a
head can never silently run on a different backbone or method file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.backbones import backbone_for_file
from vistune.dense.features import FeatureExtractor, default_levels
from vistune.dense.heads import DenseHead, HeadConfig
from vistune.engine.distributed import resolve_device
from vistune.errors import TunedFileError
from vistune.io import read_with_json_meta, write_set_atomic
from vistune.tuning import TunedModel, load_tuned, read_tuned_file

HEAD_FORMAT = "vistune.dense_head/1"
HEAD_FILE = "dense_head.safetensors"
TUNED_FILE = "tuned.safetensors"
_META_KEY = "vistune.dense"


class DenseModel(nn.Module):
    """``images -> head output``: the frozen+tuned backbone's features read by a dense head."""

    def __init__(self, tuned: TunedModel, head: DenseHead) -> None:
        super().__init__()
        self.tuned = tuned
        self.head = head
        self.extractor = FeatureExtractor(tuned.model, head.cfg.level_objs(), tuned.method.routing().tokens)

    @property
    def task(self) -> str:
        return self.head.cfg.task

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(x)

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(self.features(x), tuple(x.shape[-2:]))

    def train(self, mode: bool = True) -> DenseModel:
        """The tuned model decides what of the backbone trains; the head always follows ``mode``."""
        self.training = mode
        self.tuned.train(mode)
        self.head.train(mode)
        return self

    def method_parameters(self) -> list[nn.Parameter]:
        return self.tuned.tuned_parameters(include_head=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.method_parameters() + list(self.head.parameters())


def head_config(model: nn.Module, task: str, num_classes: int,
                head_options: dict[str, Any] | None = None) -> HeadConfig:
    """The :class:`HeadConfig` for a timm ``model`` (levels resolved from its structure).

    ``head_options``: ``width`` (neck/head channels, default 64), ``levels`` (ViT block indices
    or CNN feature_info indices; default: four levels, of which detection keeps the coarsest
    ``det_levels`` = 3), ``score_threshold``, ``nms_iou``, ``max_detections``.
    """
    opts = dict(head_options or {})
    chosen = opts.pop("levels", None)
    levels = default_levels(model, chosen)
    if task == "detect" and chosen is None:
        # FCOS reads strides ~8-32; the finest (stride-4) level would only cost time
        levels = levels[-max(1, int(opts.get("det_levels", HeadConfig.det_levels))):]
    unknown = set(opts) - set(HeadConfig.__dataclass_fields__) | ({"task", "num_classes", "levels"} & set(opts))
    if unknown:
        raise ValueError(f"unknown head option(s) {sorted(unknown)}; valid: width, levels, det_levels, "
                         "score_threshold, nms_iou, max_detections")
    return HeadConfig(task=task, num_classes=num_classes, levels=[lv.to_dict() for lv in levels], **opts)


def build_dense_model(tuned: TunedModel, task: str, num_classes: int,
                      head_options: dict[str, Any] | None = None) -> DenseModel:
    """Attach a fresh dense head (see :func:`head_config` for ``head_options``) to a tuned model."""
    cfg = head_config(tuned.model, task, num_classes, head_options)
    device = next(tuned.model.parameters()).device
    return DenseModel(tuned, DenseHead(cfg).to(device))


def dense_files(model: DenseModel, extra: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """(name, writer) pairs of a dense run's two model files, for a writer that commits a set."""
    extra = dict(extra or {})
    tuned_extra = {**extra, "dense": {"task": model.task, "head_file": HEAD_FILE}}
    meta = {
        "format": HEAD_FORMAT,
        "task": model.task,
        "head": model.head.cfg.to_dict(),
        "method": model.tuned.spec.to_dict(),
        "backbone_fingerprint": model.tuned.base_fingerprint,
        "tuned_file": TUNED_FILE,
        **extra,
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.head.state_dict().items()}

    def write_head(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})

    return [(TUNED_FILE, lambda tmp: model.tuned.write_tuned(tmp, extra=tuned_extra)), (HEAD_FILE, write_head)]


def save_dense(model: DenseModel, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``tuned.safetensors`` (spine format) and ``dense_head.safetensors`` into ``out_dir``."""
    tuned, head = write_set_atomic(out_dir, dense_files(model, extra))
    return tuned, head


def is_dense_run(path: str | os.PathLike) -> bool:
    """True for a dense run folder or either of its files (lets ``vistune eval`` dispatch)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return (folder / HEAD_FILE).is_file() and (p.is_dir() or p.name in (TUNED_FILE, HEAD_FILE))


def resolve_run(path: str | os.PathLike) -> tuple[Path, Path]:
    """A run folder, its tuned file or its head file -> (tuned file, head file)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    tuned, head = folder / TUNED_FILE, folder / HEAD_FILE
    if p.is_file() and p.name not in (TUNED_FILE, HEAD_FILE):
        raise TunedFileError(f"{p}: expected a dense run folder, {TUNED_FILE} or {HEAD_FILE}")
    for f in (tuned, head):
        if not f.is_file():
            raise TunedFileError(f"dense run {folder}: {f.name} is missing (is this the folder of a `vistune train --task segment|detect` run?)")
    return tuned, head


def read_head_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return read_with_json_meta(path, _META_KEY, HEAD_FORMAT, TunedFileError, "dense head file", "vistune train --task")


def load_dense(path: str | os.PathLike, device: str | torch.device = "cpu",
               weights: str | os.PathLike | None = None) -> tuple[DenseModel, dict[str, Any]]:
    """Rebuild backbone + method + head from a dense run; returns the model (eval mode) and head metadata.

    ``weights``: the backbone weights file, for runs trained on a local file (the tuned file
    records only a label; see :func:`vistune.backbones.backbone_for_file`).
    """
    device = resolve_device(device)  # a bad --device fails before any file is read
    tuned_path, head_path = resolve_run(path)
    head_meta, head_tensors = read_head_file(head_path)
    meta, _ = read_tuned_file(tuned_path)
    if meta["backbone"].get("fingerprint") != head_meta.get("backbone_fingerprint") or meta["method"] != head_meta.get("method"):
        raise TunedFileError(f"{head_path} was trained with another backbone or method than {tuned_path}")
    tuned = load_tuned(tuned_path, backbone_for_file(meta["backbone"], tuned_path, weights))
    cfg = HeadConfig.from_dict(head_meta["head"])
    model = DenseModel(tuned, DenseHead(cfg))
    try:
        model.head.load_state_dict(head_tensors, strict=True)
    except RuntimeError as err:
        raise TunedFileError(f"dense head file {head_path} does not fit its recorded config: {err}") from None
    model.to(device).eval()
    return model, head_meta
