"""Tasks: what differs between training jobs (see :mod:`vistune.tasks.base` for the contract)."""

from __future__ import annotations

from vistune.config import ConfigError
from vistune.tasks.base import Runtime, Task, TaskProbe, seed_everything

#: ``--task`` names of the training tasks a run folder can hold (multisource is ``vistune pretrain``).
TASK_NAMES = ("classify", "segment", "detect")


def make_task(name: str) -> Task:
    """A fresh task object for ``name`` (not set up yet)."""
    if name == "classify":
        from vistune.tasks.classify import ClassifyTask

        return ClassifyTask()
    if name in ("segment", "detect"):
        from vistune.tasks.dense import DetectTask, SegmentTask

        return SegmentTask() if name == "segment" else DetectTask()
    raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")


__all__ = ["TASK_NAMES", "Runtime", "Task", "TaskProbe", "make_task", "seed_everything"]
