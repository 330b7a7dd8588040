"""How training works: the ONE loop every vistune job runs (classify, segment, detect, PVP).

``fit(task, cfg, dist, out=...)`` trains a set-up :class:`~vistune.tasks.base.Task` and returns
its metrics. Per epoch::

    batches = task.train_batches(epoch)          # (local batch | None, global batch size)
    for each batch:  loss = task.loss(batch)     # mean over the local batch
                     stop if loss is not finite  # a diverged run never writes a model
                     backward(loss · local share of the global batch / accum_steps)
                     every accum_steps: all-reduce tuned grads (DDP), clip, step, schedule
    val (every val_every epochs and after the last): task.evaluate("val"), remember the best
    callbacks (log.jsonl, progress bar, Optuna pruning), checkpoint (rank 0)

then the selected epoch's weights (``select``: the last, VPT's protocol, or the best on val —
never on test) are evaluated on test once, and rank 0 writes the task's files plus
``metrics.json`` as one set (``metrics.json`` last: it marks the run complete).

Protocol rules enforced here: selection uses the validation split only; the test split is
evaluated once at the end (``eval_test_every`` adds *labelled* ``periodic_test_*`` numbers that
nothing selects on); a resumed run reproduces the uninterrupted one bit for bit (data order is a
function of (seed, epoch); the checkpoint holds optimizer, scheduler and every RNG).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vistune.config import TrainConfig
from vistune.engine.callbacks import Callback, FitState, JsonlLog, Progress
from vistune.engine.checkpoint import (
    CHECKPOINT,
    config_fingerprint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vistune.engine.distributed import Dist
from vistune.engine.optim import apply_step, build_optimizer, warmup_cosine
from vistune.errors import VistuneError
from vistune.io import json_text, write_set_atomic
from vistune.precision import machine_info
from vistune.tasks.base import Task, clone_tensors


class DivergedError(VistuneError):
    """The loss or a trained parameter became NaN/inf (or the loss exploded): the run stops and
    writes no model."""


#: A loss this many times the first step's is an explosion, not training (a healthy run stays
#: within a small multiple of its initial loss; an lr a million times too large goes far past).
DIVERGENCE_FACTOR = 1e4


class StopFit(VistuneError):
    """Another rank's callback stopped the run (e.g. an Optuna pruner on rank 0)."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: GPU allocator peak on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _check_finite_params(params: Sequence[torch.nn.Parameter], where: str, lr: float) -> None:
    for p in params:
        if not bool(torch.isfinite(p.detach()).all()):
            raise DivergedError(
                f"training diverged: a trained parameter became NaN/inf {where} (lr {lr:.3g}); "
                "lower the learning rate (--lr) or keep gradient clipping on (--clip-grad)"
            )


@dataclass
class _Training:
    """What one ``fit`` carries from phase to phase: the phases below read and update it in place."""

    task: Task
    cfg: TrainConfig
    dist: Dist
    out: Path | None
    config: dict[str, Any]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    steps_per_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"value": -math.inf, "epoch": None, "result": None,
                                                          "state": None})
    start_epoch: int = 0
    train_seconds: float = 0.0
    first_loss: float | None = None
    cbs: list[Callback] = field(default_factory=list)
    state: FitState | None = None

    @property
    def writes(self) -> bool:
        """Only rank 0 with an output folder writes files (log, checkpoint, outputs)."""
        return self.dist.is_main and self.out is not None

    @property
    def lr(self) -> float:
        """The scheduler's current learning rate, as logged and as quoted in divergence errors."""
        return self.scheduler.get_last_lr()[0]


