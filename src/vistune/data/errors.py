"""The one exception type of :mod:`vistune.data`.

Kept in its own module so every reader can raise it without importing the
package ``__init__`` (which imports the readers) and creating an import cycle.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data set cannot be used as given: wrong path, missing split file,
    empty class folder, a label that does not parse, an unknown spec kind.

    It subclasses :class:`ValueError` so callers that already catch bad
    arguments keep working, while the engine/CLI can catch exactly this class
    to print one clear line *before* any training starts. Unreadable
    individual images are deliberately *not* errors: they are skipped and
    counted (see ``DataSplits.skipped``).
    """
