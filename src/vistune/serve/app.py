"""The HTTP service: FastAPI over a :class:`~vistune.serve.multitask.MultiTaskModel`.

Endpoints (JSON unless said otherwise; every error is ``{"detail": "<one line>"}``)::

    GET    /                 the web page (static/index.html)
    GET    /health           liveness: 200 while the process serves; status, backbone, task count,
                             batching statistics
    GET    /ready            readiness: 200 once the batch worker runs and a task is loaded, else 503
    GET    /metrics          Prometheus text format (vistune.serve.metrics)
    GET    /tasks            every task: name, kind, method, options, classes, tuned params, bytes
    GET    /tasks/{name}     one task
    POST   /tasks            {"name": ..., "path": tuned file or run folder under the task root}  (admin)
    DELETE /tasks/{name}                                                                         (admin)
    POST   /predict          multipart: file=<image>, task=<name> (repeatable, or tasks=a,b),
                             top_k, score_threshold; or JSON: {"image": <base64 or data URL>,
                             "task": name | "tasks": [names], "top_k": 5, "score_threshold": 0.3}.
                             No task named = every task. -> {"results": {task: prediction}}

Status codes: 400 bad input (not an image, bad base64, malformed or too deeply nested JSON, a
task name with a control character, a task path that cannot be loaded), 401 admin call without
the right bearer token, 403 admin endpoint while the admin API is off (the default), 404 unknown
task, 409 duplicate task name, 413 upload or image too large (pixels, or bytes to decode), 415
unsupported content type, 422 invalid parameter, 503 busy (``max_inflight`` predictions already
admitted, or the service is shutting down; ``Retry-After`` says when to retry). A failing
request never stops the service: each error is answered and the worker keeps serving.

Shutdown (SIGTERM under uvicorn): uvicorn stops accepting connections and waits for the open
requests to be answered; then the lifespan shutdown drains the batcher (every queued job runs)
before the process exits. Overload: requests beyond ``max_inflight`` get 503 + Retry-After at
once, without reading their body; the admitted ones queue in the batcher (so its queue holds at
most ``max_inflight`` jobs).

Memory: at most ``max_inflight`` predictions are admitted at once (each holds its body, at most
``max_upload_bytes``, and the image bytes in it), and at most ``max_decodes`` of them decode at
once, each decode refused beforehand if it would hold more than ``max_decode_bytes``
(:func:`vistune.data.transforms.decode_bytes`). The admin API (``admin=True``) needs a bearer
token and a task root: see :mod:`vistune.serve.admin`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from vistune.errors import VistuneError
from vistune.serve.admin import (
    UnauthorizedError,
    check_token,
    confine,
    public_path,
    resolve_root,
    scrub,
    token_matches,
)
from vistune.serve.batching import Batcher, BatcherClosedError
from vistune.serve.metrics import ServiceMetrics
from vistune.serve.multitask import (
    DuplicateTaskError,
    MultiTaskModel,
    ServeError,
    UnknownTaskError,
    check_task_name,
)
from vistune.serve.predict import (
    MAX_DECODE_BYTES,
    MAX_PIXELS,
    BadImageError,
    ImageTooLargeError,
    Sample,
    finish,
    prepare,
)

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("vistune.serve")


class BadRequestError(ServeError):
    """The request itself is malformed (400)."""


class InvalidParameterError(ServeError):
    """A request parameter has a bad value (422)."""


class UploadTooLargeError(ServeError):
    """The request body is larger than the service accepts (413)."""


class UnsupportedMediaError(ServeError):
    """The request's content type is neither multipart nor JSON (415)."""


class ForbiddenError(ServeError):
    """An admin endpoint while the admin API is off (403)."""


class BusyError(ServeError):
    """``max_inflight`` predictions are already admitted, or the service is stopping (503, with Retry-After)."""


#: Seconds a client told "busy" should wait before retrying.
RETRY_AFTER_S = 1


