"""Safetensors files with JSON metadata: the one way vistune writes and reads its own files.

Writes go to a temp file in the target folder and are renamed into place, so a crash never
leaves a half-written file; reads turn every kind of corruption into the caller's error type
with a message naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_with_json_meta(
    path: str | os.PathLike, key: str, fmt: str, error: type[Exception], what: str, writer: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata[key] parsed as JSON, tensors); ``error`` names ``what`` and the file on any problem."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncation/corruption
        raise error(f"{what} {path} is corrupt or truncated ({err})") from None
    if raw is None:
        raise error(f"{what} {path} has no vistune metadata; it was not written by {writer}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise error(f"{what} {path}: metadata is not valid JSON ({err})") from None
    if meta.get("format") != fmt:
        raise error(f"{what} {path}: unknown format {meta.get('format')!r}, expected {fmt!r}")
    return meta, tensors
