"""The method registry: name → Method class, from three sources, in this order of authority.

1. Built-ins: the read-only table :data:`REGISTRY` of ``module:Class`` strings, imported on first
   use, so ``vistune --help`` lists them without importing torch.
2. Installed packages: entry points of the group ``vistune.methods`` (``ia3 = my_pkg.ia3:IA3`` in
   the package's metadata). Found by reading metadata at each lookup; imported only when used.
3. Explicit registration in this process: :func:`register_method` (also a class decorator), the
   one writer of the module-level table ``_REGISTERED``. vistune itself registers nothing; a user's
   module does it as it is imported (``import my_methods`` or ``vistune --plugin my_methods.py``).

Rules, each one clear error: a built-in name cannot be taken (``register_method`` refuses it; an
entry point with such a name is ignored with a :class:`~vistune.plugins.PluginWarning`); two
different classes under one name (two plugins, or a plugin and a registration) make that name an
error naming both. A plugin that fails to import is reported when its method is *used*, in one
line naming its distribution: listing names never imports plugin code, so one broken package
cannot break ``vistune --help`` for everyone else.
"""

from __future__ import annotations

import importlib
import warnings
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vistune.errors import MethodError, PluginError
from vistune.plugins import NAME, Entry, PluginWarning, entries, load_target

if TYPE_CHECKING:
    from vistune.methods.base import Method

#: The entry-point group installed packages declare their methods in.
GROUP = "vistune.methods"

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

#: Methods registered in this process by :func:`register_method` (its only writer): name → class
#: or ``"module:Class"``. Per process: a sweep worker or torchrun rank gets the same entries by
#: re-running the same command (``--plugin`` included) or the same imports.
_REGISTERED: dict[str, Any] = {}

_FROM_BASE = ("Method", "parse_kv", "parse_options")

_HOW_TO_ADD = ("a method from another package is found once that package is installed (entry point "
               f"group {GROUP!r}); for your own module or script, load it first with "
               "`vistune --plugin MODULE_OR_FILE.py ...` or import it and call vistune.register_method")

def _identity(target: Any) -> str:
    """``module:Class`` of a registered target (a class or its import string)."""
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def register_method(target: Any = None, name: str | None = None) -> Any:
    """Make a Method subclass usable by name everywhere (``attach``, ``--method``, tuned files, sweep,
    serve, export): ``@register_method``, ``@register_method(name="x")``, ``register_method(cls)``
    or, without importing it yet, ``register_method("pkg.module:Class", name="x")``.

    The name must be the class's own ``name`` (tuned files record ``cls.name``, and a file must
    find its class again). Registering the same class again is a no-op (a module imported twice, a
    re-run notebook cell: the newer class object wins); a built-in name or a name another class
    holds is refused. Returns ``target``, so it works as a decorator.
    """
    if target is None:
        return lambda cls: register_method(cls, name)
    if isinstance(target, str):
        if name is None:
            raise MethodError(f"register_method({target!r}) needs name=...: the class is not imported yet")
        module, sep, attr = target.partition(":")
        if not (module and sep and attr):
            raise MethodError(f"register_method: {target!r} is not of the form 'package.module:Class'")
        key = name
    else:
        # local: imports torch; this registry must not (vistune --help)
        from vistune.methods.base import Method

        if not (isinstance(target, type) and issubclass(target, Method)):
            raise MethodError(f"register_method: {target!r} is not a subclass of vistune.methods.Method")
        key = name or target.name
        if not key:
            raise MethodError(f"register_method: {_identity(target)} has no name; set name = '...' on the class")
        if target.name != key:
            raise MethodError(f"register_method: {_identity(target)} declares name {target.name!r} but is "
                              f"registered as {key!r}; tuned files record the class's name, so they must agree")
    if not isinstance(key, str) or not NAME.fullmatch(key):
        raise MethodError(f"register_method: method name {key!r} is invalid: use 1-64 letters, digits, "
                          "'_' or '-', starting with a letter")
    if key in REGISTRY:
        raise MethodError(f"method name {key!r} is built into vistune ({REGISTRY[key]}) and cannot be "
                          f"overridden; register {_identity(target)} under another name")
    held = _REGISTERED.get(key)
    if held is not None and _identity(held) != _identity(target):
        raise MethodError(f"method {key!r} is registered twice: by {_identity(held)} and by "
                          f"{_identity(target)}; give one of them another name")
    _REGISTERED[key] = target
    return target


def _plugin_entries() -> dict[str, list[Entry]]:
    """Installed packages' methods by name; built-in and malformed names warned about and dropped."""
    out: dict[str, list[Entry]] = {}
    for entry in entries(GROUP):
        if entry.name in REGISTRY:
            warnings.warn(PluginWarning(
                f"{entry.describe()} is ignored: {entry.name!r} is a built-in method name and cannot be "
                "overridden"), stacklevel=3)
        elif not NAME.fullmatch(entry.name):
            warnings.warn(PluginWarning(
                f"{entry.describe()} is ignored: {entry.name!r} is not a valid method name"), stacklevel=3)
        else:
            out.setdefault(entry.name, []).append(entry)
    return out


def method_names() -> list[str]:
    """Built-ins first (in table order), then plugin methods, sorted; imports no plugin code."""
    extra = set(_REGISTERED) | set(_plugin_entries())
    return list(REGISTRY) + sorted(extra)


def get_method(name: str) -> type[Method]:
    """The Method class called ``name``; unknown, clashing or broken plugins are one MethodError line."""
    if name in REGISTRY:
        module, _, cls = REGISTRY[name].partition(":")
        return getattr(importlib.import_module(module), cls)
    found = _plugin_entries().get(name, [])
    held = _REGISTERED.get(name)
    if held is None and not found:
        raise MethodError(f"unknown method {name!r}; known methods: {', '.join(method_names())}; {_HOW_TO_ADD}")
    if len(found) > 1:
        raise MethodError(f"method {name!r} is provided by two plugins: {found[0].describe()} and "
                          f"{found[1].describe()}; uninstall one of them")
    try:
        cls = held if held is None or not isinstance(held, str) else load_target(
            held, f"method {name!r} (registered as {held})")
        if found:
            from_entry = load_target(found[0].value, f"method {name!r} from {found[0].describe()}")
            if cls is not None and from_entry is not cls:
                raise MethodError(f"method {name!r} is provided twice: by {found[0].describe()} and by "
                                  f"register_method({_identity(held)}); give one of them another name")
            cls = from_entry
    except PluginError as err:
        raise MethodError(str(err)) from err
    return _checked(name, cls)


def _checked(name: str, cls: Any) -> type[Method]:
    """A plugin's class must be a Method whose own ``name`` is the one it is found under."""
    # local: imports torch; this registry must not (vistune --help)
    from vistune.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"method {name!r}: {_identity(cls) if isinstance(cls, type) else repr(cls)} "
                          "is not a subclass of vistune.methods.Method")
    if cls.name != name:
        raise MethodError(f"method {name!r}: its class {_identity(cls)} declares name {cls.name!r}; "
                          "tuned files record the class's name, so they must agree")
    return cls


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("vistune.methods.base"), name)
    raise AttributeError(f"module 'vistune.methods' has no attribute {name!r}")


__all__ = ["GROUP", "REGISTRY", "Method", "get_method", "method_names", "parse_kv", "parse_options",
           "register_method"]
