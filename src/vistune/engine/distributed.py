"""Data-parallel training on torchrun: process group, sharded batches, gradient and metric reduction.

The same code runs in one process (``world == 1``: every collective is a no-op) and under
``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPU). Design decisions:

* **Only tuned parameters are synchronised.** Instead of wrapping the model in
  ``DistributedDataParallel`` (whose constructor broadcasts every backbone tensor and whose
  forward must be the one the task calls), :meth:`Dist.reduce_gradients` all-reduces the
  gradients of the trainable parameters in one flat bucket after the accumulation window — the
  same collective DDP issues, over the tuned set only. The frozen backbone never takes part.
  Parameters without a gradient in a step (a source head that saw no batch) count as zeros.
* **The global batch is the batch.** ``--batch-size`` is global: every step draws one global
  batch from a permutation that is a function of ``(seed, epoch)`` only — the very order a
  single process uses — and each rank takes a contiguous share of it. Each rank's loss is
  weighted by its share of the global batch, so the summed gradient equals the single-process
  gradient of the global batch up to float summation order, also for a last, short batch that
  leaves some ranks empty. Resume stays exact because nothing depends on history.
* **Evaluation is sharded without padding**: rank r scores a contiguous slice, partial results
  are gathered and reduced, so every test image counts exactly once whatever N is.
* **Rank 0 alone writes** (the loop asks :attr:`Dist.is_main`).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vistune.data import DataError
from vistune.data.wds import assign_shards
from vistune.errors import VistuneError

#: How long a collective may wait for a peer before the job fails (instead of hanging forever).
DEFAULT_TIMEOUT_S = float(os.environ.get("VISTUNE_DIST_TIMEOUT", 600))


class DeviceError(VistuneError, ValueError):
    """A ``--device`` that torch does not know, or one this machine does not have."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (a GPU when there is one), or a device this machine really has.

    Checked here, once, so that ``--device cuda`` on a machine without a GPU or a typo such as
    ``--device banana`` ends in one line before any work, not in a traceback from the first
    ``.to(device)``.
    """
    text = str(name).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise DeviceError("device 'meta' holds no values (it only describes shapes); use auto, cpu or cuda")
    backend = getattr(torch, dev.type, None)
    available = torch.backends.mps.is_available if dev.type == "mps" else getattr(backend, "is_available", None)
    if available is None or not available():
        raise DeviceError(f"device {text!r} is not available on this machine; use --device cpu (or auto)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise DeviceError(f"device {text!r} does not exist: this machine has {count()} {dev.type} device(s)")
    return dev


@dataclass
class Dist:
    """This process's place in the job; every method is a no-op when ``world == 1``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (decisions that must agree, e.g. an early stop)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Make every rank start from rank 0's trainable values (one flat broadcast)."""
        if not self.enabled or not params:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self._comm_device())
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                p.copy_(flat[offset: offset + n].view_as(p).to(p.dtype))
                offset += n

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the (already share-weighted) gradients of ``params`` over ranks, in one bucket."""
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]).to(self._comm_device())
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n

    # -- what tasks use (they never import the engine: these come with the Dist they are given)
    def train_loader(self, dataset: Any, batch_size: int, *, seed: int, collate: Callable | None = None,
                     num_workers: int = 0) -> ShardedLoader | StreamedLoader:
        """One epoch's batches (``len()`` is the step count); a split with a ``stream`` (``wds:``
        shards too large to cache) is read shard by shard instead of by index."""
        if getattr(dataset, "stream", None) is not None:
            return StreamedLoader(dataset.stream, batch_size, seed=seed, dist=self, collate=collate,
                                  num_workers=num_workers)
        return ShardedLoader(dataset, batch_size, seed=seed, shuffle=True, dist=self, collate=collate,
                             num_workers=num_workers)

    def eval_loader(self, dataset: Any, batch_size: int, *, collate: Callable | None = None,
                    num_workers: int = 0) -> DataLoader | list:
        return eval_batches(dataset, batch_size, self, collate, num_workers)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return self.all_gather_object(obj)

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job described by the environment, or return the single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
        )
        # a script that calls train() under torchrun (not `python -m vistune`, whose exit leaves
        # the group) would otherwise reach interpreter teardown with gloo's threads alive, and
        # a rank then aborts at exit ("terminate called without an active exception", SIGABRT)
        atexit.register(shutdown_current)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown_current() -> None:
    """Leave the process group at the end of a command (no-op outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: Sequence[str], command: str = "train") -> int:
    """``vistune CMD --nproc N ...``: run ``python -m vistune ARGV`` as N processes on this machine.

    Uses torchrun's own launcher (``torch.distributed.launcher``), standalone rendezvous. When a
    worker fails, the launcher stops the others (no hang) and this prints one line naming the
    failed rank; the worker's own one-line error is above it.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"vistune-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, sys.executable)("-m", "vistune", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"failed (exit code {code})"
        if code < 0:  # killed by a signal (the OOM killer, kill -9): say which

            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        again = "; resume with --resume" if command in ("train", "pretrain") else ""
        print(f"vistune {command}: error: worker rank {rank} of {nproc} {how}; the job was stopped{again}",
              file=sys.stderr)
        return 2 if code in (0, 2) else (code if code > 0 else 1)
    return 0


