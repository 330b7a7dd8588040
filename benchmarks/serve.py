"""Serving benchmark: one shared backbone (vistune serve) vs one full model per task.

For N = 1, 2, 4, 8 loaded tasks (methods cycled from --methods), a real uvicorn server runs in a
subprocess and a pool of client threads sends mixed-task traffic over HTTP: every request is one
image for one task drawn at random from the N. Reported per (mode, N): requests/s, latency p50 and
p95, the mean batch the server ran, and the server's resident memory after loading (RSS) and at
its peak (VmHWM). ``naive`` is the same service code (batcher, preprocessing, JSON) around one
complete model per task, each with its own backbone, which is what serving without vistune.serve
costs; ``tokens`` is vistune.serve with deep VPT prompts kept as tokens (``kv_prompts=False``)
instead of attention keys/values. A second table measures what adding one task costs in memory,
per method, in-process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve.py                       # DINOv2-S @84 px
    .venv/bin/python benchmarks/serve.py --backbone test_vit --img-size 32 --tasks 1,2 --requests 40   # smoke

All servers of a run are started first and measured round-robin (``--rounds`` bursts each), so
drift over the run hits every row alike. Take final numbers on a quiet machine: the clients and
the server share its cores.

``--load-test`` instead runs the overload test: a real ``vistune serve`` on 127.0.0.1 (never
another address), its capacity measured with a short closed-loop ramp (1, 2, 4 ... clients up to
``--max-inflight``, ``--ramp-seconds`` each; capacity = the best requests/s), then ``--seconds``
of open-loop traffic at ``--factor`` (2) x that capacity: requests start on a fixed schedule
whatever the answers, so the excess must either queue or be refused. Reported: requests sent,
200s, 503s with Retry-After (the service saying "busy": counted apart, not errors), other
errors (any other status, or a 503 without Retry-After), lost (no HTTP answer at all: reset,
timeout), p50/p99 latency of the 200s, and the server's exit code after SIGTERM (0: it drained).
The target is errors = lost = 0.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve.py --load-test --tasks 2 --seconds 20
    .venv/bin/python benchmarks/serve.py --load-test --backbone test_vit --img-size 32 --tasks 2 --seconds 3  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

METHODS = {  # method -> options for the synthetic tasks
    "linear": {},
    "lora": {"rank": 8},
    "vpt": {"length": 10, "deep": True},
    "adapter": {"bottleneck": 8},
    "bitfit": {},
    "protuning": {},
    "full": {},
}


# ------------------------------------------------------------------------------------------------
# Tasks


def make_tasks(out: Path, backbone: str, weights: str | None, img_size: int, n: int, methods: list[str],
               classes: int = 5) -> dict[str, Path]:
    """N tuned files (methods cycled), tensors moved off their init so every task computes something."""
    import torch

    from vistune import attach
    from vistune.backbones import seeded_backbone

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for k in range(n):
        method = methods[k % len(methods)]
        name = f"t{k}-{method}"
        path = out / f"{name}.safetensors"
        if not path.is_file():
            tuned = attach(seeded_backbone(backbone, weights, img_size), method, num_classes=classes, **METHODS[method])
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for p in tuned.tuned_parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            tuned.save_tuned(path, extra={"class_names": [f"c{i}" for i in range(classes)]})
        files[name] = path
    return files


class NaiveModels:
    """The baseline behind the same service: one complete model (own backbone) per task."""

    def __init__(self, files: dict[str, Path], precision: str) -> None:
        import threading as _t

        from vistune.backbones import backbone_for_file, backbone_info
        from vistune.precision import resolve_precision
        from vistune.tuning import load_tuned, read_tuned_file

        self.lock = _t.RLock()
        self.precision = resolve_precision(precision, "cpu")
        self.bf16 = self.precision.name == "bf16"
        self.models = {}
        self._tasks = {}
        for name, f in files.items():
            meta, _ = read_tuned_file(f)
            model = load_tuned(f, backbone_for_file(meta["backbone"], f)).eval()
            self.models[name] = model
            classes = meta["extra"]["class_names"]
            self._tasks[name] = SimpleNamespace(name=name, kind="classify", method=meta["method"]["name"],
                                                classes=classes, info=lambda n=name: {"name": n})
        self.info = backbone_info(model.model)
        self.fingerprint = model.base_fingerprint

    @property
    def tasks(self):
        return dict(self._tasks)

    def task_names(self):
        return list(self._tasks)

    def __contains__(self, name):
        return name in self._tasks

    def forward(self, images, tasks):
        import torch

        out = [None] * len(tasks)
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault(t, []).append(i)
        with self.lock, torch.no_grad(), self.precision.autocast("cpu"):
            for t, idx in groups.items():
                logits = self.models[t](images[idx]).float()
                for j, i in enumerate(idx):
                    out[i] = logits[j:j + 1]
        return out


def run_server(args: argparse.Namespace) -> None:
    """Subprocess entry: build the model of ``--mode`` and serve it until killed."""
    import torch
    import uvicorn

    from vistune.serve.app import create_app
    from vistune.serve.multitask import MultiTaskModel

    torch.set_num_threads(args.threads)
    files = json.loads(args.files)
    if args.mode == "naive":
        model = NaiveModels({k: Path(v) for k, v in files.items()}, args.precision)
    else:
        first = next(iter(files.values()))
        model = MultiTaskModel.for_file(first, precision=args.precision, kv_prompts=args.mode != "tokens")
        for name, f in files.items():
            model.add_task(name, f)
        if args.pass_cost_tokens is not None:
            model.pass_cost_tokens = args.pass_cost_tokens
    # every client admitted: the benchmark measures throughput, not the service's 503s when busy
    app = create_app(model, max_batch=args.max_batch, batch_window_ms=args.window_ms,
                     max_inflight=max(16, args.concurrency))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# ------------------------------------------------------------------------------------------------
# Load generation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _image_bytes(img_size: int) -> bytes:
    """A real flower photo when the shared data is here, else a random picture."""
    shared = Path(os.environ.get("VISTUNE_SHARED", REPO.parent / "shared")) / "data" / "flowers5" / "sunflower"
    if shared.is_dir():
        for p in sorted(shared.iterdir()):
            if p.suffix.lower() == ".jpg":
                return p.read_bytes()
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (img_size * 2, img_size * 3, 3), dtype=np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()


class Server:
    """One benchmark server subprocess (``--mode`` over ``files``), started and waited for."""

    def __init__(self, mode: str, files: dict[str, Path], args: argparse.Namespace) -> None:
        self.mode, self.files = mode, files
        port = _free_port()
        cmd = [sys.executable, __file__, "--_server", "--mode", mode, "--port", str(port), "--threads",
               str(args.threads), "--files", json.dumps({k: str(v) for k, v in files.items()}), "--max-batch",
               str(args.max_batch), "--window-ms", str(args.window_ms), "--concurrency", str(args.concurrency),
               "--precision", args.precision]
        if args.pass_cost_tokens is not None:
            cmd += ["--pass-cost-tokens", str(args.pass_cost_tokens)]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, env=env)
        self.load_s = float("nan")
        self.rss_loaded = 0

    def wait_ready(self) -> None:
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} server with {len(self.files)} tasks exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - self.started > 600:
                raise RuntimeError("server did not start within 600 s")
            time.sleep(0.2)
        self.load_s = time.time() - self.started
        self.rss_loaded = _status_kb(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def burst(server: Server, tasks: list[str], clients: int, image: bytes) -> tuple[list[float], float, dict]:
    """Send ``tasks`` (one request each) from ``clients`` threads: per-request latencies, the wall
    time of the burst, and the server's batching counters before and after."""
    import httpx

    todo, done, failures, lock = iter(tasks), [], [], threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            while True:
                with lock:
                    task = next(todo, None)
                if task is None:
                    return
                t0 = time.perf_counter()
                r = c.post("/predict", files={"file": ("img.jpg", image, "image/jpeg")}, data={"task": task})
                dt = time.perf_counter() - t0
                with lock:
                    (done.append(dt) if r.status_code == 200 else failures.append(r.text))

    before = httpx.get(server.url + "/health").json()["batching"]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(server.url + "/health").json()["batching"]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return done, wall, {k: after[k] - before[k] for k in ("batches", "samples")}