def fit(
    task: Task,
    cfg: TrainConfig,
    dist: Dist,
    *,
    out: Path | None,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    stop_after_epoch: int | None = None,
    evaluate_test: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``task`` (already set up) as ``cfg`` says; see the module docstring.

    ``out=None`` keeps everything in memory (no checkpoint, log or files). ``evaluate_test=False``
    never touches the test split (sweep trials). ``stop_after_epoch`` returns early after that
    epoch's checkpoint (tests simulate an interruption with it). ``extra`` goes into the saved
    files' metadata next to the run config.
    """
    run = _set_up(task, cfg, dist, out, resume)
    _start_callbacks(run, callbacks)
    for epoch in range(run.start_epoch, cfg.epochs):
        record = _train_epoch(run, epoch)
        last = epoch + 1 == cfg.epochs
        _evaluate_epoch(run, epoch, record, last, evaluate_test)
        run.history.append(record)
        run.state.history = run.history
        _each(run.cbs, dist, lambda c: c.on_epoch_end(run.state, record))
        if _checkpoint_due(cfg, epoch, last, stop_after_epoch) and out is not None:
            _save(run, epoch)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            dist.barrier()
            return {"stopped_after_epoch": epoch + 1}
    metrics = _select_and_test(run, evaluate_test)
    _each(run.cbs, dist, lambda c: c.on_fit_end(run.state, metrics))
    if run.writes:
        files = task.output_files({"config": run.config, "precision": task.precision.name, **(extra or {})})
        text = json_text(metrics)
        write_set_atomic(out, [*files, ("metrics.json", lambda tmp: tmp.write_text(text))])
    dist.barrier()
    return metrics


def _set_up(task: Task, cfg: TrainConfig, dist: Dist, out: Path | None, resume: bool) -> _Training:
    """Optimizer, schedule and loss scaler for the tuned parameters, then the checkpoint's state
    when resuming (the checkpoint is read first so a config mismatch fails before any work)."""
    config = cfg.to_dict()
    ckpt = load_checkpoint(out / CHECKPOINT, config) if resume and out is not None else None
    marked = task.parameters()
    method_params = [p for p, is_head in marked if not is_head and p.requires_grad]
    head_params = [p for p, is_head in marked if is_head and p.requires_grad]
    params = method_params + head_params
    dist.broadcast_parameters(params)
    optimizer = build_optimizer(method_params, cfg.optimizer, cfg.lr, cfg.wd, cfg.momentum,
                                head=head_params, head_lr=cfg.head_lr)
    precision = task.precision
    scaler = precision.grad_scaler(dist.device.type)  # fp16 only: bf16 and fp32 need no loss scaling
    if dist.is_main and cfg.progress:
        print(f"vistune: {precision.line()}", file=sys.stderr)
    steps_per_epoch = math.ceil(task.num_train_batches() / cfg.accum_steps)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs,
                              int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.min_lr_ratio)
    run = _Training(task=task, cfg=cfg, dist=dist, out=out, config=config, params=params, optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler, steps_per_epoch=steps_per_epoch,
                    train_seconds=task.cache_seconds)
    if ckpt is not None:
        _restore(run, ckpt)
    return run


def _restore(run: _Training, ckpt: dict[str, Any]) -> None:
    """Put the task, optimizer, schedule, scaler, RNGs and history back where the checkpoint left
    them, so the resumed run continues bit for bit."""
    dist = run.dist
    run.task.load_state_dict(ckpt["task"], "checkpoint")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if len(rngs) != dist.world and dist.is_main:
        print(f"vistune: resuming with {dist.world} processes instead of {len(rngs)}: random streams "
              "(dropout) differ from an uninterrupted run", file=sys.stderr)
    set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
    run.history = list(ckpt["history"])
    run.best = dict(ckpt["best"])
    run.start_epoch = int(ckpt["epoch"]) + 1
    run.train_seconds = float(ckpt["train_seconds"])


def _start_callbacks(run: _Training, callbacks: Sequence[Callback]) -> None:
    """The callbacks this rank runs (files only on rank 0 with an output folder) and their start."""
    cfg, dist = run.cfg, run.dist
    if run.writes:
        run.cbs.append(JsonlLog(run.out / "log.jsonl"))
    if dist.is_main and cfg.progress:
        run.cbs.append(Progress())
    run.cbs.extend(callbacks if dist.is_main else [])
    run.state = FitState(epochs=cfg.epochs, steps_per_epoch=run.steps_per_epoch, primary=run.task.primary,
                         history=run.history, out=run.out, epoch=run.start_epoch)
    _each(run.cbs, dist, lambda c: c.on_fit_start(run.state))
    run.first_loss = run.history[0].get("first_loss") if run.history else None


def _train_epoch(run: _Training, epoch: int) -> dict[str, Any]:
    """One pass over the training batches (backward per batch, a step every ``accum_steps``);
    returns the epoch's log record with the train numbers summed over every rank."""
    task, cfg, dist, state = run.task, run.cfg, run.dist, run.state
    state.epoch, state.step = epoch + 1, 0
    task.set_mode(True)
    batches = task.train_batches(epoch)
    n_batches = task.num_train_batches()
    _each(run.cbs, dist, lambda c: c.on_epoch_start(state, n_batches))
    t0 = time.perf_counter()
    seen, loss_sum, stats = 0, 0.0, {}
    run.optimizer.zero_grad(set_to_none=True)
    for i, (batch, n_global) in enumerate(batches):
        loss_value, n_local = math.nan, 0
        if batch is not None:
            loss_value, n_local = _backward(run, batch, n_global, epoch, i, stats)
            seen += n_local
            loss_sum += loss_value * n_local
        if (i + 1) % cfg.accum_steps == 0 or i + 1 == n_batches:
            dist.reduce_gradients(run.params)
            apply_step(run.optimizer, run.scheduler, run.params, cfg.clip_grad, run.scaler)  # clip, step, schedule
            state.step += 1
        if batch is not None:
            _each(run.cbs, dist, lambda c: c.on_batch_end(state, loss_value, n_local, run.lr), collective=False)
    epoch_seconds = time.perf_counter() - t0
    run.train_seconds += epoch_seconds
    _check_finite_params(run.params, f"after epoch {epoch + 1}", run.lr)
    seen, loss_sum, stats = _reduce_train(dist, seen, loss_sum, stats)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        **({"first_loss": run.first_loss} if epoch == 0 else {}),
        **task.train_fields(stats, seen),
        "lr": run.lr,
        "img_per_s": seen / max(epoch_seconds, 1e-9),
        "seconds": epoch_seconds,
    }


