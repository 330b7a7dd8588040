"""``vistune train`` and ``vistune eval``: one run of one task into one output folder, and its re-evaluation.

A run is: lock the output folder (:class:`~vistune.engine.rundir.RunDir`), set the task up
(backbone -> data -> method -> head), :func:`~vistune.engine.loop.fit`, and let rank 0 write the
task's files with ``metrics.json`` as one set. ``evaluate_run`` rebuilds a run from its files
alone and evaluates a split with the same task code, so it reproduces the run's own test number.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune.config import ConfigError, TrainConfig
from vistune.engine.callbacks import Callback, ending
from vistune.engine.distributed import Dist, init_distributed, resolve_device
from vistune.engine.loop import fit
from vistune.engine.rundir import RunDir
from vistune.methods import get_method, parse_options
from vistune.precision import resolve_precision
from vistune.tasks import DEFAULT_TASK, get_task, kind_of_run, make_task
from vistune.tasks.base import SavedRun, saved_config, trained_precision  # noqa: F401 - their old home


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epoch: int | None = None,
    data: Any = None,
    callbacks: Sequence[Callback] = (),
    evaluate_test: bool = True,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.out``; returns the metrics (also written to ``OUT/metrics.json``).

    Under ``torchrun`` every rank calls this with the same ``cfg``; ``dist`` defaults to the job
    described by the environment (one process otherwise). ``data`` lets tests and benchmarks
    reuse decoded data; ``evaluate_test=False`` never touches the test split (sweep trials).
    """
    dist = dist or init_distributed(cfg.device)
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                          f"number of processes ({dist.world})")
    check_method(cfg)
    task = make_task(cfg.task)
    out = Path(cfg.out)
    with RunDir(out, overwrite=overwrite, resume=resume, is_main=dist.is_main):
        task.setup(cfg, dist, out, **({"data": data} if data is not None else {}))
        if cfg.select == "best-val" and not task.has_split("val"):
            raise ConfigError("select=best-val needs a validation split, and this data has none (trainval?)")
        with ending(callbacks if dist.is_main else (), out):  # tracking: artefacts once written, run status
            return fit(task, cfg, dist, out=out, callbacks=callbacks, resume=resume,
                       stop_after_epoch=stop_after_epoch, evaluate_test=evaluate_test)


def check_method(cfg: TrainConfig) -> None:
    """Unknown methods and bad method options fail before anything is created or loaded."""
    parse_options(get_method(cfg.method), cfg.options)


def check_shared_settings(cfg: TrainConfig) -> None:
    """Check once what every run of a multi-run workflow shares, before the first run starts.

    The method options, the device, the backbone with its weights and image size, and the data.
    A sweep trial that fails on one of these fails inside Optuna, which logs the trial's
    traceback before the CLI's one line; checked here, the sweep stops with the one line only.
    """
    check_method(cfg)
    resolve_device(cfg.device)
    task = make_task(cfg.task)
    task.load_data(cfg, task.build_backbone(cfg))


def evaluate_run(
    path: str | os.PathLike,
    data_spec: str | None = None,
    split: str = "test",
    *,
    batch_size: int = 64,
    device: str = "auto",
    weights: str | None = None,
    allow_class_mismatch: bool = False,
    dist: Dist | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Rebuild the run at ``path`` (folder or tuned file) and evaluate ``split`` of its data.

    The data spec, seed, trainval flag and split cap default to what the run recorded, so
    ``evaluate_run(run)`` reproduces the run's test numbers. The data's class names must equal
    the ones the run was trained with (``allow_class_mismatch`` for the rare intended case).
    ``precision="auto"`` keeps the precision the run trained in where this hardware runs it
    natively (so the number reproduces), else fp32; an explicit choice is used as given.
    The run's files say which task kind it is; that kind rebuilds it (:meth:`Task.open_saved`).
    """
    dist = dist or init_distributed(device)
    kind = kind_of_run(path)
    run = kind.open_saved(Path(path), data_spec, weights, dist.device, batch_size=batch_size,
                          device=str(dist.device))
    cfg, names = run.cfg, run.class_names
    task = kind()
    task.use_precision(resolve_precision(precision, dist.device, prefer=run.trained_precision))
    task.setup_saved(run, dist)
    check_class_names(names, list(task.data.class_names), cfg.data, allow_class_mismatch)
    if not task.has_split(split):
        raise ConfigError(f"data {cfg.data!r} has no {split!r} split")
    res = task.evaluate(split)
    fields = task.metric_fields(split, res, final=True)
    return {**fields, f"num_{split}": _split_size(task, split), "task": task.name, **task.precision.fields()}


def open_classification_run(path: str | os.PathLike, data_spec: str | None, weights: str | None,
                            **changes: Any) -> SavedRun:
    """A classification run folder or tuned file -> its tuned model and the config of its data
    (``vistune robustness``, which is defined for classification)."""
    return get_task(DEFAULT_TASK).open_saved(Path(path), data_spec, weights, None, **changes)


def _split_size(task: Any, split: str) -> int:
    return len(getattr(task.data, split))


def check_class_names(recorded: list[str] | None, found: list[str], spec: str, allow: bool) -> None:
    """Refuse evaluating a model on data whose classes are not the ones it was trained on."""
    if recorded is None or allow or list(recorded) == list(found):
        return
    raise ConfigError(
        f"data {spec!r} has classes {_short(found)}, but the model was trained on {_short(recorded)}; "
        "pass --allow-class-mismatch if this is intended"
    )


def _short(names: list[str]) -> str:
    return "[" + ", ".join(names[:5]) + (", …" if len(names) > 5 else "") + f"] ({len(names)})"


def with_changes(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of ``cfg`` with ``changes`` (workflows derive per-run configs this way)."""
    new = dataclasses.replace(cfg, **changes)
    new.validate()
    return new