def _status(err: Exception) -> int:
    for cls, code in ((UnknownTaskError, 404), (ImageTooLargeError, 413), (UploadTooLargeError, 413),
                      (UnsupportedMediaError, 415), (InvalidParameterError, 422), (ForbiddenError, 403),
                      (UnauthorizedError, 401), (BusyError, 503), (DuplicateTaskError, 409), (BadImageError, 400)):
        if isinstance(err, cls):
            return code
    return 400


def _headers(err: Exception) -> dict[str, str] | None:
    if isinstance(err, UnauthorizedError):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(err, BusyError):
        return {"Retry-After": str(RETRY_AFTER_S)}
    return None


def _json(body: bytes) -> Any:
    """The parsed body; malformed or too deeply nested JSON is a 400, not a 500."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequestError(f"the JSON body is invalid ({err})") from None
    except RecursionError:  # e.g. 30,000 nested arrays: json's decoder recurses per level
        raise BadRequestError("the JSON body is nested too deeply") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing anything over ``limit`` bytes before and while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLargeError(f"the request is {int(declared):,} bytes; this service accepts at most {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadTooLargeError(f"the request is over {limit:,} bytes, the most this service accepts")
        chunks.append(chunk)
    return b"".join(chunks)


def _int_param(value: Any, name: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        v = int(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be an integer from {lo} to {hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise InvalidParameterError(f"{name} must be an integer from {lo} to {hi}, got {v}")
    return v


def _float_param(value: Any, name: str, lo: float, hi: float) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a number from {lo} to {hi}, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise InvalidParameterError(f"{name} must be a number from {lo} to {hi}, got {v}")
    return v


def _task_list(values: list[Any]) -> list[str] | None:
    names: list[str] = []
    for v in values:
        if isinstance(v, str):
            names.extend(s.strip() for s in v.split(",") if s.strip())
        elif isinstance(v, list) and all(isinstance(s, str) for s in v):
            names.extend(s.strip() for s in v if s.strip())
        elif v is not None:
            raise InvalidParameterError(f"tasks must be a task name or a list of names, got {v!r}")
    return names or None


async def _parse_predict(request: Request, limit: int) -> tuple[bytes, list[str] | None, Any, Any]:
    """(image bytes, task names or None, top_k, score_threshold) from multipart or JSON."""
    ctype = request.headers.get("content-type", "").lower()
    body = await _read_body(request, limit)
    if ctype.startswith("multipart/form-data"):
        async def replay():
            yield body

        try:
            form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=32,
                                         max_part_size=64 * 1024).parse()
        except MultiPartException as err:
            raise BadRequestError(f"malformed multipart upload: {err.message}") from None
        upload = form.get("file") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise BadRequestError("multipart upload has no image file: send it in a field named 'file'")
        data = await upload.read()
        tasks = _task_list(form.getlist("task") + form.getlist("tasks"))
        return data, tasks, form.get("top_k"), form.get("score_threshold")
    if ctype.startswith("application/json") or (not ctype and body.lstrip().startswith(b"{")):
        payload = _json(body)
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise BadRequestError('JSON requests need {"image": "<base64 image>", "task": ... (optional)}')
        text = payload["image"]
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError("'image' is not valid base64") from None
        tasks = _task_list([payload.get("task"), payload.get("tasks")])
        return data, tasks, payload.get("top_k"), payload.get("score_threshold")
    raise UnsupportedMediaError(
        f"content type {ctype or '(none)'} is not supported: send multipart/form-data with a 'file' field "
        "or application/json with a base64 'image'"
    )


#: /predict reads its body itself (multipart or JSON); this documents both forms in /docs.
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the image"},
        "task": {"type": "array", "items": {"type": "string"}, "description": "task name(s); none = every task"},
        "top_k": {"type": "integer", "minimum": 1, "default": 5},
        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1,
                            "description": "detection tasks: smallest box score (default 0.3)"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "description": "base64 image, or a data: URL"},
        "task": {"type": "string"}, "tasks": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer", "minimum": 1, "default": 5},
        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1}}}},
}}}


class _Service:
    """The state every route shares (the model, limits, admin settings, the in-flight count, the
    batcher and metrics): one object instead of closures over ``create_app``'s locals."""

    def __init__(self, model: MultiTaskModel, *, max_batch: int, batch_window_ms: float, max_upload_bytes: int,
                 max_pixels: int, admin: bool, admin_token: str | None, root: Path | None, max_inflight: int,
                 max_decodes: int, max_decode_bytes: int | None, default_top_k: int) -> None:
        self.model = model
        self.max_batch, self.batch_window_ms = max_batch, batch_window_ms
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.admin, self.admin_token, self.root = admin, admin_token, root
        self.max_inflight, self.max_decodes, self.max_decode_bytes = max_inflight, max_decodes, max_decode_bytes
        self.default_top_k = default_top_k
        self.decode_slots = threading.BoundedSemaphore(max_decodes)
        self.inflight = 0
        self.metrics = ServiceMetrics(model, max_batch=max_batch, max_inflight=max_inflight,
                                      queue_depth=lambda: self.batcher.pending, inflight=lambda: self.inflight,
                                      ready=self.is_ready)
        self.batcher = Batcher(self.run, max_batch=max_batch, window=batch_window_ms / 1000.0)

    def is_ready(self) -> bool:
        """Ready = the batch worker runs and at least one task is loaded (``/ready``, metrics)."""
        return self.batcher.running and bool(self.model.task_names())

    def decode(self, data: bytes, tasks: list[str] | None) -> list[Sample]:
        """Decode one upload; the semaphore queues decodes so few full-size images are in memory."""
        with self.decode_slots:  # a queue: at most max_decodes full-size images in memory at once
            return prepare(self.model, data, tasks, self.max_pixels, self.max_decode_bytes)

    def run(self, items: list[tuple[Sample, int, float | None]]) -> list[Any]:
        """One mixed batch: forward + JSON, atomic with respect to task add/remove."""
        model = self.model
        with model.lock:
            results: list[Any] = [None] * len(items)
            live = []
            for i, (s, _, _) in enumerate(items):
                if s.task in model:
                    live.append(i)
                else:
                    results[i] = UnknownTaskError(f"task {s.task!r} was removed while the request waited")
            if live:
                self.metrics.batch_size.observe(len(live))
                outputs = model.forward(torch.stack([items[i][0].x for i in live]), [items[i][0].task for i in live])
                for i, out in zip(live, outputs):
                    s, top, thr = items[i]
                    results[i] = finish(model, s, out, top=top, score_threshold=thr)
            return results

    def backbone(self) -> dict[str, Any]:
        """The backbone as /health and /tasks show it (a local weights file by name, not path)."""
        model = self.model
        info = model.info
        weights = info.weights
        if weights is not None and ("/" in str(weights) or os.sep in str(weights)):
            weights = Path(weights).name  # a local weights file: its name, not where it lives
        return {"name": info.name, "arch": info.arch, "img_size": info.img_size, "weights": weights,
                "fingerprint": model.fingerprint[:16], "bf16": model.bf16,
                "precision": model.precision.name, "precision_reason": model.precision.reason}

    def task_info(self, task: Any) -> dict[str, Any]:
        """One task as the API shows it: its path relative to the task root, or null."""
        info = task.info()
        info["path"] = public_path(task.path, self.root)  # relative to the task root, or null
        return info

    def require_admin(self, request: Request, what: str) -> None:
        """403 while the admin API is off; 401 without the token. Checked before the body is read."""
        if not self.admin:
            raise ForbiddenError(f"the task admin API is off (read-only service): tasks cannot be {what}; "
                                 "start vistune serve with --admin to allow it")
        assert self.admin_token is not None
        if not token_matches(request.headers.get("authorization"), self.admin_token):
            raise UnauthorizedError(f"tasks can be {what} only with the header 'Authorization: Bearer <admin token>'")