def measure_all(configs: list[tuple[str, str, dict[str, Path]]], args: argparse.Namespace, image: bytes) -> list[dict]:
    """Every (row label, mode, files) config as its own server, all started first, then measured
    round-robin: ``--rounds`` rounds, each sending every server its share of ``--requests``.

    Why round-robin: on a shared 2-core machine throughput drifts by 10% or more over minutes
    (measured here: the one-task row gave 108 and 122 req/s a few minutes apart), more than the
    differences between rows. Interleaved bursts expose every row to the same drift, so the
    ratios between rows hold even when the absolute numbers wander. Idle servers cost nothing.
    """
    servers: list[tuple[str, Server]] = []
    try:
        for label, mode, files in configs:  # inside the try: a failed start still stops the others
            servers.append((label, Server(mode, files, args)))
        for _, s in servers:
            s.wait_ready()
        rng = random.Random(0)
        per = max(1, args.requests // args.rounds)
        stats = [{"lat": [], "wall": 0.0, "batches": 0, "samples": 0} for _ in servers]  # labels repeat: by index
        for _, s in servers:  # warm-up: first requests pay one-off allocations
            names = list(s.files)
            burst(s, [rng.choice(names) for _ in range(args.warmup)], 1, image)
        for _ in range(args.rounds):
            for st, (_, s) in zip(stats, servers):
                names = list(s.files)
                lat, wall, counts = burst(s, [rng.choice(names) for _ in range(per)], args.concurrency, image)
                st["lat"] += lat
                st["wall"] += wall
                st["batches"] += counts["batches"]
                st["samples"] += counts["samples"]
        results = []
        for st, (label, s) in zip(stats, servers):
            lat = sorted(st["lat"])
            results.append({
                "mode": label, "tasks": len(s.files), "requests": len(lat), "req_per_s": len(lat) / st["wall"],
                "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * _percentile(lat, 0.95),
                "mean_batch": st["samples"] / max(1, st["batches"]),
                "rss_loaded_mb": s.rss_loaded / 1024, "rss_peak_mb": _status_kb(s.proc.pid, "VmHWM") / 1024,
                "load_s": s.load_s,
            })
        return results
    finally:
        for _, s in servers:
            s.stop()


# ------------------------------------------------------------------------------------------------
# Overload: a sustained multiple of the measured capacity


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def _closed_loop(url: str, image: bytes, names: list[str], clients: int, seconds: float) -> float:
    """Requests/s answered 200 by ``clients`` clients each sending its next request on the last answer."""
    import httpx

    done = [0]
    stop_at = time.perf_counter() + seconds

    async def client(k: int, c: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < stop_at:
            r = await c.post("/predict", files={"file": ("img.jpg", image, "image/jpeg")},
                             data={"task": names[i % len(names)]})
            i += clients
            if r.status_code != 200:
                raise RuntimeError(f"ramp with {clients} clients: HTTP {r.status_code}: {r.text[:200]}")
            done[0] += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await asyncio.gather(*(client(k, c) for k in range(clients)))
    return done[0] / (time.perf_counter() - t0)


async def _open_loop(url: str, image: bytes, names: list[str], rate: float, seconds: float,
                     timeout: float) -> dict:
    """Start one request every 1/rate s for ``seconds`` s, whatever the answers; classify each."""
    import httpx

    counts = {"sent": 0, "ok": 0, "busy_503": 0, "errors": 0, "lost": 0}
    latencies: list[float] = []
    examples: list[str] = []

    async def one(c: httpx.AsyncClient, task: str) -> None:
        t0 = time.perf_counter()
        try:
            r = await c.post("/predict", files={"file": ("img.jpg", image, "image/jpeg")}, data={"task": task})
        except httpx.HTTPError as err:  # no HTTP answer: the request is lost
            counts["lost"] += 1
            examples.append(f"lost: {type(err).__name__}: {err}")
            return
        if r.status_code == 200:
            counts["ok"] += 1
            latencies.append(time.perf_counter() - t0)
        elif r.status_code == 503 and r.headers.get("retry-after"):
            counts["busy_503"] += 1
        else:
            counts["errors"] += 1
            examples.append(f"HTTP {r.status_code}: {r.text[:200]}")

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        tasks = []
        start = time.perf_counter()
        i = 0
        while (due := start + i / rate) < start + seconds:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(c, names[i % len(names)])))
            counts["sent"] += 1
            i += 1
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    counts.update(offered_per_s=rate, sent_per_s=counts["sent"] / sent_s, p50_ms=1000 * _percentile(latencies, 0.5),
                  p99_ms=1000 * _percentile(latencies, 0.99), examples=examples[:5])
    return counts


