"""Cross-request batching: requests that arrive together share one forward, whatever their tasks.

One asyncio queue and one worker. The worker takes the first waiting job, then keeps collecting
jobs for at most ``window`` seconds or until ``max_batch`` samples are in hand, and runs them as
one mixed batch in a thread (the event loop keeps accepting requests meanwhile). A job larger
than ``max_batch`` (one image for many tasks) runs alone, in chunks of ``max_batch``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        """Start the worker on the running loop (idempotent; ``submit`` calls it too)."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def submit(self, items: list[Any]) -> list[Any]:
        self.start()
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(list(items), future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else await self._queue.get()
            carry = None
            jobs, n = [job], len(job.items)
            deadline = loop.time() + self.window
            while n < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
                if n + len(nxt.items) > self.max_batch:
                    carry = nxt  # first of the next batch
                    break
                jobs.append(nxt)
                n += len(nxt.items)
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
