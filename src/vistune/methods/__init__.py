"""The method registry: name → Method class. One file per method; this maps names to them.

The mapping is built once from an explicit tuple and is read-only, so there is no
registration side effect or global mutable state to reason about.
"""

from __future__ import annotations

from types import MappingProxyType

from vistune.errors import MethodError
from vistune.methods.adapter import Adapter
from vistune.methods.base import Method, parse_kv, parse_options
from vistune.methods.bitfit import BitFit
from vistune.methods.full import Full
from vistune.methods.linear import Linear
from vistune.methods.lora import LoRA
from vistune.methods.vpt import VPT

_ALL: tuple[type[Method], ...] = (Linear, Full, BitFit, VPT, LoRA, Adapter)
REGISTRY = MappingProxyType({cls.name: cls for cls in _ALL})


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}") from None


__all__ = ["Method", "REGISTRY", "get_method", "method_names", "parse_kv", "parse_options"]
