"""``vistune serve`` settings: flags, or a YAML file with the same keys plus a ``tasks`` table.

Example ``tasks.yaml`` (relative task paths are relative to the YAML file's folder)::

    backbone: dinov2-s14      # optional: default is the backbone the first task names
    img_size: 84
    tasks:
      linear: runs/demo/linear
      lora: runs/demo/lora
    max_batch: 16
    batch_window_ms: 5
    precision: auto           # bf16 only where this machine runs it natively, else fp32
    admin: false              # true: POST/DELETE /tasks for files under task_root, with a bearer token
    task_root: runs           # (relative to this file's folder, like task paths)
    max_inflight: 16          # predictions admitted at once; more get 503 + Retry-After
    max_decodes: 2            # images decoded at once (the others wait)
    max_image_mb: 128         # the most one decode may hold (decoded pixels + conversions)

The admin token is never a YAML key: it comes from $VISTUNE_ADMIN_TOKEN or ``--admin-token``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vistune.config import PRECISIONS
from vistune.engine.distributed import resolve_device
from vistune.methods.base import coerce_value
from vistune.serve.admin import ADMIN_TOKEN_ENV, check_token, is_loopback, resolve_root
from vistune.serve.multitask import MultiTaskModel, ServeError


class ServeConfigError(ServeError):
    """A serve flag or config file value is invalid."""


@dataclass
class ServeConfig:
    backbone: str | None = None  # default: the backbone the first task's file names
    weights: str | None = None
    img_size: int | None = None
    tasks: dict[str, str] = field(default_factory=dict)  # name -> tuned file or dense run folder
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    batch_window_ms: float = 5.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (CUDA): vistune.precision
    bf16: bool | None = None  # the older switch: true = precision bf16, false = fp32
    device: str = "cpu"
    max_upload_mb: float = 16.0
    read_only: bool = False  # the admin API stays off (the default); contradicts admin: true
    admin: bool = False  # POST/DELETE /tasks, with a bearer token, for files under task_root
    task_root: str | None = None
    admin_token: str | None = field(default=None, repr=False)  # flag or $VISTUNE_ADMIN_TOKEN, never YAML
    max_inflight: int = 16
    max_decodes: int = 2
    max_image_mb: float = 128.0
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def validate(self) -> None:
        if not self.tasks:
            raise ServeConfigError("no task to serve: give --task NAME=PATH (repeatable) or a tasks: table in --config")
        checks = [(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
                  (self.batch_window_ms >= 0, f"batch_window_ms must be >= 0, got {self.batch_window_ms}"),
                  (self.max_upload_mb > 0, f"max_upload_mb must be > 0, got {self.max_upload_mb}"),
                  (0 <= self.port < 65536, f"port must be 0-65535, got {self.port}"),
                  (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
                  (self.max_inflight >= 1, f"max_inflight must be >= 1, got {self.max_inflight}"),
                  (self.max_decodes >= 1, f"max_decodes must be >= 1, got {self.max_decodes}"),
                  (self.max_image_mb > 0, f"max_image_mb must be > 0, got {self.max_image_mb}"),
                  (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, "
                                                 f"got {self.precision!r}"),
                  (self.bf16 is None or self.precision in ("auto", "bf16" if self.bf16 else "fp32"),
                   f"bf16: {str(self.bf16).lower()} contradicts precision: {self.precision}"),
                  (not (self.admin and self.read_only),
                   "--admin and --read-only contradict each other (read-only means the admin API stays off)"),
                  (self.admin or self.admin_token is None, "--admin-token is only used with --admin"),
                  (self.admin or self.task_root is None, "--task-root is only used with --admin"),
                  (not self.admin or self.task_root is not None,
                   "--admin needs --task-root DIR: the only folder POST /tasks may load task files from")]
        for ok, msg in checks:
            if not ok:
                raise ServeConfigError(msg)
        if self.admin:
            try:
                check_token(self.admin_token)
                resolve_root(self.task_root)
            except ServeConfigError:
                raise
            except ServeError as err:
                raise ServeConfigError(str(err)) from None


def parse_task_args(pairs: list[str]) -> dict[str, str]:
    """``["flowers=runs/a", ...]`` -> ordered dict; a malformed or repeated name is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ServeConfigError(f"--task {pair!r} is not of the form NAME=PATH")
        if name in out:
            raise ServeConfigError(f"task {name!r} is given twice")
        out[name] = path
    return out


