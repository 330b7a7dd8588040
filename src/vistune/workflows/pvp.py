"""PVP (pre-trained visual parameter-efficient tuning), stage 1: pre-train a method's modules.

Stage 1 trains the modules on one or several source datasets with the backbone frozen
(:class:`~vistune.tasks.multisource.MultiSourceTask` on the engine's one loop); stage 2 is an
ordinary run with ``init_from`` = the module file (:func:`vistune.tuning.attach_from_file`), whose
checks (backbone fingerprint, method, option shapes, no source image in the target's test split)
live with the contract and the classification task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune.config import TrainConfig
from vistune.engine.callbacks import Callback, ending
from vistune.engine.distributed import Dist, init_distributed
from vistune.engine.loop import fit
from vistune.engine.rundir import RunDir
from vistune.tasks.multisource import MultiSourceTask
from vistune.workflows.train import check_method


def pretrain(cfg: TrainConfig, sources: list[str], out: str | os.PathLike | None = None, *,
             resume: bool = False, overwrite: bool = False, train_on_test: bool = False,
             dist: Dist | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train ``cfg.method``'s modules on ``sources`` (backbone frozen), one head per source.

    Writes ``modules.safetensors`` (the spine's format: module tensors plus source 0's head, the
    sources' eval numbers and content hashes of their images), ``heads.safetensors`` (every
    head, for inspection), ``metrics.json`` and ``log.jsonl`` to ``out`` (default ``cfg.out``).
    """
    check_method(cfg)
    dist = dist or init_distributed(cfg.device)
    out = Path(out if out is not None else cfg.out)
    task = MultiSourceTask(sources, train_on_test)
    with RunDir(out, overwrite=overwrite, resume=resume, is_main=dist.is_main):
        task.setup(cfg, dist, out)
        with ending(callbacks if dist.is_main else (), out):
            metrics = fit(task, cfg, dist, out=out, resume=resume, extra={"sources": list(sources)},
                          callbacks=callbacks)
    metrics["modules_file"] = str(out / metrics["modules_file"])
    return metrics
