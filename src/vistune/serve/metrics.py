"""The service's Prometheus metrics (``GET /metrics``), one registry per app.

Why a registry per app and not prometheus-client's global one: two services in one process (the
tests, a benchmark comparing two models) would otherwise add to each other's counters, and a
second ``create_app`` would fail on duplicate names. Everything here hangs off one
:class:`ServiceMetrics`, created by ``create_app``.

What is exported (all names start with ``vistune_``)::

    predict_requests_total{status}          /predict requests answered, by HTTP status
    task_requests_total{task,status}        the same, once per task a request asked for
    predict_latency_seconds{task}           time from admission to answer of successful requests
    batch_size                              samples per forward (histogram: _count = forwards)
    queue_depth                             samples admitted and waiting for a batch
    inflight_requests / max_inflight        predictions admitted now / the most admitted at once
    ready                                   1 while /ready answers 200
    tasks_loaded, task_info{task,kind,method}, task_tensor_bytes{task}, task_file_bytes{task},
    backbone_bytes                          what is loaded and the memory it holds (read per scrape)
    process_*                               the server process (resident memory, CPU, open files)

``task`` is always the name of a loaded task, or ``_none`` for a request that failed before it
named one (a 503 when busy, a body that is not an image): names a client sends are never labels
until they are loaded tasks, so a client cannot grow the label set. Task names start with a
letter or digit, so ``_none`` is no task's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

#: The ``task`` label of a request that failed before naming a loaded task.
NO_TASK = "_none"
#: Latency buckets (s): CPU inference of a batch can take seconds, and a queue under load more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself (a full batch is its own bucket)."""
    edges, b = {max_batch}, 1
    while b < max_batch:
        edges.add(b)
        b *= 2
    return tuple(float(e) for e in sorted(edges))


class _ModelCollector:
    """Loaded tasks and their bytes, read from the model at scrape time: tasks come and go through
    the admin API, and gauges set once would keep describing removed tasks."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def collect(self) -> Iterable[GaugeMetricFamily]:
        tasks = self.model.tasks  # a copy: add/remove may run meanwhile
        report = self.model.memory_report()
        loaded = GaugeMetricFamily("vistune_tasks_loaded", "Tasks loaded on the shared backbone")
        loaded.add_metric([], len(tasks))
        info = GaugeMetricFamily("vistune_task_info", "A loaded task (value 1) with its kind and method",
                                 labels=["task", "kind", "method"])
        tensor = GaugeMetricFamily("vistune_task_tensor_bytes",
                                   "Bytes of tensor storage a task adds on top of the shared backbone", labels=["task"])
        file = GaugeMetricFamily("vistune_task_file_bytes", "Tensor bytes of a task's tuned file(s)", labels=["task"])
        for name, task in tasks.items():
            info.add_metric([name, task.kind, task.method], 1)
            mem = report["tasks"].get(name)
            if mem is not None:
                tensor.add_metric([name], mem["tensor_bytes"])
                file.add_metric([name], mem["file_bytes"])
        backbone = GaugeMetricFamily("vistune_backbone_bytes", "Bytes of the shared backbone's tensors (held once)")
        backbone.add_metric([], report["backbone_bytes"])
        return [loaded, info, tensor, file, backbone]


class ServiceMetrics:
    """Every metric of one service, in a registry of its own (module docstring)."""

    def __init__(self, model: Any, *, max_batch: int, max_inflight: int, queue_depth: Callable[[], float],
                 inflight: Callable[[], float], ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vistune_predict_requests", "Answered /predict requests, by HTTP status",
                                ["status"], registry=r)
        self.task_requests = Counter("vistune_task_requests",
                                     "Answered /predict requests, once per task asked for, by HTTP status",
                                     ["task", "status"], registry=r)
        self.latency = Histogram("vistune_predict_latency_seconds",
                                 "Seconds from admission to answer of successful /predict requests, per task",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vistune_batch_size", "Samples per forward pass (mixed tasks)",
                                    buckets=batch_buckets(max_batch), registry=r)
        Gauge("vistune_queue_depth", "Samples admitted and waiting for a batch", registry=r).set_function(queue_depth)
        Gauge("vistune_inflight_requests", "/predict requests admitted now (decoding, queued or running)",
              registry=r).set_function(inflight)
        Gauge("vistune_max_inflight", "The most /predict requests admitted at once; more get 503",
              registry=r).set(max_inflight)
        Gauge("vistune_ready", "1 while /ready answers 200", registry=r).set_function(lambda: float(ready()))
        r.register(_ModelCollector(model))
        ProcessCollector(registry=r)

    def observe_request(self, tasks: Sequence[str], status: int, seconds: float) -> None:
        """One answered /predict request that asked for ``tasks`` (loaded names; may be empty)."""
        code = str(status)
        self.requests.labels(code).inc()
        for task in tasks or [NO_TASK]:
            self.task_requests.labels(task, code).inc()
            if status == 200:
                self.latency.labels(task).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