def _tasks_from_yaml(value: Any, base: Path, path: Path) -> dict[str, str]:
    """``tasks:`` as a mapping name -> path, or a list of {name, path}."""
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(v, dict) and set(v) == {"name", "path"} for v in value):
        items = [(v["name"], v["path"]) for v in value]
    else:
        raise ServeConfigError(f"{path}: 'tasks' must map task names to paths, or list {{name: ..., path: ...}} entries")
    out: dict[str, str] = {}
    for name, p in items:
        if not isinstance(name, str) or not isinstance(p, str) or not p:
            raise ServeConfigError(f"{path}: task entry {name!r}: {p!r} needs a name and a path (strings)")
        if name in out:
            raise ServeConfigError(f"{path}: task {name!r} is listed twice")
        q = Path(p).expanduser()
        out[name] = str(q if q.is_absolute() else base / q)
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML file's keys, checked against :class:`ServeConfig` and coerced to its types."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise ServeConfigError(f"config file {p}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ServeConfigError(f"config file {p} is not valid YAML ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ServeConfigError(f"config file {p} must hold a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    hints = typing.get_type_hints(ServeConfig)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "admin_token":
            raise ServeConfigError(f"config file {p}: admin_token is never read from a file (files get copied and "
                                   f"committed): set {ADMIN_TOKEN_ENV} or pass --admin-token")
        if key not in fields:
            raise ServeConfigError(f"config file {p}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        if key == "tasks":
            out[key] = _tasks_from_yaml(value, p.parent, p)
            continue
        if key == "task_root" and isinstance(value, str) and value:
            q = Path(value).expanduser()
            out[key] = str(q if q.is_absolute() else p.parent / q)  # like task paths: relative to the file
            continue
        try:
            out[key] = coerce_value(value, hints[key])
        except (TypeError, ValueError) as err:
            raise ServeConfigError(f"config file {p}: {key}={value!r} is invalid ({err})") from None
    return out


def make_config(file_values: dict[str, Any] | None = None, tasks: dict[str, str] | None = None,
                **overrides: Any) -> ServeConfig:
    """File values, then flags that were given (None = not given); ``tasks`` are added after the file's."""
    values = dict(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    merged = dict(values.pop("tasks", {}) or {})
    for name, path in (tasks or {}).items():
        if name in merged:
            raise ServeConfigError(f"task {name!r} is given both in the config file and as --task")
        merged[name] = path
    cfg = ServeConfig(**values, tasks=merged)
    if cfg.admin and not cfg.admin_token:
        cfg.admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None  # only read when the admin API is on
    cfg.validate()
    return cfg


def build_model(cfg: ServeConfig):
    """The backbone (named, or the first task's) with every task added, in order."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    first = next(iter(cfg.tasks.values()))
    device = resolve_device(cfg.device)
    if cfg.backbone:
        model = MultiTaskModel.from_name(cfg.backbone, weights=cfg.weights, img_size=cfg.img_size,
                                         precision=cfg.precision, bf16=cfg.bf16, device=device)
    else:
        if cfg.weights or cfg.img_size:
            raise ServeConfigError("--weights/--img-size need --backbone (without it the first task's backbone is used)")
        model = MultiTaskModel.for_file(first, precision=cfg.precision, bf16=cfg.bf16, device=device)
    for name, path in cfg.tasks.items():
        model.add_task(name, path)
    return model


def _check_can_listen(host: str, port: int) -> None:
    """Bind the address once before loading anything: uvicorn reports a bad host or a busy port
    as several log lines and exit code 3, after the models are loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(address)
    except OSError as err:
        raise ServeConfigError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def serve(cfg: ServeConfig) -> int:
    """Load everything, then run uvicorn until interrupted."""
    try:
        import uvicorn

        from vistune.serve.app import (
            create_app,  # local: imports fastapi (optional extra serve)
        )
    except ImportError as err:
        raise ServeConfigError(f"vistune serve needs FastAPI and uvicorn ({err}); install them with "
                               "pip install 'vistune[serve]'") from None

    _check_can_listen(cfg.host, cfg.port)
    model = build_model(cfg)
    app = create_app(model, max_batch=cfg.max_batch, batch_window_ms=cfg.batch_window_ms,
                     max_upload_bytes=int(cfg.max_upload_mb * 2**20), admin=cfg.admin, admin_token=cfg.admin_token,
                     task_root=cfg.task_root, max_inflight=cfg.max_inflight, max_decodes=cfg.max_decodes,
                     max_decode_bytes=int(cfg.max_image_mb * 2**20))
    info = model.info
    admin = f"admin API on (task root {cfg.task_root})" if cfg.admin else "admin API off"
    print(f"vistune serve: {info.name} @{info.img_size}px, {len(model.task_names())} tasks "
          f"({', '.join(model.task_names())}) on http://{cfg.host}:{cfg.port}/  (page at /, API docs at /docs; "
          f"{admin})", flush=True)
    if cfg.admin and not is_loopback(cfg.host):
        print(f"vistune serve: warning: the task admin API is on and {cfg.host} is not a loopback address: "
              f"anyone who reaches port {cfg.port} with the token can load and remove tasks (use TLS or a "
              "private network)", file=sys.stderr, flush=True)
    with _sigterm_is_a_clean_stop() as stopped:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    if stopped:
        print("vistune serve: stopped on SIGTERM after answering every admitted request", flush=True)
    return 0


@contextlib.contextmanager
def _sigterm_is_a_clean_stop() -> Iterator[list[int]]:
    """SIGTERM ends the service with exit code 0 once uvicorn has shut down gracefully.

    Why: uvicorn handles SIGTERM itself (stop accepting, let open requests finish, lifespan
    shutdown, which drains the batcher), then re-raises the signal to the handler that was in
    place before it started. With Python's default that kills the process (exit 143), which an
    orchestrator stopping a healthy service on purpose (docker stop, a rolling update) reads
    as a failure. This handler records the signal instead; the yielded list is non-empty if it
    came. Only the main thread may set handlers: elsewhere (a test calling serve in a thread)
    nothing changes.
    """
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)