def create_app(model: MultiTaskModel, *, max_batch: int = 16, batch_window_ms: float = 5.0,
               max_upload_bytes: int = 16 * 2**20, max_pixels: int = MAX_PIXELS, admin: bool = False,
               admin_token: str | None = None, task_root: str | os.PathLike | None = None,
               max_inflight: int = 16, max_decodes: int = 2, max_decode_bytes: int | None = MAX_DECODE_BYTES,
               default_top_k: int = 5) -> FastAPI:
    """The FastAPI app serving ``model``. Requests arriving within ``batch_window_ms`` of each
    other share one forward of up to ``max_batch`` samples, whatever their tasks.

    ``admin=True`` opens ``POST/DELETE /tasks`` to callers holding ``admin_token`` (as a bearer
    token), for files under ``task_root`` only; it is off by default because it turns request
    strings into server paths. ``max_inflight`` / ``max_decodes`` / ``max_decode_bytes`` bound
    the memory requests can take (module docstring).
    """
    root = None
    if admin:
        check_token(admin_token)
        if task_root is None:
            raise ServeError("the admin API needs a task root: the only folder POST /tasks may load from")
        root = resolve_root(task_root)
    if max_inflight < 1 or max_decodes < 1:
        raise ServeError(f"max_inflight and max_decodes must be >= 1, got {max_inflight} and {max_decodes}")
    svc = _Service(model, max_batch=max_batch, batch_window_ms=batch_window_ms, max_upload_bytes=max_upload_bytes,
                   max_pixels=max_pixels, admin=admin, admin_token=admin_token, root=root,
                   max_inflight=max_inflight, max_decodes=max_decodes, max_decode_bytes=max_decode_bytes,
                   default_top_k=default_top_k)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher.start()
        yield
        await svc.batcher.stop()

    app = FastAPI(title="vistune serve", summary="one frozen backbone, many tuned tasks", lifespan=lifespan)
    app.state.model = model
    app.state.batcher = svc.batcher
    app.state.metrics = svc.metrics
    _add_error_handlers(app, root)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_status_routes(app, svc)
    _add_task_routes(app, svc)
    _add_predict_route(app, svc)
    return app


