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

from vistune.config import ConfigError, TrainConfig, config_keys, make_config
from vistune.engine.callbacks import Callback, ending
from vistune.engine.distributed import Dist, init_distributed
from vistune.engine.loop import fit
from vistune.engine.rundir import RunDir
from vistune.precision import resolve_precision
from vistune.tasks import make_task


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
    from vistune.methods import get_method, parse_options

    parse_options(get_method(cfg.method), cfg.options)


def check_shared_settings(cfg: TrainConfig) -> None:
    """Check once what every run of a multi-run workflow shares, before the first run starts.

    The method options, the device, the backbone with its weights and image size, and the data.
    A sweep trial that fails on one of these fails inside Optuna, which logs the trial's
    traceback before the CLI's one line; checked here, the sweep stops with the one line only.
    """
    from vistune.engine.distributed import resolve_device

    check_method(cfg)
    resolve_device(cfg.device)
    task = make_task(cfg.task)
    task.load_data(cfg, task.build_backbone(cfg))


def saved_config(values: dict[str, Any] | None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a run's recorded config (keys this version does not know are dropped)."""
    known = set(config_keys())
    base = {k: v for k, v in (values or {}).items() if k in known}
    base.update(overrides)
    return make_config(base)


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
    """
    from vistune.dense.model import is_dense_run, load_dense

    dist = dist or init_distributed(device)
    p = Path(path)
    if is_dense_run(p):
        model, meta = load_dense(p, dist.device, weights)
        recorded = meta.get("config") or {}
        names = meta.get("class_names")
        cfg = saved_config(recorded, data=data_spec or recorded.get("data"), batch_size=batch_size,
                           device=str(dist.device), shots=None, augment=None, progress=False)
        task = make_task(model.task)
        task.use_precision(resolve_precision(precision, dist.device, prefer=trained_precision(meta, recorded)))
        task.setup(cfg, dist, None, model=model)
    else:
        run = open_classification_run(p, data_spec, weights, batch_size=batch_size, device=str(dist.device))
        extra, cfg, tuned = run.extra, run.cfg, run.tuned
        names = extra.get("class_names")
        task = make_task("classify")
        task.use_precision(resolve_precision(precision, dist.device, prefer=trained_precision(extra, run.recorded)))
        task.setup(cfg, dist, None, tuned=tuned)
        task.train_counts = extra.get("train_class_counts")  # the run's, for its group metrics
        if task.data.num_classes != tuned.num_classes:
            raise ConfigError(f"data {cfg.data!r} has {task.data.num_classes} classes, the tuned file "
                              f"{tuned.num_classes}")
    check_class_names(names, list(task.data.class_names), cfg.data, allow_class_mismatch)
    if not task.has_split(split):
        raise ConfigError(f"data {cfg.data!r} has no {split!r} split")
    res = task.evaluate(split)
    fields = task.metric_fields(split, res, final=True)
    return {**fields, f"num_{split}": _split_size(task, split), "task": task.name, **task.precision.fields()}


@dataclasses.dataclass
class SavedRun:
    """A classification run rebuilt from its tuned file: the model, the file's metadata, and the
    run config that reloads its data (see :func:`open_classification_run`)."""

    tuned_path: Path
    meta: dict[str, Any]
    tuned: Any  # vistune.tuning.TunedModel
    cfg: TrainConfig

    @property
    def extra(self) -> dict[str, Any]:
        return self.meta.get("extra") or {}

    @property
    def recorded(self) -> dict[str, Any]:
        return self.extra.get("config") or {}


def open_classification_run(path: str | os.PathLike, data_spec: str | None, weights: str | None,
                            **changes: Any) -> SavedRun:
    """A classification run folder or tuned file -> its tuned model and the config of its data.

    The one way ``vistune eval`` and ``vistune robustness`` rebuild a run: the data spec defaults
    to the recorded one, and nothing that only shapes training (shots, imbalance, augmentation)
    is applied again, so the evaluated splits are the run's own.
    """
    from vistune.backbones import backbone_for_file
    from vistune.tuning import load_tuned, read_tuned_file

    p = Path(path)
    tuned_path = p / "tuned.safetensors" if p.is_dir() else p
    meta, _ = read_tuned_file(tuned_path)
    recorded = (meta.get("extra") or {}).get("config") or {}
    tuned = load_tuned(tuned_path, backbone_for_file(meta["backbone"], tuned_path, weights))
    spec = data_spec or recorded.get("data")
    if not spec:
        raise ConfigError(f"{tuned_path}: no --data given and the file does not record its data spec")
    cfg = saved_config(recorded, data=spec, shots=None, imbalance=None, augment=None, progress=False,
                       task="classify", **changes)
    return SavedRun(tuned_path, meta, tuned, cfg)


def trained_precision(meta: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """The precision a run really trained in: recorded beside its config since ``auto`` existed;
    before, the config's own value was always a resolved one (fp32 or bf16)."""
    value = meta.get("precision") or recorded.get("precision")
    return value if value in ("fp32", "bf16", "fp16") else None


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