def _backward(run: _Training, batch: Any, n_global: int, epoch: int, i: int,
              stats: dict[str, float]) -> tuple[float, int]:
    """Loss and backward for one local batch, stopping a diverged run before it steps; adds the
    batch's stats to ``stats`` and returns (loss, local samples)."""
    loss, n_local, batch_stats = run.task.loss(batch)
    loss_value = loss.item()
    if run.first_loss is None:
        run.first_loss = loss_value
    first_loss = run.first_loss
    if not math.isfinite(loss_value) or abs(loss_value) > DIVERGENCE_FACTOR * max(abs(first_loss), 1e-3):
        raise DivergedError(
            f"training diverged: loss is {loss_value:.4g} at epoch {epoch + 1}, step {i + 1} (the first "
            f"step's was {first_loss:.4g}; lr {run.lr:.3g}); lower the learning rate (--lr)"
        )
    share = n_local / n_global  # 1 in one process: this rank's part of the global batch
    scaled = (loss if share == 1 else loss * share) / run.cfg.accum_steps
    (scaled if run.scaler is None else run.scaler.scale(scaled)).backward()
    for k, v in batch_stats.items():
        stats[k] = stats.get(k, 0.0) + v
    return loss_value, n_local


def _evaluate_epoch(run: _Training, epoch: int, record: dict[str, Any], last: bool, evaluate_test: bool) -> None:
    """Validation when due (remembering the best epoch, on val only) and the labelled periodic
    test numbers nothing selects on; both go into ``record``."""
    task, cfg, primary = run.task, run.cfg, run.task.primary
    if task.has_split("val") and ((epoch + 1) % max(cfg.val_every, 1) == 0 or last):
        v = task.evaluate("val")
        record.update(task.metric_fields("val", v, final=False))
        if v[primary] > run.best["value"]:
            run.best = {"value": v[primary], "epoch": epoch + 1, "result": v,
                        "state": clone_tensors(task.state_dict()) if cfg.select == "best-val" else None}
    if evaluate_test and cfg.eval_test_every and (epoch + 1) % cfg.eval_test_every == 0 and task.has_split("test"):
        record[f"periodic_test_{primary}"] = task.evaluate("test")[primary]  # labelled; never selected on