def _add_error_handlers(app: FastAPI, root: Path | None) -> None:
    """Every error becomes ``{"detail": "<one line>"}`` with its status; server paths are scrubbed."""

    @app.exception_handler(VistuneError)
    async def _vistune_error(request: Request, err: VistuneError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(scrub(str(err), root))}, status_code=_status(err),
                            headers=_headers(err))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": _one_line(f"{where or 'request'}: {first.get('msg', 'invalid')}")},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": _one_line(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        # the message stays in the server log: it may name server paths
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); the server log has the details"},
                            status_code=500)


def _add_status_routes(app: FastAPI, svc: _Service) -> None:
    """The page, liveness, readiness and Prometheus metrics: read-only, never touch a task."""
    model, batcher = svc.model, svc.batcher

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backbone": svc.backbone(), "tasks": len(model.task_names()),
                "admin": svc.admin, "max_batch": svc.max_batch, "batch_window_ms": svc.batch_window_ms,
                "max_upload_bytes": svc.max_upload_bytes, "inflight": svc.inflight,
                "max_inflight": svc.max_inflight, "max_decodes": svc.max_decodes,
                "max_decode_bytes": svc.max_decode_bytes, "queued": batcher.pending, "ready": svc.is_ready(),
                "batching": batcher.stats.to_dict()}

    @app.get("/ready", responses={503: {"description": "not ready: starting, stopping, or no task loaded"}})
    async def ready() -> JSONResponse:
        """For a load balancer: send traffic here only while this answers 200."""
        if not batcher.running:
            why = "the batch worker is not running (starting up or shutting down)"
        elif not model.task_names():
            why = "no task is loaded"
        else:
            return JSONResponse({"status": "ready", "tasks": len(model.task_names())})
        return JSONResponse({"detail": f"not ready: {why}"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics", response_class=Response)
    def prometheus_metrics() -> Response:  # a plain def: runs in the thread pool, off the event loop
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)


def _add_task_routes(app: FastAPI, svc: _Service) -> None:
    """List and show tasks (everyone); add and remove them (admin API only)."""
    model = svc.model

    @app.get("/tasks")
    async def list_tasks() -> dict[str, Any]:
        return {"backbone": svc.backbone(), "tasks": [svc.task_info(t) for t in model.tasks.values()]}

    @app.get("/tasks/{name}")
    async def get_task(name: str) -> dict[str, Any]:
        task = model.tasks.get(name)
        if task is None:
            raise UnknownTaskError(f"no task {name!r} is loaded (loaded: {', '.join(model.task_names()) or 'none'})")
        return svc.task_info(task)

    @app.post("/tasks", status_code=201)
    async def add_task(request: Request) -> dict[str, Any]:
        svc.require_admin(request, "added")
        payload = _json(await _read_body(request, 64 * 1024))
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) \
                or not isinstance(payload.get("path"), str):
            raise BadRequestError('adding a task needs {"name": "...", "path": "tuned file or run folder, '
                                  'relative to the task root"}')
        name = check_task_name(payload["name"])
        if name in model:
            raise DuplicateTaskError(f"task {name!r} is already loaded (remove it first)")
        assert svc.root is not None
        source = await run_in_threadpool(confine, svc.root, payload["path"])
        task = await run_in_threadpool(model.add_task, name, source)
        return svc.task_info(task)

    @app.delete("/tasks/{name}")
    async def remove_task(request: Request, name: str) -> dict[str, Any]:
        svc.require_admin(request, "removed")
        await run_in_threadpool(model.remove_task, name)
        return {"removed": name, "tasks": model.task_names()}


