"""The project's error types: every failure a user can cause ends in one of these, with a message
that names the file, key or value at fault."""

from __future__ import annotations


class VistuneError(Exception):
    """Base class for errors vistune raises on purpose."""


class ConfigError(VistuneError, ValueError):
    """A config file or value is invalid (importable from :mod:`vistune.config` too; defined here so
    the torch-free registries can raise it without importing the config module)."""


class MethodError(VistuneError, ValueError):
    """Unknown method, unknown option, an option of the wrong type, or a backbone a method can't use."""


class NotMergeableError(VistuneError):
    """The attached method adds computation that cannot be folded into the base weights."""


class TunedFileError(VistuneError):
    """A tuned file is corrupt, truncated, or was made for another backbone/method."""


class MergeError(VistuneError, ValueError):
    """Merging would write non-finite values into the base weights; the model is left as it was."""


class PluginError(VistuneError, ValueError):
    """User code that extends vistune (a ``--plugin`` module, an installed entry point) failed to load."""
