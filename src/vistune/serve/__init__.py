"""Serving: one frozen backbone, many tuned files, one HTTP service and a web page.

``MultiTaskModel`` (Python API) loads a backbone once and routes mixed batches to any number of
tasks; ``create_app`` wraps it in a FastAPI service with cross-task batching; ``vistune serve``
starts it from the command line. FastAPI is imported only by ``vistune.serve.app``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MultiTaskModel": "vistune.serve.multitask",
    "Task": "vistune.serve.multitask",
    "ServeError": "vistune.serve.multitask",
    "UnknownTaskError": "vistune.serve.multitask",
    "share_copy": "vistune.serve.multitask",
    "create_app": "vistune.serve.app",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vistune.serve' has no attribute {name!r}")
