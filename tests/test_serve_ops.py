"""Running the service (issue 24, item 3): /metrics, /health, /ready, graceful shutdown, overload,
the Dockerfile and the load test.

The HTTP cases run against a real uvicorn on 127.0.0.1: in a thread (``live_server``) where the
test must hold the model lock, and as a ``vistune serve`` subprocess for SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_serve import PNG, backbone, free_port, live_server
from test_serve_security import tuned_file
from conftest import run_script
from vistune.serve.batching import Batcher, BatcherClosedError
from vistune.serve.multitask import MultiTaskModel

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra (prometheus-client) is not installed")
import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vistune.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return tuned_file(tmp_path_factory.mktemp("ops") / "a.safetensors")


@pytest.fixture
def model(task_file) -> MultiTaskModel:
    mt = MultiTaskModel(backbone("test_vit", 32))
    mt.add_task("base", task_file)
    return mt


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, labels); the parser refuses
    text that is not valid exposition format."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(get) -> dict[tuple[str, frozenset], float]:
    r = get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return parse_metrics(r.text)


def predict(client, task: str | None = "base"):
    return client.post("/predict", files={"file": ("a.png", PNG, "image/png")},
                       data={"task": task} if task else None)


# ------------------------------------------------------------------------------------------------
# /metrics, /health, /ready


def test_metrics_count_requests_per_task_and_status_with_histograms(model, task_file):
    model.add_task("other", task_file)
    with TestClient(create_app(model, max_batch=4, batch_window_ms=0)) as client:
        before = scrape(client.get)
        assert value(before, "vistune_predict_requests_total", status="200") is None  # nothing answered yet
        assert value(before, "vistune_tasks_loaded") == 2
        assert value(before, "vistune_task_info", task="other", kind="classify", method="linear") == 1
        report = model.memory_report()
        assert value(before, "vistune_task_file_bytes", task="base") == report["tasks"]["base"]["file_bytes"] > 0
        assert value(before, "vistune_task_tensor_bytes", task="base") == report["tasks"]["base"]["tensor_bytes"]
        assert value(before, "vistune_backbone_bytes") == report["backbone_bytes"] > 0
        assert value(before, "vistune_max_inflight") == 16 and value(before, "vistune_ready") == 1

        assert predict(client, "base").status_code == 200
        assert predict(client, None).status_code == 200  # no task named: every task
        assert predict(client, "nope").status_code == 404
        assert client.post("/predict", files={"file": ("a.txt", b"hi", "text/plain")},
                           data={"task": "other"}).status_code == 400
        m = scrape(client.get)
    assert value(m, "vistune_predict_requests_total", status="200") == 2
    assert value(m, "vistune_predict_requests_total", status="404") == 1
    assert value(m, "vistune_task_requests_total", task="base", status="200") == 2
    assert value(m, "vistune_task_requests_total", task="other", status="200") == 1
    assert value(m, "vistune_task_requests_total", task="other", status="400") == 1
    assert value(m, "vistune_task_requests_total", task="_none", status="404") == 1  # "nope" is no label
    assert not any("nope" in str(labels) for _, labels in m)
    # latency: one histogram per task, every bucket present, +Inf = count = its 200s
    for task, n in (("base", 2), ("other", 1)):
        buckets = {dict(lb)["le"]: v for (name, lb), v in m.items()
                   if name == "vistune_predict_latency_seconds_bucket" and dict(lb)["task"] == task}
        assert len(buckets) == 14 and buckets["+Inf"] == n
        assert value(m, "vistune_predict_latency_seconds_count", task=task) == n
        assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    # one request of one sample, one of two (one image, every task): two forwards of 1 and 2 samples
    assert value(m, "vistune_batch_size_count") == 2 and value(m, "vistune_batch_size_sum") == 3
    assert [value(m, "vistune_batch_size_bucket", le=le) for le in ("1.0", "2.0", "4.0", "+Inf")] == [1, 2, 2, 2]
    assert value(m, "vistune_queue_depth") == 0 and value(m, "vistune_inflight_requests") == 0
    assert value(m, "process_resident_memory_bytes") > 0


def test_two_apps_in_one_process_keep_their_own_counters(model):
    a, b = create_app(model), create_app(model)
    with TestClient(a) as ca, TestClient(b) as cb:
        assert predict(ca).status_code == 200
        assert value(scrape(ca.get), "vistune_predict_requests_total", status="200") == 1
        assert value(scrape(cb.get), "vistune_predict_requests_total", status="200") is None


def test_health_is_liveness_and_ready_needs_the_worker_and_a_task(model):
    app = create_app(model)
    client = TestClient(app)  # no `with`: the lifespan has not started, so the batch worker has not
    assert client.get("/health").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 503 and "not running" in r.json()["detail"] and r.headers["retry-after"] == "1"
    with TestClient(app) as client:
        assert client.get("/ready").json() == {"status": "ready", "tasks": 1}
        model.remove_task("base")  # e.g. through the admin API: nothing left to serve
        r = client.get("/ready")
        assert r.status_code == 503 and "no task is loaded" in r.json()["detail"]
        assert value(scrape(client.get), "vistune_ready") == 0
        assert client.get("/health").json()["status"] == "ok"


def test_a_full_service_answers_503_with_retry_after_and_counts_it(model):
    """max_inflight=3, one sample per forward, the forward held on the model lock: one request
    runs, two wait in the batcher's queue (queue depth 2), the fourth gets 503 + Retry-After at
    once; released, the three admitted ones are all answered."""
    app = create_app(model, max_inflight=3, max_batch=1, batch_window_ms=0)
    answers: list[httpx.Response] = []
    with live_server(app) as url:
        get = lambda path: httpx.get(url + path, timeout=60)  # noqa: E731
        with model.lock:
            threads = [threading.Thread(target=lambda: answers.append(predict(httpx.Client(base_url=url, timeout=120))))
                       for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.time() + 60
            while value(scrape(get), "vistune_queue_depth") != 2:
                if time.time() > deadline:
                    pytest.fail(f"two requests never queued: {get('/health').json()}")
                time.sleep(0.02)
            m = scrape(get)
            assert value(m, "vistune_inflight_requests") == 3
            r = predict(httpx.Client(base_url=url, timeout=60))
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        for t in threads:
            t.join(timeout=120)
        m = scrape(get)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert value(m, "vistune_predict_requests_total", status="503") == 1
    assert value(m, "vistune_task_requests_total", task="_none", status="503") == 1  # refused unread
    assert value(m, "vistune_task_requests_total", task="base", status="200") == 3
    assert value(m, "vistune_queue_depth") == 0 and value(m, "vistune_batch_size_count") == 3


# ------------------------------------------------------------------------------------------------
# Shutdown


def test_batcher_stop_runs_every_queued_job_and_refuses_new_ones():
    release = threading.Event()

    def run(items):
        release.wait(30)
        return [i * 10 for i in items]

    async def main():
        b = Batcher(run, max_batch=2, window=0)
        jobs = [asyncio.ensure_future(b.submit([i])) for i in range(5)]
        await asyncio.sleep(0.05)  # the first batch is running (blocked), the rest are queued
        assert b.pending > 0
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0)
        with pytest.raises(BatcherClosedError):
            await b.submit([99])
        release.set()
        await stopping
        return await asyncio.wait_for(asyncio.gather(*jobs), 60), b

    results, b = asyncio.run(main())
    assert results == [[0], [10], [20], [30], [40]] and b.stats.samples == 5 and b.pending == 0


def test_batcher_stop_with_a_timeout_answers_the_jobs_it_drops():
    release = threading.Event()

    async def main():
        b = Batcher(lambda items: (release.wait(30), items)[1], max_batch=1, window=0)
        jobs = [asyncio.ensure_future(b.submit([i])) for i in range(3)]
        await asyncio.sleep(0.05)
        await b.stop(timeout=0.1)  # the running batch never finishes in time
        out = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 60)
        release.set()
        return out

    out = asyncio.run(main())
    assert all(isinstance(r, BatcherClosedError) for r in out)


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_sigterm_answers_every_admitted_request_then_exits_0(task_file):
    """A real ``vistune serve``: four requests are admitted (headers and part of the body sent),
    SIGTERM arrives, the port stops accepting, the bodies finish, and each of the four gets its
    whole 200 answer before the process exits 0."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vistune", "serve", "--task", f"base={task_file}", "--port", str(port),
                             "--threads", "1", "--max-batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    get = lambda path: httpx.get(url + path, timeout=30)  # noqa: E731
    socks: list[socket.socket] = []
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vistune serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if get("/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("vistune serve never became ready")
            time.sleep(0.1)
        body = json.dumps({"image": base64.b64encode(PNG).decode(), "task": "base"}).encode()
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            s.sendall(head + body[:20])
            socks.append(s)
        while value(scrape(get), "vistune_inflight_requests") != 4:
            if time.time() > deadline:
                pytest.fail("the four requests were never admitted")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        while True:  # shutdown has begun once the port refuses new connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                break
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail("the port kept accepting after SIGTERM")
            time.sleep(0.05)
        for s in socks:
            s.sendall(body[20:])
        answers = [_read_response(s) for s in socks]
        out, err = proc.communicate(timeout=60)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped on SIGTERM" in out
    for raw in answers:
        header, _, payload = raw.partition(b"\r\n\r\n")
        assert header.startswith(b"HTTP/1.1 200"), raw[:300]
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", header).group(1))
        assert len(payload) == length  # the whole answer, not a cut one
        top = json.loads(payload)["results"]["base"]["top"]
        assert [t["label"] for t in top] and abs(sum(t["prob"] for t in top) - 1) < 1e-4


# ------------------------------------------------------------------------------------------------
# Dockerfile (docker is not available here: parsed, not built)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return out


def test_dockerfile_parses_copies_files_that_exist_and_runs_vistune_serve_with_real_flags():
    from vistune.cli import build_parser

    path = REPO / "Dockerfile"
    ins = dockerfile_instructions(path)
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "CMD",
             "ENTRYPOINT", "LABEL", "STOPSIGNAL", "VOLUME", "SHELL", "ONBUILD"}
    assert {w for w, _ in ins} <= known, {w for w, _ in ins} - known
    first = next(w for w, _ in ins if w != "ARG")
    assert first == "FROM"
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    assert ".venv" in ignored  # else every build uploads the 5 GB venv as its context
    for word, args in ins:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert len(parts) >= 2, f"COPY needs a source and a destination: {args}"
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
                assert not any(src.rstrip("/") == i.rstrip("/") for i in ignored), f"{src} is in .dockerignore"
    defaults = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    runs = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], a) for w, a in ins if w == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==' in r)
    assert "/whl/cpu" in runs[torch_at]  # the CPU wheel's index
    assert torch_at < next(i for i, r in enumerate(runs) if '".[serve]"' in r)  # before vistune pulls a CUDA torch
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    for pkg in ("torch", "torchvision"):  # the versions the project's own set-up pins
        assert f'"{pkg}==' + re.search(rf"\b{pkg}==([\w.]+)", setup).group(1) + '"' in runs[torch_at]
    entry = json.loads(next(args for w, args in ins if w == "ENTRYPOINT"))
    cmd = json.loads(next(args for w, args in ins if w == "CMD"))
    argv = entry + cmd
    assert argv[:2] == ["vistune", "serve"] and "--config" in argv
    args = build_parser().parse_args(argv[1:])  # every flag is one `vistune serve` has (argparse exits if not)
    assert args.command == "serve" and args.config and args.host == "0.0.0.0"
    exposed = next(args for w, args in ins if w == "EXPOSE")
    assert str(args.port) == exposed.split("/")[0]
    health = next(args for w, args in ins if w == "HEALTHCHECK")
    assert f":{args.port}/health" in health


# ------------------------------------------------------------------------------------------------
# benchmarks/serve.py --load-test


@pytest.mark.slow
def test_load_test_runs_briefly_and_loses_nothing(tmp_path):
    proc = run_script(REPO / "benchmarks" / "serve.py", "--load-test", "--backbone", "test_vit", "--img-size", "32",
                      "--tasks", "2", "--ramp-seconds", "0.5", "--seconds", "1", "--max-inflight", "4", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["sent"] > 0 and report["ok"] > 0
    assert report["sent"] == report["ok"] + report["busy_503"] + report["errors"] + report["lost"]
    assert report["errors"] == 0 and report["lost"] == 0 and report["exit_code"] == 0
    assert report["server_answered"] == report["sent"]  # the server's own count agrees: nothing vanished
    assert any(line.startswith("machine: ") for line in proc.stdout.splitlines())
