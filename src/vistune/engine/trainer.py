"""The training engine: one loop for every method, honest about what it measures.

Protocol rules enforced here (the research forks break each of them somewhere):
- the epoch whose weights are tested is chosen on the validation split only (``select``:
  the last epoch, as VPT reports, or the best validation epoch); the test split is evaluated
  once at the end, unless periodic test evaluation is asked for, and then every such number
  is labelled ``periodic_test`` in the log;
- checkpoints hold only the tuned tensors plus optimizer/scheduler/RNG state, written
  atomically, and resuming reproduces the uninterrupted run exactly (the data order is a
  function of (seed, epoch), not of how many epochs ran in this process);
- linear probing runs the frozen backbone once and trains the head on cached features.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vistune.backbones import backbone_info, classifier, create_backbone
from vistune.config import ConfigError, TrainConfig
from vistune.engine.evaluate import evaluate
from vistune.engine.optim import apply_step, build_optimizer, warmup_cosine
from vistune.tuning import TunedModel, attach

CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: GPU allocator peak on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


@dataclass
class Prepared:
    """Everything a run needs, built from a config (shared by train, pretrain and fewshot)."""

    tuned: TunedModel
    data: Any  # vistune.data.DataSplits
    device: torch.device


def build_backbone_for(cfg: TrainConfig) -> nn.Module:
    return seeded_backbone(cfg.backbone, weights=cfg.weights, img_size=cfg.img_size)


def seeded_backbone(name: str, weights: str | None, img_size: int | None) -> nn.Module:
    """Create a backbone under a fixed seed, whatever the run's seed.

    Only matters for randomly initialised backbones (tests, ablations): every run, seed and
    ``eval`` then sees the same backbone, so tuned files and PVP modules fit across seeds.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(name, weights=weights, img_size=img_size, num_classes=0)


def load_data_for(cfg: TrainConfig, model: nn.Module, spec: str | None = None):
    from vistune.data import load_data

    info = backbone_info(model)
    return load_data(
        spec or cfg.data,
        img_size=info.img_size,
        mean=info.mean,
        std=info.std,
        shots=cfg.shots,
        seed=cfg.seed,
        augment=cfg.augment,
        trainval=cfg.trainval,
        max_per_split=cfg.max_per_split,
    )


def prepare(cfg: TrainConfig, backbone: nn.Module | None = None, data: Any = None) -> Prepared:
    """Backbone → data (normalised as the weights expect) → method attached with a fresh head."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    backbone = backbone if backbone is not None else build_backbone_for(cfg)
    data = data if data is not None else load_data_for(cfg, backbone)
    options = dict(cfg.options)
    if cfg.sensitivity and cfg.method == "spt":
        options.setdefault("sensitivity", cfg.sensitivity)
    if cfg.method == "spt" and "sensitivity" not in options and not cfg.init_from:
        options["sensitivity"] = _spt_scores(cfg, backbone, data, device)
    seed_everything(cfg.seed)
    if cfg.init_from:
        from vistune.pvp import attach_from_pretrained

        from vistune.pvp import check_source_target_disjoint

        check_source_target_disjoint(cfg.init_from, data.test)
        tuned = attach_from_pretrained(backbone, cfg.method, cfg.init_from, data.num_classes,
                                       _transfer_options(options))
    else:
        tuned = attach(backbone, cfg.method, num_classes=data.num_classes, **_transfer_options(options))
    tuned.to(device)
    return Prepared(tuned=tuned, data=data, device=device)


def _transfer_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options that steer the engine rather than the method are removed before attach."""
    return {k: v for k, v in options.items() if k != "freeze_modules"}


