"""``vistune sensitivity``: SPT's sensitivity scores as a stand-alone step (scores file, allocation, plot).

Training an SPT run computes the same scores itself (the method's ``prepare`` hook, with the
run's task loss); this workflow exists to look at them, and to share one file between runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from vistune.config import TrainConfig
from vistune.data import DataSplits
from vistune.engine.distributed import Dist, resolve_device
from vistune.sensitivity import accumulate_sensitivity, save_scores
from vistune.tasks.base import seed_everything
from vistune.tasks.classify import SENSITIVITY_BATCH, ClassifyTask, load_classification_data


def write_sensitivity(cfg: TrainConfig, path: Path, *, batch_size: int = SENSITIVITY_BATCH, num_batches: int = 16,
                      recompute: bool = False, rt: Dist | None = None) -> tuple[nn.Module, DataSplits, dict | None]:
    """``vistune sensitivity``: SPT's scores for ``cfg``'s backbone and data, with the classification loss.

    Returns the backbone, the data and the metadata written (None when an existing file was kept).
    """
    task = ClassifyTask()
    task.cfg, task.rt = cfg, rt or Dist(device=resolve_device(cfg.device))
    seed_everything(cfg.seed)
    backbone = task.build_backbone(cfg).to(task.rt.device)
    task.data = load_classification_data(cfg, backbone)
    path = Path(path)
    if path.is_file() and not recompute:
        return backbone, task.data, None
    t0 = time.perf_counter()
    scores, used = accumulate_sensitivity(backbone, task.sensitivity_losses(backbone, num_batches, batch_size),
                                          num_batches)
    meta = {"batch_size": batch_size, "num_batches": used, "data": cfg.data, "seconds": time.perf_counter() - t0}
    save_scores(path, scores, backbone, meta)
    return backbone, task.data, meta