def _checkpoint_due(cfg: TrainConfig, epoch: int, last: bool, stop_after_epoch: int | None) -> bool:
    """A checkpoint every ``checkpoint_every`` epochs, after the last, and where a test stops."""
    return bool((cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0) or last
                or stop_after_epoch == epoch + 1)


def _save(run: _Training, epoch: int) -> None:
    """Every rank's RNG state is gathered (a collective), rank 0 writes the checkpoint."""
    rngs = run.dist.gather(rng_state())
    if run.writes:
        save_checkpoint(run.out / CHECKPOINT, {
            "epoch": epoch, "task": clone_tensors(run.task.state_dict()), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rngs, "history": run.history, "best": run.best,
            "train_seconds": run.train_seconds, "config": config_fingerprint(run.config),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        })


def _select_and_test(run: _Training, evaluate_test: bool) -> dict[str, Any]:
    """The selected epoch's weights (last, or best on val), the one test evaluation, and the
    run's metrics."""
    task, cfg, best, primary = run.task, run.cfg, run.best, run.task.primary
    selected = cfg.epochs
    if cfg.select == "best-val" and best["state"] is not None:
        task.load_state_dict(best["state"], "best-val snapshot")
        selected = best["epoch"]
    task.set_mode(False)
    test = task.evaluate("test") if evaluate_test and task.has_split("test") else None
    val = None
    if task.has_split("val"):
        val = best["result"] if best["epoch"] == selected and best["result"] is not None else task.evaluate("val")
    metrics: dict[str, Any] = {
        "task": task.name,
        **task.describe(),
        "data": cfg.data,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "selected_epoch": selected,
        "selection": cfg.select,
        "lr": cfg.lr,
        "head_lr": cfg.head_lr if cfg.head_lr is not None else cfg.lr,
        "final_train_loss": run.history[-1]["train_loss"] if run.history else None,
        f"best_val_{primary}": best["value"] if best["epoch"] else None,
        "best_val_epoch": best["epoch"],
    }
    if val is not None:
        metrics.update(task.metric_fields("val", val, final=True))
    if test is not None:
        metrics.update(task.metric_fields("test", test, final=True))
    num_train = metrics.get("num_train", 0)
    metrics.update({
        "train_seconds": run.train_seconds,
        "train_img_per_s": num_train * cfg.epochs / max(run.train_seconds, 1e-9),
        "feature_cache_seconds": task.cache_seconds or None,
        "peak_memory_mb": peak_memory_mb(run.dist.device),
        **task.precision.fields(),
        "device": str(run.dist.device),
        "machine": machine_info(),
        "world_size": run.dist.world,
    })
    return metrics


def _reduce_train(dist: Dist, seen: int, loss_sum: float, stats: dict[str, float]) -> tuple[int, float, dict]:
    if not dist.enabled:
        return seen, loss_sum, stats
    parts = dist.gather((seen, loss_sum, stats))
    total: dict[str, float] = {}
    for _, _, s in parts:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    return sum(p[0] for p in parts), sum(p[1] for p in parts), total


def _each(cbs: Sequence[Callback], dist: Dist, call, collective: bool = True) -> None:
    """Run a callback point on this rank; an exception there stops every rank together.

    Callbacks run on rank 0 only (the loop gives other ranks none). When one raises (a pruner),
    rank 0 tells the others, which stop with :class:`StopFit` instead of waiting forever in the
    next collective.
    """
    error: BaseException | None = None
    try:
        for c in cbs:
            call(c)
    except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = err
    if collective and dist.enabled:
        stop = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if stop is not None and error is None:
            raise StopFit(f"stopped by rank 0 ({stop})")
    if error is not None:
        raise error
