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
from pathlib import Path
from typing import Any

import torch

from vistune.config import TrainConfig
from vistune.engine.callbacks import Callback, FitState, JsonlLog, Progress
from vistune.engine.checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
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
    main = dist.is_main
    writes = main and out is not None
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
    if main and cfg.progress:
        print(f"vistune: {precision.line()}", file=sys.stderr)
    steps_per_epoch = math.ceil(task.num_train_batches() / cfg.accum_steps)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs,
                              int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.min_lr_ratio)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"value": -math.inf, "epoch": None, "result": None, "state": None}
    start_epoch = 0
    train_seconds = task.cache_seconds
    if ckpt is not None:
        task.load_state_dict(ckpt["task"], "checkpoint")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        if len(rngs) != dist.world and main:
            print(f"vistune: resuming with {dist.world} processes instead of {len(rngs)}: random streams "
                  "(dropout) differ from an uninterrupted run", file=sys.stderr)
        set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        start_epoch = int(ckpt["epoch"]) + 1
        train_seconds = float(ckpt["train_seconds"])

    cbs: list[Callback] = []
    if writes:
        cbs.append(JsonlLog(out / "log.jsonl"))
    if main and cfg.progress:
        cbs.append(Progress())
    cbs.extend(callbacks if main else [])
    primary = task.primary
    state = FitState(epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, primary=primary, history=history,
                     out=out, epoch=start_epoch)
    _each(cbs, dist, lambda c: c.on_fit_start(state))
    first_loss: float | None = history[0].get("first_loss") if history else None

    for epoch in range(start_epoch, cfg.epochs):
        state.epoch, state.step = epoch + 1, 0
        task.set_mode(True)
        batches = task.train_batches(epoch)
        n_batches = task.num_train_batches()
        _each(cbs, dist, lambda c: c.on_epoch_start(state, n_batches))
        t0 = time.perf_counter()
        seen, loss_sum, stats = 0, 0.0, {}
        optimizer.zero_grad(set_to_none=True)
        for i, (batch, n_global) in enumerate(batches):
            loss_value, n_local = math.nan, 0
            if batch is not None:
                loss, n_local, batch_stats = task.loss(batch)
                loss_value = loss.item()
                if first_loss is None:
                    first_loss = loss_value
                if not math.isfinite(loss_value) or abs(loss_value) > DIVERGENCE_FACTOR * max(abs(first_loss), 1e-3):
                    raise DivergedError(
                        f"training diverged: loss is {loss_value:.4g} at epoch {epoch + 1}, step {i + 1} (the first "
                        f"step's was {first_loss:.4g}; lr {scheduler.get_last_lr()[0]:.3g}); lower the learning rate (--lr)"
                    )
                share = n_local / n_global  # 1 in one process: this rank's part of the global batch
                scaled = (loss if share == 1 else loss * share) / cfg.accum_steps
                (scaled if scaler is None else scaler.scale(scaled)).backward()
                seen += n_local
                loss_sum += loss_value * n_local
                for k, v in batch_stats.items():
                    stats[k] = stats.get(k, 0.0) + v
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == n_batches:
                dist.reduce_gradients(params)
                apply_step(optimizer, scheduler, params, cfg.clip_grad, scaler)
                state.step += 1
            if batch is not None:
                _each(cbs, dist, lambda c: c.on_batch_end(state, loss_value, n_local, scheduler.get_last_lr()[0]),
                      collective=False)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        _check_finite_params(params, f"after epoch {epoch + 1}", scheduler.get_last_lr()[0])
        seen, loss_sum, stats = _reduce_train(dist, seen, loss_sum, stats)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            **({"first_loss": first_loss} if epoch == 0 else {}),
            **task.train_fields(stats, seen),
            "lr": scheduler.get_last_lr()[0],
            "img_per_s": seen / max(epoch_seconds, 1e-9),
            "seconds": epoch_seconds,
        }
        last = epoch + 1 == cfg.epochs
        if task.has_split("val") and ((epoch + 1) % max(cfg.val_every, 1) == 0 or last):
            v = task.evaluate("val")
            record.update(task.metric_fields("val", v, final=False))
            if v[primary] > best["value"]:
                best = {"value": v[primary], "epoch": epoch + 1, "result": v,
                        "state": clone_tensors(task.state_dict()) if cfg.select == "best-val" else None}
        if evaluate_test and cfg.eval_test_every and (epoch + 1) % cfg.eval_test_every == 0 and task.has_split("test"):
            record[f"periodic_test_{primary}"] = task.evaluate("test")[primary]  # labelled; never selected on
        history.append(record)
        state.history = history
        _each(cbs, dist, lambda c: c.on_epoch_end(state, record))
        due = (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0) or last or stop_after_epoch == epoch + 1
        if due and out is not None:
            rngs = dist.gather(rng_state())
            if writes:
                save_checkpoint(out / CHECKPOINT, {
                    "epoch": epoch, "task": clone_tensors(task.state_dict()), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs, "history": history, "best": best,
                    "train_seconds": train_seconds, "config": _resume_config(config),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                })
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            dist.barrier()
            return {"stopped_after_epoch": epoch + 1}

    # -- selection on val, then the one test evaluation -----------------------------------------
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
        "final_train_loss": history[-1]["train_loss"] if history else None,
        f"best_val_{primary}": best["value"] if best["epoch"] else None,
        "best_val_epoch": best["epoch"],
    }
    if val is not None:
        metrics.update(task.metric_fields("val", val, final=True))
    if test is not None:
        metrics.update(task.metric_fields("test", test, final=True))
    num_train = metrics.get("num_train", 0)
    metrics.update({
        "train_seconds": train_seconds,
        "train_img_per_s": num_train * cfg.epochs / max(train_seconds, 1e-9),
        "feature_cache_seconds": task.cache_seconds or None,
        "peak_memory_mb": peak_memory_mb(dist.device),
        **precision.fields(),
        "device": str(dist.device),
        "machine": machine_info(),
        "world_size": dist.world,
    })
    _each(cbs, dist, lambda c: c.on_fit_end(state, metrics))
    if writes:
        files = task.output_files({"config": config, "precision": precision.name, **(extra or {})})
        text = json_text(metrics)
        write_set_atomic(out, [*files, ("metrics.json", lambda tmp: tmp.write_text(text))])
    dist.barrier()
    return metrics


def _resume_config(config: dict[str, Any]) -> dict[str, Any]:
    from vistune.engine.checkpoint import config_fingerprint

    return config_fingerprint(config)


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