def _add_predict_route(app: FastAPI, svc: _Service) -> None:
    """``POST /predict``: admission (503 past ``max_inflight``), parse, decode, batch, metrics."""
    model = svc.model

    @app.post("/predict", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        asked: list[str] = []  # loaded tasks this request asks for, as soon as known (metrics labels)
        status = 499  # unless set below: the client went away before its answer
        try:
            if svc.inflight >= svc.max_inflight:  # no await between the check and the count: one event loop
                raise BusyError(f"the service is busy ({svc.max_inflight} predictions in progress, the most it "
                                f"admits); retry in {RETRY_AFTER_S} s")
            svc.inflight += 1
            try:
                data, tasks, top_k, threshold = await _parse_predict(request, svc.max_upload_bytes)
                asked = [t for t in (tasks if tasks is not None else model.task_names()) if t in model]
                top = svc.default_top_k if top_k in (None, "") else _int_param(top_k, "top_k", 1, 1000)
                thr = None if threshold in (None, "") else _float_param(threshold, "score_threshold", 0.0, 1.0)
                samples = await run_in_threadpool(svc.decode, data, tasks)
                del data
                asked = [s.task for s in samples]
                try:
                    results = await svc.batcher.submit([(s, top, thr) for s in samples])
                except BatcherClosedError:
                    raise BusyError(f"the service is shutting down; retry in {RETRY_AFTER_S} s "
                                    "(another instance, or this one once restarted)") from None
            finally:
                svc.inflight -= 1
            status = 200
            return {"results": {s.task: r for s, r in zip(samples, results)}}
        except VistuneError as err:
            status = _status(err)
            raise
        except Exception:
            status = 500
            raise
        finally:
            svc.metrics.observe_request(asked, status, time.perf_counter() - started)