def _spt_scores(cfg: TrainConfig, backbone: nn.Module, data: Any, device: torch.device) -> str:
    """SPT needs sensitivity scores; compute them on the training split when no file is given."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(cfg.sensitivity) if cfg.sensitivity else out / "sensitivity.safetensors"
    if not path.is_file():
        write_sensitivity(backbone, data, device, path, data_spec=cfg.data)
    return str(path)


def write_sensitivity(backbone: nn.Module, data: Any, device: torch.device, path: str | os.PathLike,
                      batch_size: int = 32, num_batches: int = 16, data_spec: str = "") -> dict[str, Any]:
    """SPT's sensitivity pass on the first ``num_batches`` unshuffled training batches, saved to ``path``.

    Runs on a copy of the backbone with a fresh head for the task's classes, so the caller's
    model is untouched. Returns the metadata written beside the scores (incl. the seconds taken).
    """
    import copy

    from vistune.sensitivity import compute_sensitivity, save_scores

    probe = copy.deepcopy(backbone)
    probe.reset_classifier(data.num_classes)
    probe.to(device)
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=False)
    used = min(num_batches, len(loader))
    t0 = time.perf_counter()
    scores = compute_sensitivity(probe, ((x.to(device), y.to(device)) for x, y in loader), num_batches=num_batches)
    meta = {"batch_size": batch_size, "num_batches": used, "data": data_spec,
            "seconds": time.perf_counter() - t0}
    save_scores(path, scores, probe, meta)
    del probe
    return meta


def _loader(dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers)


@torch.no_grad()
def _cache_features(tuned: TunedModel, dataset, device: torch.device, batch_size: int, autocast: bool,
                    progress: bool, label: str) -> TensorDataset:
    from tqdm.auto import tqdm

    tuned.eval()
    feats, labels = [], []
    loader = _loader(dataset, batch_size, False, 0)
    for x, y in tqdm(loader, desc=f"features {label}", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            f = tuned.forward_features(x.to(device))
        feats.append(f.float().cpu())
        labels.append(y)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))


def _config_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    d = cfg.to_dict()
    for k in ("out", "progress", "num_workers", "device", "eval_test_every", "checkpoint_every", "val_every"):
        d.pop(k, None)
    return d


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_epoch: int | None = None,
          prepared: Prepared | None = None) -> dict[str, Any]:
    """Train, select on val, test once, write ``tuned.safetensors`` + ``metrics.json`` to ``cfg.out``.

    ``stop_after_epoch`` ends the process early after writing the checkpoint (tests use it to
    simulate an interrupted run).
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config"] != _config_fingerprint(cfg):
            diff = sorted(k for k in ckpt["config"] if ckpt["config"][k] != _config_fingerprint(cfg).get(k))
            raise ConfigError(f"--resume: checkpoint {ckpt_path} was written with different settings: {diff}")

    p = prepared or prepare(cfg)
    tuned, data, device = p.tuned, p.data, p.device
    autocast = cfg.precision == "bf16"
    if cfg.options.get("freeze_modules") in (True, "true", "1", "yes"):
        for prm in tuned.tuned_parameters(include_head=False):
            prm.requires_grad_(False)
    if data.val is None and cfg.select == "best-val":
        raise ConfigError("select=best-val needs a validation split, and this data has none (trainval?)")

    t_start = time.perf_counter()
    use_cache = cfg.method == "linear" and cfg.cache_features and not cfg.augment
    if use_cache:
        train_set = _cache_features(tuned, data.train, device, cfg.batch_size, autocast, cfg.progress, "train")
        val_set = _cache_features(tuned, data.val, device, cfg.batch_size, autocast, cfg.progress, "val") if data.val is not None else None
        head = classifier(tuned.model)
        forward = head
    else:
        train_set, val_set = data.train, data.val
        forward = tuned
    cache_seconds = time.perf_counter() - t_start

    params = [prm for prm in tuned.parameters() if prm.requires_grad]
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.wd, cfg.momentum)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / cfg.batch_size) / cfg.accum_steps)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs, int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.min_lr_ratio)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_top1": -1.0, "epoch": None, "state": None}
    start_epoch = 0
    train_seconds = cache_seconds
    if ckpt is not None:
        _load_tuned_state(tuned, ckpt["tuned"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best = {"val_top1": ckpt["best"]["val_top1"], "epoch": ckpt["best"]["epoch"], "state": ckpt["best"].get("state")}
        start_epoch = int(ckpt["epoch"]) + 1
        train_seconds = float(ckpt["train_seconds"])

    log_path = out / "log.jsonl"
    if ckpt is None and log_path.exists():
        log_path.unlink()
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, cfg.epochs):
        tuned.train()
        if use_cache:
            tuned.eval()  # the backbone isn't run; keep everything deterministic
        loader = _loader(train_set, cfg.batch_size, True, cfg.seed * 100_003 + epoch, cfg.num_workers)
        t0 = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = forward(x)
            loss = loss_fn(logits.float(), y)
            (loss / cfg.accum_steps).backward()
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
                apply_step(optimizer, scheduler, params, cfg.clip_grad)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}")
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1),
            "lr": scheduler.get_last_lr()[0],
            "img_per_s": seen / max(epoch_seconds, 1e-9),
            "seconds": epoch_seconds,
        }
        eval_forward = forward if use_cache else tuned
        if val_set is not None and ((epoch + 1) % max(cfg.val_every, 1) == 0 or epoch + 1 == cfg.epochs):
            tuned.eval()
            v = evaluate(eval_forward, _loader(val_set, cfg.batch_size, False, 0), data.num_classes, device, autocast)
            record.update(val_top1=v["top1"], val_loss=v["loss"])
            if v["top1"] > best["val_top1"]:
                best = {"val_top1": v["top1"], "epoch": epoch + 1,
                        "state": _clone_state(tuned) if cfg.select == "best-val" else None}
        if cfg.eval_test_every and (epoch + 1) % cfg.eval_test_every == 0 and data.test is not None:
            t = _evaluate_split(tuned, data.test, cfg, device, autocast, use_cache)
            record["periodic_test_top1"] = t["top1"]  # labelled: never used for selection
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.progress:
            msg = f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} train {record['train_top1']:.1f}%"
            if "val_top1" in record:
                msg += f" val {record['val_top1']:.1f}%"
            print(msg + f" ({record['img_per_s']:.0f} img/s)", file=sys.stderr)
        last = epoch + 1 == cfg.epochs
        if (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0) or last or stop_after_epoch == epoch + 1:
            _torch_save_atomic(
                {
                    "epoch": epoch,
                    "tuned": _clone_state(tuned),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "history": history,
                    "best": best,
                    "train_seconds": train_seconds,
                    "config": _config_fingerprint(cfg),
                },
                ckpt_path,
            )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            return {"stopped_after_epoch": epoch + 1}

    # -- selection on val, then the one test evaluation --------------------------------------
    selected_epoch = cfg.epochs
    if cfg.select == "best-val" and best["state"] is not None:
        _load_tuned_state(tuned, best["state"])
        selected_epoch = best["epoch"]
    tuned.eval()
    test = _evaluate_split(tuned, data.test, cfg, device, autocast, use_cache) if data.test is not None else None
    if data.val is None:
        val_final = None
    elif selected_epoch == cfg.epochs and "val_top1" in history[-1]:
        val_final = {"top1": history[-1]["val_top1"], "loss": history[-1]["val_loss"]}  # already measured
    else:
        val_final = _evaluate_split(tuned, data.val, cfg, device, autocast, use_cache)

    report = tuned.parameter_report()
    num_train = len(data.train)
    metrics = {
        "backbone": report["backbone"],
        "method": report["method"],
        "options": report["options"],
        "data": cfg.data,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "selected_epoch": selected_epoch,
        "selection": cfg.select,
        "val_top1": val_final["top1"] if val_final else None,
        "val_loss": val_final["loss"] if val_final else None,
        "best_val_top1": best["val_top1"] if best["epoch"] else None,
        "best_val_epoch": best["epoch"],
        "test_top1": test["top1"] if test else None,
        "test_loss": test["loss"] if test else None,
        "test_per_class_top1": test["per_class_top1"] if test else None,
        "train_seconds": train_seconds,
        "train_img_per_s": num_train * cfg.epochs / max(train_seconds, 1e-9),
        "feature_cache_seconds": cache_seconds if use_cache else None,
        "peak_memory_mb": peak_memory_mb(device),
        "tuned_params": report["tuned_params"],
        "head_params": report["head_params"],
        "backbone_params": report["backbone_params"],
        "tuned_percent": report["tuned_percent"],
        "num_train": num_train,
        "num_val": len(data.val) if data.val is not None else 0,
        "num_test": len(data.test) if data.test is not None else 0,
        "num_classes": data.num_classes,
        "skipped_images": len(data.skipped),
        "precision": cfg.precision,
        "device": str(device),
        "img_size": backbone_info(tuned.model).img_size,
    }
    extra = {"config": cfg.to_dict(), "class_names": list(data.class_names)}
    tuned.save_tuned(out / "tuned.safetensors", extra=extra)
    _write_json_atomic(out / "splits.json", data.manifest())
    _write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _evaluate_split(tuned: TunedModel, dataset, cfg: TrainConfig, device, autocast: bool, use_cache: bool) -> dict:
    if use_cache:
        feats = _cache_features(tuned, dataset, device, cfg.batch_size, autocast, cfg.progress, "eval")
        return evaluate(classifier(tuned.model), _loader(feats, cfg.batch_size, False, 0),
                        tuned.num_classes, device, autocast)
    tuned.eval()
    return evaluate(tuned, _loader(dataset, cfg.batch_size, False, 0), tuned.num_classes, device, autocast)


