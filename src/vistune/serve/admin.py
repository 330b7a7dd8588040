"""The task admin API's guards: who may call it, and which files it may load.

Why a module of its own: ``POST /tasks`` turns a string from the network into a file the server
opens. Left open (as it once was by default) anyone who reached the port could load any server
path, delete every task, and map the file system through the error texts (``/etc/shadow`` ->
"corrupt header", ``/root`` -> "no tuned.safetensors in this folder"). The rules here:

* the admin API is off unless the service is started with ``--admin``; then every mutating call
  needs ``Authorization: Bearer <token>``, compared in constant time (:func:`token_matches`);
* a task path is resolved (``..`` and symlinks included) and must lie under the task root, and so
  must every file loading it would read (a run folder's ``tuned.safetensors`` may itself be a
  link); anything outside the root, missing, unreadable or not a tuned file gets ONE message,
  :data:`NO_TASK_HERE`, so answers reveal nothing about what exists (:func:`confine`);
* responses name paths relative to the task root, never absolute server paths (:func:`public_path`).

The checks read the files once before the model loads them; a process that can rewrite files
under the root between the two reads is trusted anyway (it chooses what the service loads).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import unicodedata
from pathlib import Path

from vistune.serve.multitask import ServeError
from vistune.tasks import files_of_run, kind_of_run
from vistune.tuning import read_tuned_file

#: Where ``vistune serve`` reads the admin token when ``--admin-token`` is not given (preferred:
#: a flag's value shows in ``ps`` to every user of the machine).
ADMIN_TOKEN_ENV = "VISTUNE_ADMIN_TOKEN"
#: Shortest admin token accepted: a guessable token is no credential.
MIN_TOKEN_CHARS = 16
#: The one answer for every task path that cannot be loaded, whatever the reason.
NO_TASK_HERE = "no loadable task at that path under the task root"


class TaskPathError(ServeError):
    """A task path is outside the task root, missing, unreadable or not a tuned file (400)."""

    def __init__(self) -> None:
        super().__init__(NO_TASK_HERE)


class UnauthorizedError(ServeError):
    """A mutating admin call without the right bearer token (401)."""


def has_control_chars(text: str) -> bool:
    """True if ``text`` holds a control character (Unicode category Cc: NUL, newline, DEL...)."""
    return any(unicodedata.category(c) == "Cc" for c in text)


def check_token(token: str | None, where: str = "the admin token") -> str:
    """The token, or a ServeError saying why it cannot protect the admin API."""
    if not token:
        raise ServeError(f"the admin API needs a token: set {ADMIN_TOKEN_ENV} (or pass --admin-token)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ServeError(f"{where} must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`), "
                         f"got {len(token)}")
    if any(not (0x21 <= ord(c) <= 0x7E) for c in token):
        raise ServeError(f"{where} must be visible ASCII characters only (it travels in an HTTP header)")
    return token


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``.

    Both sides are hashed first, so the comparison takes the same time whatever the lengths
    (``hmac.compare_digest`` alone leaks the expected length).
    """
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    want = hashlib.sha256(token.encode()).digest()
    got = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(want, got)


def resolve_root(path: str | os.PathLike) -> Path:
    """The task root, resolved; an error naming it if it is not an existing folder."""
    try:
        root = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise ServeError(f"task root {path}: no such folder") from None
    if not root.is_dir():
        raise ServeError(f"task root {path} is not a folder")
    return root


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved (symlinks followed), if it is an existing file or folder under ``root``."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise TaskPathError() from None
    if real != root and not real.is_relative_to(root):
        raise TaskPathError()
    return real


def confine(root: Path, path: str) -> Path:
    """The resolved task source for ``path`` (relative to ``root``, or absolute), checked to be a
    readable tuned file or run folder under ``root``; :class:`TaskPathError` otherwise.

    Every failure is the same error, raised before the model touches the file: outside the root,
    ``..`` or a symlink leading out, missing, unreadable, a folder without a run, a corrupt file.
    """
    if not isinstance(path, str) or not path.strip() or has_control_chars(path):
        raise TaskPathError()
    source = _inside(root / path, root)  # root / "/abs" is "/abs": absolute paths are checked too
    if source == root:
        raise TaskPathError()  # an empty or "." path: the root is where tasks live, not a task
    try:
        files = [_inside(f, root) for f in files_of_run(source)]  # names only: confined before any read
        if not all(f.is_file() for f in files):
            raise TaskPathError()
        kind_of_run(source)  # reads the kind's own files (a dense run's head file)
        read_tuned_file(files[0])
    except TaskPathError:
        raise
    except Exception:  # noqa: BLE001 - whatever went wrong, the answer must not say what
        raise TaskPathError() from None
    return source


def public_path(path: str | os.PathLike, root: Path | None) -> str | None:
    """``path`` relative to the task root, or None: responses never carry absolute server paths."""
    if root is None:
        return None
    try:
        rel = Path(path).resolve().relative_to(root)
    except (OSError, RuntimeError, ValueError):
        return None
    return rel.as_posix()


def scrub(message: str, root: Path | None) -> str:
    """``message`` with the task root's absolute path cut from the paths it names."""
    if root is None:
        return message
    return message.replace(str(root) + os.sep, "").replace(str(root), ".")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (only this machine can connect)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    try:
        return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
    except ValueError:
        return False
