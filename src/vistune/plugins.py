"""Loading code that extends vistune from outside it: installed packages' entry points and modules
named with ``vistune --plugin``.

Why a module of its own: every registry that users extend (methods today, task kinds next) finds
installed packages the same way, and the CLI must load ``--plugin`` modules *before* it builds its
help, so the help lists what they register. Discovery reads package metadata only: nothing is
imported until a plugin is used, so a broken or slow plugin never costs ``vistune --help``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vistune.errors import PluginError, VistuneError

#: What a registered name may look like: it travels in tuned files, YAML, ``--method`` and the
#: few-shot variant syntax (``vpt+pvp``, ``METHOD=FILE``), so no ``+``, ``=`` or ``,``.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Entry:
    """One entry point of a group: ``name = value`` declared by distribution ``dist``."""

    name: str
    value: str
    dist: str

    def describe(self) -> str:
        return f"distribution {self.dist!r} (entry point {self.name} = {self.value})"


def entries(group: str) -> list[Entry]:
    """The entry points of ``group`` in installed distributions, metadata only (nothing imported).

    A distribution visible twice on ``sys.path`` (an editable install beside a copy) declares the
    same entry twice; duplicates are dropped so they do not look like a clash.

    Why memoised: ``importlib.metadata`` reads every installed distribution's metadata on each
    call (~25 ms in vistune's own environment), and one command asks ~10 times (``--method``
    choices, the task kinds, config checks), a sweep again for every trial. The answer depends
    only on which distributions sit in the ``sys.path`` folders, so it is kept per ``sys.path``
    and those folders' modification times: installing or removing a package adds or removes a
    ``*.dist-info`` folder, which changes its parent's time and reads the metadata afresh.
    """
    return list(_entries(group, _path_state()))


def _path_state() -> tuple[tuple[str, int], ...]:
    state = []
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        try:
            state.append((folder, os.stat(folder).st_mtime_ns))
        except OSError:
            state.append((folder, -1))
    return tuple(state)


@functools.lru_cache(maxsize=16)
def _entries(group: str, path_state: tuple[tuple[str, int], ...]) -> tuple[Entry, ...]:
    seen: set[tuple[str, str]] = set()
    out: list[Entry] = []
    for ep in importlib.metadata.entry_points(group=group):
        if (ep.name, ep.value) in seen:
            continue
        seen.add((ep.name, ep.value))
        dist = getattr(ep, "dist", None)
        out.append(Entry(ep.name, ep.value, dist.name if dist is not None else "?"))
    return tuple(out)


def _why(err: BaseException) -> str:
    """One line for an exception raised by user code: its type, message and where it was raised."""
    if isinstance(err, VistuneError):
        return str(err)
    where = ""
    frames = traceback.extract_tb(err.__traceback__)
    if frames and not isinstance(err, SyntaxError):  # a SyntaxError's message names file and line
        where = f" at {frames[-1].filename}:{frames[-1].lineno}"
    return f"{type(err).__name__}: {err}{where}"


def load_target(target: str, what: str) -> Any:
    """Import ``"pkg.module:Attr"``; any failure is one PluginError line that starts with ``what``."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise PluginError(f"{what}: {target!r} is not of the form 'package.module:Class'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # user code: any error it raises is reported, not a vistune bug
        raise PluginError(f"{what} failed to load: {_why(err)}") from err
    return obj


def load_plugin(spec: str) -> ModuleType:
    """Import a plugin module (``vistune --plugin``): a dotted module name or a ``.py`` file path.

    The module registers what it defines (``@vistune.register_method``) as it is imported. A file
    is imported under its stem, as Python would run it from its folder, so the same file named
    twice (or by a sweep worker re-running the command) is imported once.
    """
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return _load_file(Path(spec), spec)
    try:
        return importlib.import_module(spec)
    except Exception as err:
        raise PluginError(f"plugin {spec!r} failed to import: {_why(err)}") from err


def _load_file(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"plugin file {spec} does not exist")
    name = path.stem
    if not name.isidentifier():
        raise PluginError(f"plugin file {spec}: {name!r} is not a valid module name; rename the file")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded
        raise PluginError(f"plugin file {spec}: a module named {name!r} is already imported "
                          f"(from {getattr(loaded, '__file__', None) or 'a built-in'}); rename the file")
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py path always has one
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"plugin file {spec} failed to import: {_why(err)}") from err
    return module


class PluginWarning(UserWarning):
    """An installed plugin declares something vistune ignores (a built-in name, a malformed name).

    A warning, not an error: one package's mistake must not stop ``vistune`` for every other use.
    The CLI prints it as one ``vistune: warning: ...`` line."""