def _server_answered(url: str) -> int:
    """/predict requests the server has answered so far, all statuses (its /metrics)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vistune_predict_requests_total{")))


def load_test(args: argparse.Namespace, out: Path) -> dict:
    """Capacity ramp, then ``args.seconds`` at ``args.factor`` x capacity, against ``vistune serve``."""
    import resource

    import httpx

    # Open loop: every unanswered request holds a socket in the client and one in the server (which
    # inherits this limit). Run out of descriptors and the client's own failures would count as lost.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit is above the kernel's nr_open: keep the soft one
        pass
    n = max(int(x) for x in args.tasks.split(","))
    files = make_tasks(out / "tasks", args.backbone, args.weights, args.img_size, n, args.methods)
    image = _image_bytes(args.img_size)
    port = _free_port()
    cmd = [sys.executable, "-m", "vistune", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms),
           "--max-inflight", str(args.max_inflight), "--precision", args.precision]
    for name, f in files.items():
        cmd += ["--task", f"{name}={f}"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    names = list(files)
    try:
        started = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vistune serve exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - started > 600:
                raise RuntimeError("vistune serve was not ready within 600 s")
            time.sleep(0.2)
        asyncio.run(_closed_loop(url, image, names, 1, min(1.0, args.ramp_seconds)))  # warm-up
        ramp, clients = [], 1
        while clients <= args.max_inflight:  # never more than admitted: the ramp must see no 503
            ramp.append((clients, asyncio.run(_closed_loop(url, image, names, clients, args.ramp_seconds))))
            print(f"ramp: {clients} clients -> {ramp[-1][1]:.1f} req/s", flush=True)
            clients *= 2
        capacity = max(r for _, r in ramp)
        answered = _server_answered(url)
        res = asyncio.run(_open_loop(url, image, names, args.factor * capacity, args.seconds, args.request_timeout))
        res["server_answered"] = _server_answered(url) - answered  # should be sent - lost
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    res.update(capacity_per_s=capacity, ramp=ramp, factor=args.factor, seconds=args.seconds, tasks=n,
               exit_code=code, error_rate=(res["errors"] + res["lost"]) / max(1, res["sent"]))
    return res


# ------------------------------------------------------------------------------------------------
# Memory per added task (in-process)


def memory_per_task(args: argparse.Namespace, out: Path) -> list[dict]:
    import gc
    import tracemalloc

    import torch

    from vistune.serve.multitask import MultiTaskModel

    torch.set_num_threads(args.threads)
    files = make_tasks(out / "mem", args.backbone, args.weights, args.img_size, len(args.memory_methods),
                       args.memory_methods)
    first = next(iter(files.values()))
    model = MultiTaskModel.for_file(first)
    model.add_task("warm-up", first)  # one-time imports and caches are not any task's cost
    model.remove_task("warm-up")
    rows = []
    for name, f in files.items():
        # RSS deltas are not reported: the allocator reuses memory freed by earlier steps, so a
        # whole 84 MB copy can appear as a few MB. Tensor bytes are exact (memory_report), and the
        # throughput table gives each server's RSS after loading, in a fresh process.
        gc.collect()
        tracemalloc.start()
        t0 = time.perf_counter()
        task = model.add_task(name, f)
        add_s = time.perf_counter() - t0
        py_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        rep = model.memory_report()["tasks"][name]
        rows.append({"method": task.method, "file_kb": rep["file_bytes"] / 1024, "tensor_kb": rep["tensor_bytes"] / 1024,
                     "python_kb": py_bytes / 1024, "add_ms": 1000 * add_s,
                     "shares_pass": not task.own_pass})
    rows.append({"method": "(backbone, once)", "file_kb": 0,
                 "tensor_kb": model.memory_report()["backbone_bytes"] / 1024, "python_kb": 0, "add_ms": 0,
                 "shares_pass": True})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dinov2-s14")
    p.add_argument("--weights", default=None)
    p.add_argument("--img-size", type=int, default=84)
    p.add_argument("--tasks", default="1,2,4,8", help="numbers of loaded tasks")
    p.add_argument("--methods", default="lora,vpt,adapter,linear", help="cycled over the synthetic tasks")
    p.add_argument("--modes", default="multitask,naive",
                   help="multitask (vistune serve), naive (a model per task), tokens (vistune serve with deep VPT "
                        "prompts kept as tokens, MultiTaskModel(kv_prompts=False): the serving before keys/values)")
    p.add_argument("--requests", type=int, default=600, help="timed requests per (mode, N), over all rounds")
    p.add_argument("--rounds", type=int, default=5,
                   help="round-robin rounds: every server gets requests/rounds per round (see measure_all)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--window-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 only where this CPU runs it natively, else fp32")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--out", default="runs/bench-serve")
    p.add_argument("--alone", action="store_true",
                   help="also serve each method as the only task, for the 'x alone' column: measured req/s over "
                        "what the same mix would reach if mixing cost nothing (each request at its own method's "
                        "single-task speed)")
    p.add_argument("--pass-cost-tokens", type=int, default=None,
                   help="MultiTaskModel.pass_cost_tokens in the server (0: a pass per prompt length, never padded)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the per-task memory table")
    p.add_argument("--memory-methods", default="linear,lora,vpt,adapter,bitfit,protuning,full",
                   help="methods of the per-task memory table")
    p.add_argument("--load-test", action="store_true",
                   help="only the overload test: capacity ramp, then --seconds at --factor x capacity")
    p.add_argument("--seconds", type=float, default=20.0, help="load test: how long the overload lasts")
    p.add_argument("--ramp-seconds", type=float, default=2.0, help="load test: seconds per ramp step")
    p.add_argument("--factor", type=float, default=2.0, help="load test: offered load / measured capacity")
    p.add_argument("--max-inflight", type=int, default=16, help="load test: the server's --max-inflight")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="load test: seconds a client waits for an answer before counting the request lost")
    # subprocess mode
    p.add_argument("--_server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="multitask", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--files", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bf16:
        args.precision = "bf16"
    if args._server:
        run_server(args)
        return 0
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    args.memory_methods = [m.strip() for m in args.memory_methods.split(",") if m.strip()]
    unknown = [m for m in args.memory_methods if m not in METHODS]
    if unknown:
        p.error(f"unknown memory methods {unknown}; choose from {list(METHODS)}")
    counts = [int(n) for n in args.tasks.split(",")]
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    if args.load_test:
        if args.seconds <= 0 or args.ramp_seconds <= 0 or args.factor <= 0 or args.max_inflight < 1:
            p.error("--seconds, --ramp-seconds and --factor must be > 0, --max-inflight >= 1")
        return print_load_test(load_test(args, out), args, out)
    results = []
    if not args.memory_only:
        files = make_tasks(out / "tasks", args.backbone, args.weights, args.img_size, max(counts), args.methods)
        image = _image_bytes(args.img_size)
        configs = []
        for mode in [m.strip() for m in args.modes.split(",")]:
            configs += [(mode, mode, dict(list(files.items())[:n])) for n in counts]
            if mode == "multitask" and args.alone:
                configs += [(f"alone {name.split('-', 1)[1]}", mode, {name: path})
                            for name, path in list(files.items())[1:len(args.methods)]]  # the first is the 1-task row
        results = measure_all(configs, args, image)
        for res in results:
            print(json.dumps(res), flush=True)
    mem = [] if args.skip_memory else memory_per_task(args, out)
    (out / "serve.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                                                "throughput": results, "memory": mem}, indent=2))
    from vistune.precision import machine_line, resolve_precision

    print("\n" + machine_line(resolve_precision(args.precision, "cpu").name, threads=args.threads))
    if results:
        print(f"{args.backbone} @{args.img_size}px, methods cycled {','.join(args.methods)}; "
              f"{args.requests} requests in {args.rounds} round-robin rounds, {args.concurrency} clients, server: {args.threads} torch thread(s), "
              f"max batch {args.max_batch}, window {args.window_ms} ms\n")
        print("| mode | tasks | req/s | x 1 task | x alone | p50 ms | p95 ms | p95 x 1 task | mean batch | "
              "RSS loaded MB | RSS peak MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        one, alone, p95 = _ratios(r, results, args.methods)
        print(f"| {r['mode']} | {r['tasks']} | {r['req_per_s']:.1f} | {_fmt(one)} | {_fmt(alone)} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {_fmt(p95)} | {r['mean_batch']:.1f} | {r['rss_loaded_mb']:.0f} | "
              f"{r['rss_peak_mb']:.0f} |")
    if mem:
        print(f"\nAdding one task to {args.backbone} @{args.img_size}px (in-process):\n")
        print("| method | file KB | tensor KB added | Python objects KB | add ms | own pass |")
        print("|---|---|---|---|---|---|")
        for r in mem:
            print(f"| {r['method']} | {r['file_kb']:.1f} | {r['tensor_kb']:.1f} | {r['python_kb']:.0f} | "
                  f"{r['add_ms']:.0f} | {'no' if r['shares_pass'] else 'yes'} |")
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratios(r: dict, results: list[dict], methods: list[str]) -> tuple[float | None, float | None, float | None]:
    """(req/s over the same mode's one-task row, req/s over the 'alone' expectation, p95 over the
    one-task row's p95); an 'alone' row compares with the multitask one-task row.

    The expectation for N tasks with methods cycled and each request's task drawn uniformly: the
    mean time per request is the mean over tasks of 1 / (its method's single-task req/s), so the
    expected rate is the harmonic mean of those rates — what the server would do if mixing tasks
    cost nothing beyond each method's own price (a VPT-deep request carries more tokens than a
    LoRA one, so a mix with it is slower than LoRA alone even with perfect batching)."""
    base = "multitask" if r["mode"].startswith("alone ") else r["mode"]
    one = next((o for o in results if o["mode"] == base and o["tasks"] == 1), None)
    ratio_one = r["req_per_s"] / one["req_per_s"] if one else None
    p95 = r["p95_ms"] / one["p95_ms"] if one else None
    if r["mode"] != "multitask" or one is None:
        return ratio_one, None, p95
    speed = {methods[0]: one["req_per_s"]}
    speed.update({o["mode"].split(" ", 1)[1]: o["req_per_s"] for o in results if o["mode"].startswith("alone ")})
    cycled = [methods[k % len(methods)] for k in range(r["tasks"])]
    if not all(m in speed for m in cycled):
        return ratio_one, None, p95
    expected = 1.0 / (sum(1.0 / speed[m] for m in cycled) / len(cycled))
    return ratio_one, r["req_per_s"] / expected, p95


def print_load_test(res: dict, args: argparse.Namespace, out: Path) -> int:
    """The machine line, the load test's table, load.json; exit 1 if anything errored or was lost."""
    from vistune.io import write_json_atomic
    from vistune.precision import machine_line, resolve_precision

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "load.json", res)
    print("\n" + machine_line(resolve_precision(args.precision, "cpu").name, threads=args.threads))
    print(f"{args.backbone} @{args.img_size}px, {res['tasks']} tasks; server: {args.threads} torch thread(s), "
          f"max batch {args.max_batch}, window {args.window_ms} ms, max inflight {args.max_inflight}; clients on "
          f"the same machine\n")
    print(f"capacity (best of the ramp): {res['capacity_per_s']:.1f} req/s; offered {res['offered_per_s']:.1f} req/s "
          f"({args.factor:g}x) for {args.seconds:g} s, sent at {res['sent_per_s']:.1f} req/s\n")
    print("| sent | 200 | 503 + Retry-After | other errors | lost | error rate | p50 ms (200s) | p99 ms (200s) "
          "| server answered | exit after SIGTERM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {res['sent']} | {res['ok']} | {res['busy_503']} | {res['errors']} | {res['lost']} | "
          f"{res['error_rate']:.3f} | {res['p50_ms']:.0f} | {res['p99_ms']:.0f} | {res['server_answered']} | "
          f"{res['exit_code']} |")
    for line in res["examples"]:
        print(f"  e.g. {line}", file=sys.stderr)
    return 0 if res["errors"] == 0 and res["lost"] == 0 and res["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
