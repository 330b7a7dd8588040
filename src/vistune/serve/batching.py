"""Cross-request batching: requests that arrive together share one forward, whatever their tasks.

One asyncio queue and one worker. The worker takes the first waiting job, then keeps collecting
jobs for at most ``window`` seconds or until ``max_batch`` samples are in hand, and runs them as
one mixed batch in a thread (the event loop keeps accepting requests meanwhile). A job larger
than ``max_batch`` (one image for many tasks) runs alone, in chunks of ``max_batch``.

Shutdown drains: :meth:`Batcher.stop` refuses new jobs (:class:`BatcherClosedError`), lets the
worker run every job already queued, then returns. The service calls it from its lifespan
shutdown, which uvicorn runs on SIGTERM after it has stopped accepting connections and its open
requests have finished, so no admitted request is dropped on the way out.

The queue needs no bound of its own: each queued job is an admitted request, and the service
admits at most ``max_inflight`` of them (more get 503 + Retry-After), so at most that many jobs
ever wait here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class BatcherClosedError(RuntimeError):
    """``submit`` after ``stop`` began: the service is shutting down."""


#: Put in the queue by ``stop``: the worker returns when it reaches it (every earlier job done).
_STOP = object()


@dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future


@dataclass
class BatchStats:
    """What the worker did so far (for /health and the benchmark)."""

    batches: int = 0
    samples: int = 0
    busy_s: float = 0.0
    largest: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples, "largest_batch": self.largest,
                "mean_batch": self.samples / self.batches if self.batches else 0.0,
                "busy_s": round(self.busy_s, 3)}


@dataclass
class Batcher:
    """``await batcher.submit(items)`` -> ``run(items)``'s results for those items, batched with others.

    ``run`` takes a list of items and returns one result per item (an ``Exception`` instance as
    a result fails only its own job). It runs in a worker thread.
    """

    run: Callable[[list[Any]], list[Any]]
    max_batch: int = 16
    window: float = 0.005
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.window < 0:
            raise ValueError(f"the batching window must be >= 0 s, got {self.window}")
        self._queue: asyncio.Queue[Any] | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._pending = 0  # samples queued, not yet taken into a batch
        self._futures: set[asyncio.Future] = set()  # every job not answered yet

    @property
    def running(self) -> bool:
        """Started and not stopping: new jobs are accepted."""
        return self._worker is not None and not self._worker.done() and not self._closing

    @property
    def pending(self) -> int:
        """Samples waiting for a batch (the queue depth, for /metrics)."""
        return self._pending

    def start(self) -> None:
        """Start the worker on the running loop (idempotent; ``submit`` calls it too)."""
        if self._closing:
            raise BatcherClosedError("the batcher is stopping")
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._pending = 0
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, run every queued one, then stop the worker.

        After ``timeout`` seconds (None: no limit) the worker is cancelled and the jobs still
        waiting fail with :class:`BatcherClosedError` rather than waiting forever.
        """
        if self._worker is None:
            return
        self._closing = True
        worker, queue = self._worker, self._queue
        try:
            if not worker.done():
                assert queue is not None
                queue.put_nowait(_STOP)
                try:
                    await asyncio.wait_for(asyncio.shield(worker), timeout)
                except TimeoutError:
                    worker.cancel()
                    try:
                        await worker
                    except asyncio.CancelledError:
                        pass
            for future in list(self._futures):  # only after a timeout (or a worker that died): none waits forever
                if not future.done():
                    future.set_exception(BatcherClosedError("the service stopped before this request was answered"))
        finally:
            self._worker = None
            self._closing = False

    async def submit(self, items: list[Any]) -> list[Any]:
        self.start()
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        self._queue.put_nowait(_Job(list(items), future))  # unbounded: admission bounds it (module doc)
        self._pending += len(items)
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        stopping = False
        while True:
            if carry is None and stopping:
                return
            job = carry if carry is not None else await self._queue.get()
            carry = None
            if job is _STOP:
                return
            jobs, n = [job], len(job.items)
            deadline = loop.time() + self.window
            while n < self.max_batch and not stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
                if nxt is _STOP:  # every job is queued before it: run this batch (and any carry), then return
                    stopping = True
                    break
                if n + len(nxt.items) > self.max_batch:
                    carry = nxt  # first of the next batch
                    break
                jobs.append(nxt)
                n += len(nxt.items)
            self._pending -= sum(len(j.items) for j in jobs)
            live = [j for j in jobs if not j.future.done()]  # a client may have gone away
            if not live:
                continue
            items = [it for j in live for it in j.items]
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run_chunks, items)
            except Exception as err:  # noqa: BLE001 - the worker must survive any failure
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(err)
                continue
            finally:
                self.stats.busy_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.samples += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            pos = 0
            for j in live:
                mine = results[pos:pos + len(j.items)]
                pos += len(j.items)
                if j.future.done():
                    continue
                failed = next((r for r in mine if isinstance(r, Exception)), None)
                if failed is not None:
                    j.future.set_exception(failed)
                else:
                    j.future.set_result(mine)

    def _run_chunks(self, items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(items), self.max_batch):
            out.extend(self.run(items[i:i + self.max_batch]))
        return out