def _clone_state(tuned: TunedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in tuned.tuned_state_dict().items()}


def _load_tuned_state(tuned: TunedModel, state: dict[str, torch.Tensor]) -> None:
    from vistune.tuning import load_tensors

    load_tensors(tuned, state, "checkpoint")


def evaluate_file(tuned_path: str | os.PathLike, data_spec: str | None = None, split: str = "test",
                  batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Rebuild the backbone a tuned file names, load it, and evaluate a split of ``data_spec``."""
    from vistune.data import load_data
    from vistune.tuning import load_tuned, read_tuned_file

    meta, _ = read_tuned_file(tuned_path)
    bb = meta["backbone"]
    cfg_saved = (meta.get("extra") or {}).get("config", {})
    model = seeded_backbone(bb["name"], bb["weights"] if bb["weights"] != bb["name"] else None, bb["img_size"])
    tuned = load_tuned(tuned_path, model)
    dev = resolve_device(device)
    tuned.to(dev).eval()
    spec = data_spec or cfg_saved.get("data")
    if not spec:
        raise ConfigError(f"{tuned_path}: no --data given and the file does not record its data spec")
    data = load_data(spec, img_size=bb["img_size"], mean=tuple(bb["mean"]), std=tuple(bb["std"]),
                     seed=int(cfg_saved.get("seed", 0)), trainval=bool(cfg_saved.get("trainval", False)),
                     max_per_split=cfg_saved.get("max_per_split"))
    dataset = getattr(data, split)
    if dataset is None:
        raise ConfigError(f"data {spec!r} has no {split} split")
    if data.num_classes != tuned.num_classes:
        raise ConfigError(f"data {spec!r} has {data.num_classes} classes, the tuned file {tuned.num_classes}")
    res = evaluate(tuned, _loader(dataset, batch_size, False, 0), tuned.num_classes, dev,
                   cfg_saved.get("precision") == "bf16")
    return {f"{split}_top1": res["top1"], f"{split}_loss": res["loss"], f"num_{split}": res["num"],
            f"{split}_per_class_top1": res["per_class_top1"]}
