"""Every file vistune writes goes through one atomic writer; every file with JSON metadata is read
by one reader.

Why one writer: a crash (or ``kill -9``) must never leave a half-written file under a final name,
and the rules that make that true — write to a temp file in the same folder, ``fsync``-free
rename, delete the temp file on any error, give the result the permissions the user's umask
asks for (``mkstemp`` alone would leave 0600) — are easy to get subtly wrong in four places.
Temp files are named ``<final name>.<random>.tmp`` so an output folder can recognise and remove
the orphans of a killed writer (:func:`remove_orphan_temps`).

Why one reader: corruption of any kind (truncation, garbage, a file from another tool) must turn
into the caller's error type with a message naming the file, never a library traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # fallback: set and restore at once
    os.umask(old)
    return old


def write_set_atomic(folder: str | os.PathLike, writers: list[tuple[str, Callable[[Path], None]]]) -> list[Path]:
    """Write several files as one set: all to temp files first, then renamed in the given order.

    Put the file that marks completion (a run's ``metrics.json``) last: a reader then sees either
    the whole new set or no marker, never a new model beside old metrics.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[Path, Path]] = []
    try:
        for name, write in writers:
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=TEMP_SUFFIX, dir=folder)
            os.close(fd)
            temps.append((Path(tmp), folder / name))
            try:
                write(Path(tmp))
            except Exception as err:
                translated = write_error(err, folder / name)
                if translated is None:
                    raise
                raise translated from None
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, final in temps:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    return [final for _, final in temps]


def write_error(err: BaseException, path: str | os.PathLike) -> OSError | None:
    """A failed write as an ``OSError`` naming ``path``, or None when ``err`` is no write failure.

    Why: the libraries behind the writers report a full disk in their own words —
    ``torch.save``: ``RuntimeError: [enforce fail at inline_container.cc:672] ... file write
    failed``; safetensors: ``SafetensorError ... os error 28``; a plain ``write()``: an OSError
    without a file name — and the CLI can only turn an OSError that names its file into one line.
    """
    text = str(err)
    if isinstance(err, OSError):
        if err.filename is not None:
            return None
        code = err.errno or errno.EIO
        return OSError(code, err.strerror or os.strerror(code), str(path))
    full = "No space left" in text or "os error 28" in text or "StorageFull" in text
    if not full and not any(s in text for s in ("file write failed", "inline_container", "IoError",
                                                  "unexpected pos")):
        return None
    if not full:  # torch does not say why a write failed: a full disk is the common case, check it
        try:
            full = os.statvfs(Path(path).parent).f_bavail == 0
        except OSError:
            pass
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return OSError(errno.EIO, f"cannot write the file ({first[:160]})", str(path))


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` then rename: the one way vistune puts a file under its final name."""
    path = Path(path)
    return write_set_atomic(path.parent, [(path.name, write)])[0]


def finite_json(value: Any) -> Any:
    """Replace NaN/±inf floats by None: JSON has no NaN, and a bare ``NaN`` breaks every reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Strict JSON (non-finite floats become null), indented, newline-terminated."""
    return json.dumps(finite_json(data), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    text = json_text(data)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_atomic(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """A safetensors file with string metadata, written atomically."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_figure_atomic(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """A matplotlib figure; the format comes from ``path``'s suffix, not the temp name's."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed writer left in ``folder`` (call only while holding its lock)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f"*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def unreadable_reason(err: BaseException) -> str:
    """Why a file we tried to load is not what it claims, in one short line.

    Loading arbitrary bytes raises anything (unpickling a text file raises ``KeyError(101)``),
    and torch's weights-only refusal suggests ``weights_only=False``, i.e. running the file's
    code, which vistune never does: neither is a useful message, so both become one plain line.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if "weights_only" in text or "Weights only" in text or not any(c.isalpha() for c in text):
        return "not a plain tensor file: torch.load (weights only, never code) cannot read it"
    return text[:200]


def read_with_json_meta(
    path: str | os.PathLike, key: str, fmt: str, error: type[Exception], what: str, writer: str
) -> tuple[dict[str, Any], dict[str, Any]]:
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
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise error(f"{what} {path}: unknown format {got!r}, expected {fmt!r}")
    return meta, tensors
