"""vistune: parameter-efficient tuning of frozen timm vision backbones.

Public API (re-exports only, resolved lazily so ``vistune --help`` does not import torch)::

    from vistune import create_backbone, attach, load_tuned
    model = create_backbone("vit_tiny_patch16_224", img_size=64, num_classes=10)
    tuned = attach(model, "lora", rank=8, targets="q,v")
    tuned.print_trainable_parameters()
    tuned.save_tuned("task.safetensors")

Your own method: derive ``vistune.methods.base.Method`` and decorate it with
``@vistune.register_method`` (or declare it in your package's ``vistune.methods`` entry points);
``examples/ia3.py`` is a complete one.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_backbone": "vistune.backbones",
    "MethodError": "vistune.errors",
    "NotMergeableError": "vistune.errors",
    "TunedFileError": "vistune.errors",
    "VistuneError": "vistune.errors",
    "MethodSpec": "vistune.tuning",
    "MultiTaskModel": "vistune.serve.multitask",
    "TunedModel": "vistune.tuning",
    "attach": "vistune.tuning",
    "load_tuned": "vistune.tuning",
    "register_method": "vistune.methods",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vistune' has no attribute {name!r}")