# ------------------------------------------------------------------------------------------------
# Batches


def epoch_order(n: int, seed: int, shuffle: bool) -> list[int]:
    """The sample order of one epoch: a function of ``seed`` alone.

    Bit-identical to ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))``,
    which draws one number for its worker seed before the permutation, so runs made before the
    engine learned to shard keep their exact order.
    """
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    return torch.randperm(n, generator=gen).tolist()


def local_share(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (sizes differ by at most one)."""
    n = len(batch)
    lo = rank * n // world
    hi = (rank + 1) * n // world
    return list(batch[lo:hi])


class ShardedLoader:
    """One epoch of global batches; yields ``(local batch or None, global batch size)``.

    ``None`` means this rank's share of a short last batch is empty; the loop then skips the
    forward pass but still joins the gradient reduction.
    """

    def __init__(self, dataset: Any, batch_size: int, *, seed: int, shuffle: bool, dist: Dist,
                 collate: Callable | None = None, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dist = dist
        self.collate = collate
        self.num_workers = num_workers

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        order = epoch_order(len(self.dataset), self.seed, self.shuffle)
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        local = [local_share(b, self.dist.rank, self.dist.world) for b in batches]
        nonempty = [b for b in local if b]
        # A generator of our own: DataLoader draws its worker seed from it, not from the global
        # RNG, so building a loader never shifts dropout's random stream.
        loader = DataLoader(self.dataset, batch_sampler=nonempty, collate_fn=self.collate,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))
        it = iter(loader)
        for share, full in zip(local, batches):
            yield (next(it) if share else None), len(full)


class StreamedLoader:
    """One epoch of a streamed split (``wds:`` shards); yields ``(local batch or None, global batch size)``.

    Why not :class:`ShardedLoader`: a stream has no index to permute, so the rank split is by
    shard. Each rank owns a fixed, balanced set of shards (:func:`~vistune.data.wds.assign_shards`
    over their sample counts, the same on every rank and every epoch) and fills its share
    ``b_r`` of the global batch (:func:`local_share` sizes, as in the indexed path) from them;
    the order inside comes from the shard stream's seeded shard order and shuffle buffer, so it
    is a function of ``(seed, world, num_workers)`` — the task's seed folds in the epoch — and a
    run resumed at an epoch boundary reads the same batches. Every rank takes the same number
    of steps, ``max_r ceil(n_r / b_r)``; a rank whose shards run out first yields ``None`` (the
    loop still joins the gradient reduction), and the global batch size of each step is known
    to all ranks from the shard counts, so each rank's loss weight is exact (short by one for
    each image the stream skips as unreadable: the counts come from the scan, not from decoding).
    """

    def __init__(self, shardset: Any, batch_size: int, *, seed: int, dist: Dist, collate: Callable | None = None,
                 num_workers: int = 0) -> None:
        self.set = shardset
        self.seed = seed
        self.dist = dist
        self.collate = collate or torch.utils.data.default_collate
        self.num_workers = num_workers
        world = dist.world
        if len(shardset.shards) < world:
            raise DataError(f"wds: {len(shardset.shards)} training shards cannot feed {world} processes: each rank "
                            f"reads whole shards; write at least {world} (python -m vistune.data shard --shard-size)")
        if batch_size < world:
            raise DataError(f"batch size {batch_size} is smaller than the {world} processes: a streamed split needs "
                            "every rank to read from its shards at every step")
        self.parts = assign_shards(shardset.counts, world)
        self.sizes = [sum(shardset.counts[i] for i in part) for part in self.parts]
        self.shares = [len(local_share(range(batch_size), r, world)) for r in range(world)]
        self.steps = int(max(-(-n // b) for n, b in zip(self.sizes, self.shares)))

    def __len__(self) -> int:
        return self.steps

    def global_size(self, step: int) -> int:
        """Samples in the global batch of ``step`` (from the shard counts: known to every rank)."""
        return sum(min(b, max(0, n - step * b)) for n, b in zip(self.sizes, self.shares))

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        rank = self.dist.rank
        dataset = self.set.dataset(self.parts[rank], self.seed, rank)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed))
        items = iter(loader)
        share = self.shares[rank]
        for step in range(self.steps):
            take = min(share, max(0, self.sizes[rank] - step * share))
            batch = [item for _, item in zip(range(take), items)]
            yield (self.collate(batch) if batch else None), self.global_size(step)


def eval_shard(n: int, dist: Dist) -> range:
    """The contiguous slice of an evaluation split this rank scores (no padding, no overlap)."""
    return range(dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world)


def eval_batches(dataset: Any, batch_size: int, dist: Dist, collate: Callable | None = None,
                 num_workers: int = 0) -> DataLoader | list:
    """Sequential batches over this rank's evaluation shard."""
    idx = list(eval_shard(len(dataset), dist))
    chunks = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    if not chunks:
        return []
    return DataLoader(dataset, batch_sampler=chunks, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0))
