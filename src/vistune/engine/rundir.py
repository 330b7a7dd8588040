"""An output folder owned by one run at a time, complete or visibly incomplete.

What a user loses without this: two runs writing into one ``--out`` interleave their logs and
overwrite each other's model; a re-run into a finished folder that gets interrupted leaves a new
model beside the old metrics; a killed writer leaves ``*.tmp`` orphans. So:

* **Lock.** An exclusive ``flock`` on ``OUT/.vistune.lock`` (released by the kernel when the
  holder dies, even by ``kill -9``, so there are no stale locks to clean by hand). A second run
  is refused with one line naming the holder's pid, host and start time.
* **Completion marker.** ``metrics.json`` is written last, as part of one set with the model
  files (:func:`vistune.io.write_set_atomic`); its presence means the run is complete. A
  finished folder is not overwritten unless ``--overwrite``.
* **Overwrite keeps the old run until the new one is complete.** ``--overwrite`` moves the old
  run's files into ``OUT/.previous/`` (a rename: nothing is copied or deleted), so the folder is
  visibly incomplete while the new run trains. When the new run completes, ``.previous`` is
  deleted; when it fails (a full disk, a bad setting), the partial new files are removed and the
  old run is moved back. An interrupted (Ctrl-C) or killed re-run keeps ``.previous`` beside its
  checkpoint: ``--resume`` finishes the new run, another ``--overwrite`` starts it again.
* **Orphans.** Temp files left by a killed writer are removed when the next run takes the lock.

Only rank 0 of a distributed job touches the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from vistune.engine.checkpoint import config_fingerprint
from vistune.errors import VistuneError
from vistune.io import remove_orphan_temps, unreadable_reason

LOCK_NAME = ".vistune.lock"
MARKER = "metrics.json"
#: Where ``--overwrite`` keeps the old run's files until the new run is complete.
PREVIOUS = ".previous"
#: Files a run may leave in its folder; ``--overwrite`` deletes exactly these (never other files).
RUN_FILES = ("metrics.json", "tuned.safetensors", "dense_head.safetensors", "splits.json", "log.jsonl",
             "checkpoint.pt", "sensitivity.safetensors", "modules.safetensors", "heads.safetensors")


class RunDirError(VistuneError):
    """The output folder is in use, holds a finished run, or cannot be written."""


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.vistune.lock`` naming its holder (pid, host, start)."""

    def __init__(self, path: str | os.PathLike, what: str = "run") -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"--out {self.path}: cannot create the folder ({err.strerror})") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunDirError(f"--out {self.path}: the folder is not writable")
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunDirError(f"--out {self.path}: cannot create its lock file ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunDirError(
                f"--out {self.path} is in use by another {self.what} ({holder}); wait for it to finish or "
                "choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError as err:  # a full disk: without this close the lock stayed held by a failed run
            os.close(fd)
            raise OSError(err.errno, err.strerror, str(self.path / LOCK_NAME)) from None
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        except (OSError, ValueError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunDir:
    """Context manager: lock the folder, check what is in it, hand it to the run, unlock."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 is_main: bool = True, extra_files: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        self.is_main = is_main
        self.run_files = RUN_FILES + tuple(extra_files)
        self._lock = FolderLock(self.path)

    def __enter__(self) -> RunDir:
        if not self.is_main:
            return self
        self._lock.acquire()
        try:
            self._check_contents()
            remove_orphan_temps(self.path)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self.is_main:
                self._settle_previous(exc_type)
        finally:
            self._lock.release()

    def _settle_previous(self, exc_type: type[BaseException] | None) -> None:
        """The old run kept by ``--overwrite``: dropped once the new run is complete, moved back
        when the new run failed (not when it was interrupted or stopped: it can be resumed)."""
        previous = self.path / PREVIOUS
        if not previous.is_dir():
            return
        if exc_type is None:
            if (self.path / MARKER).is_file():
                shutil.rmtree(previous, ignore_errors=True)
            return
        if issubclass(exc_type, KeyboardInterrupt) or (self.path / MARKER).is_file():
            return
        self._remove_run_files()
        for item in previous.iterdir():
            os.replace(item, self.path / item.name)
        previous.rmdir()

    def _remove_run_files(self) -> None:
        # the completion marker goes first: from here on the folder is visibly incomplete
        for name in (MARKER, *self.run_files):
            (self.path / name).unlink(missing_ok=True)

    def _check_contents(self) -> None:
        finished = (self.path / MARKER).is_file()
        if self.resume:
            if finished:
                raise RunDirError(f"--resume: {self.path} holds a finished run ({MARKER} exists); nothing to resume")
            return
        if finished and not self.overwrite:
            raise RunDirError(
                f"--out {self.path} holds a finished run ({MARKER} exists); pass --overwrite to replace it "
                "or choose another --out"
            )
        if self.overwrite:
            self._set_aside()
        elif (self.path / "checkpoint.pt").is_file():
            raise RunDirError(
                f"--out {self.path} holds an unfinished run (checkpoint.pt); continue it with --resume "
                "or replace it with --overwrite"
            )

    def _set_aside(self) -> None:
        """``--overwrite``: move the old run's files into ``.previous`` (see the module docstring)."""
        previous = self.path / PREVIOUS
        present = [n for n in dict.fromkeys((MARKER, *self.run_files)) if (self.path / n).is_file()]
        if previous.is_dir():
            if not (self.path / MARKER).is_file():
                # .previous holds the last complete run; what is here is a partial re-run
                self._remove_run_files()
                return
            shutil.rmtree(previous)  # the folder holds a newer complete run than .previous
        if not present:
            return
        previous.mkdir()
        for name in present:  # the marker first: from here on the folder is visibly incomplete
            os.replace(self.path / name, previous / name)


def recorded_settings(path: str | os.PathLike) -> dict[str, Any] | None:
    """The settings the run in ``path`` was trained with, as :func:`settings_of` gives them.

    Read from the finished run's ``tuned.safetensors`` metadata (its config), else from an
    unfinished run's ``checkpoint.pt``; None when the folder holds neither. Why: a workflow that
    reads a finished run back instead of retraining it (a sweep's trials) must know the run was
    trained as it now asks — a study journal that is gone cannot vouch for that any more.
    An unreadable file is a :class:`RunDirError` naming it.
    """
    folder = Path(path)
    tuned, ckpt = folder / "tuned.safetensors", folder / "checkpoint.pt"
    if tuned.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(tuned), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("vistune") or "{}")
            config = (meta.get("extra") or {}).get("config")
        except Exception as err:  # noqa: BLE001 - safetensors/JSON errors of a damaged file
            raise RunDirError(f"{tuned} is corrupt or truncated ({err}); delete {folder} to retrain it") from None
        return settings_of(config) if isinstance(config, dict) else {}
    if ckpt.is_file():
        import torch

        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - arbitrary bytes raise anything when unpickled
            raise RunDirError(f"{ckpt} is not a readable checkpoint ({unreadable_reason(err)}); "
                              f"delete {folder} to retrain it") from None
        config = saved.get("config") if isinstance(saved, dict) else None
        return _plain(config) if isinstance(config, dict) else {}
    return None


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """A run config reduced to what changes its result (the checkpoint's resume fingerprint)."""
    return _plain(config_fingerprint(config))


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def settings_diff(recorded: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: A there, B now`` for each setting that differs (options key by key);
    ``ignore`` names settings (``lr``, ``options.rank``) that may differ."""
    diffs = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"options.{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k) and f"options.{k}" not in ignore]
        elif a != b and key not in ignore:
            diffs.append(f"{key}: {a!r} there, {b!r} now")
    return diffs
