"""Task kinds: what differs between jobs, each one class (see :mod:`vistune.tasks.base` for the contract).

The registry maps a task name (``--task``, the ``task:`` YAML key, a run's recorded ``task``) to
its class, the way :mod:`vistune.methods` maps method names: the built-in table holds
``module:Class`` strings imported on first use, so the names are listed (CLI choices, config
validation) without importing torch. Installed packages add theirs with entry points of the group
``vistune.tasks``; a user's module with :func:`register_task`. Every module outside ``tasks/`` asks
the registry or the task object, never compares a task name.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vistune.errors import ConfigError, PluginError
from vistune.plugins import NAME, entries, load_target

if TYPE_CHECKING:
    from vistune.tasks.base import Task

#: The entry-point group installed packages declare their task kinds in.
GROUP = "vistune.tasks"

#: Built-in task kinds a run folder can hold (``multisource`` is ``vistune pretrain``'s, not a ``--task``).
REGISTRY = MappingProxyType(
    {
        "classify": "vistune.tasks.classify:ClassifyTask",
        "segment": "vistune.tasks.dense:SegmentTask",
        "detect": "vistune.tasks.dense:DetectTask",
    }
)

#: ``--task``'s help line of each built-in kind (a table, so building the help imports no torch).
_BUILTIN_HELP = MappingProxyType(
    {
        "classify": "one class per image (default)",
        "segment": "a class per pixel, dense head on the tuned backbone (data camvid:|pennfudan:)",
        "detect": "FCOS boxes, dense head on the tuned backbone (data voc:|pennfudan:)",
    }
)

#: Task kinds registered in this process by :func:`register_task` (its only writer).
_REGISTERED: dict[str, Any] = {}

_FROM_BASE = ("Runtime", "Task", "TaskProbe", "seed_everything")


def register_task(target: Any = None, name: str | None = None) -> Any:
    """Make a Task subclass usable by name (``--task``, YAML, run folders): ``@register_task``,
    ``register_task(cls)`` or ``register_task("pkg.module:Class", name="x")``. A built-in name or a
    name another class holds is refused; returns ``target`` so it works as a decorator."""
    if target is None:
        return lambda cls: register_task(cls, name)
    key = name if isinstance(target, str) else (name or getattr(target, "name", ""))
    if not isinstance(key, str) or not NAME.fullmatch(key):
        raise ConfigError(f"register_task: task name {key!r} is invalid: use 1-64 letters, digits, '_' or '-', "
                          "starting with a letter")
    if key in REGISTRY:
        raise ConfigError(f"task name {key!r} is built into vistune ({REGISTRY[key]}) and cannot be overridden")
    held = _REGISTERED.get(key)
    if held is not None and held is not target:
        raise ConfigError(f"task {key!r} is registered twice ({held!r} and {target!r}); give one another name")
    _REGISTERED[key] = target
    return target


def _plugin_entries() -> dict[str, str]:
    return {e.name: e.value for e in entries(GROUP) if e.name not in REGISTRY and NAME.fullmatch(e.name)}


def task_names() -> list[str]:
    """Built-ins first (in table order), then registered and installed ones, sorted; imports nothing."""
    return list(REGISTRY) + sorted(set(_REGISTERED) | set(_plugin_entries()))


def task_help() -> str:
    """``--task``'s help: every kind the registry knows with one line each. A registered class
    gives the first line of its docstring; an installed package's kind is named, not imported
    (a broken plugin must not cost ``--help``)."""
    parts = []
    for name in task_names():
        target = _REGISTERED.get(name)
        if name in _BUILTIN_HELP:
            text = _BUILTIN_HELP[name]
        elif target is not None and not isinstance(target, str):
            text = ((target.__doc__ or "").strip().splitlines() or ["registered by a plugin"])[0].rstrip(".")
        else:
            text = "from a plugin"
        parts.append(f"{name}: {text}")
    return "task kind; " + "; ".join(parts)


def get_task(name: str) -> type[Task]:
    """The Task class called ``name``; an unknown name is one ConfigError line listing the known ones."""
    target: Any = REGISTRY.get(name) or _REGISTERED.get(name) or _plugin_entries().get(name)
    if target is None:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(task_names())}; a task kind from another "
                          f"package is found once it is installed (entry point group {GROUP!r}); for your own "
                          "module or script, load it first with `vistune --plugin MODULE_OR_FILE.py ...`")
    if isinstance(target, str):
        if name in REGISTRY:
            module, _, attr = target.partition(":")
            return getattr(importlib.import_module(module), attr)
        try:
            return load_target(target, f"task {name!r} ({target})")
        except PluginError as err:
            raise ConfigError(str(err)) from err
    return target


#: The kind of a run whose files predate the ``task`` field (every such run is a classification run).
DEFAULT_TASK = "classify"


def task_of(metrics: dict[str, Any]) -> type[Task]:
    """The Task class of a run from its metrics.json / sweep result (``task`` key, else classify)."""
    return get_task(metrics.get("task") or DEFAULT_TASK)


def _families() -> list[type[Task]]:
    """One registered class per family of run files (segment/detect share theirs), default last."""
    out: list[type[Task]] = []
    seen: set[Any] = set()
    for name in [n for n in task_names() if n != DEFAULT_TASK] + [DEFAULT_TASK]:
        cls = get_task(name)
        key = (getattr(cls.run_kind, "__func__", None), getattr(cls.run_files, "__func__", None))
        if key not in seen:
            seen.add(key)
            out.append(cls)
    return out


def files_of_run(path: str | os.PathLike) -> list[Path]:
    """The files a saved run at ``path`` consists of (tuned file first), from names alone."""
    p = Path(path)
    for cls in _families():
        files = cls.run_files(p)
        if files:
            return files
    return [p]


def kind_of_run(path: str | os.PathLike) -> type[Task]:
    """The Task class of the saved run at ``path`` (run folder or one of its files), read from its
    files: every registered kind is asked (:meth:`Task.run_kind`), the default kind last."""
    p = Path(path)
    for cls in _families():  # one family (segment/detect) answers once
        found = cls.run_kind(p)
        if found:
            return get_task(found)
    return get_task(DEFAULT_TASK)


def make_task(name: str) -> Task:
    """A fresh task object for ``name`` (not set up yet)."""
    return get_task(name)()


def __getattr__(name: str) -> Any:
    if name == "TASK_NAMES":  # kept for callers of the old constant; computed so plugins appear
        return tuple(task_names())
    if name in _FROM_BASE:
        return getattr(importlib.import_module("vistune.tasks.base"), name)
    raise AttributeError(f"module 'vistune.tasks' has no attribute {name!r}")


__all__ = ["DEFAULT_TASK", "GROUP", "REGISTRY", "Runtime", "Task", "TaskProbe", "get_task", "make_task", "register_task",
           "files_of_run", "kind_of_run", "seed_everything", "task_help", "task_names", "task_of"]
