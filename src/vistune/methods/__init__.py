"""The method registry: name → Method class. One file per method; this maps names to them.

The mapping is a read-only table of ``module:Class`` strings, imported on first use: no
registration side effects, no global mutable state, and ``vistune --help`` stays fast (the CLI
lists the registry's names without importing torch: ``Method`` and the option parsers are
loaded from :mod:`vistune.methods.base` only when asked for).
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vistune.errors import MethodError

if TYPE_CHECKING:
    from vistune.methods.base import Method

REGISTRY = MappingProxyType(
    {
        "linear": "vistune.methods.linear:Linear",
        "full": "vistune.methods.full:Full",
        "bitfit": "vistune.methods.bitfit:BitFit",
        "vpt": "vistune.methods.vpt:VPT",
        "lora": "vistune.methods.lora:LoRA",
        "adapter": "vistune.methods.adapter:Adapter",
        "spt": "vistune.methods.spt:SPT",
        "protuning": "vistune.methods.protuning:ProTuning",
    }
)

_FROM_BASE = ("Method", "parse_kv", "parse_options")


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> type[Method]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("vistune.methods.base"), name)
    raise AttributeError(f"module 'vistune.methods' has no attribute {name!r}")


__all__ = ["REGISTRY", "Method", "get_method", "method_names", "parse_kv", "parse_options"]
