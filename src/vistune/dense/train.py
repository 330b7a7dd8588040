"""Training and evaluation of dense heads on frozen, tuned backbones.

One loop for every method and both tasks, honest in the same ways as the classification engine:
the epoch whose weights are tested is chosen on the validation split only (``select``: last or
best-val), the test split is evaluated once at the end, and test numbers are computed in the
original images' coordinates (masks at their own resolution, boxes mapped back through the
letterbox) with reference metric code (:mod:`vistune.dense.metrics`).

Method ``linear`` trains the head alone on frozen features. The backbone then never changes, so
its features are computed once per image (and once more flipped when ``augment=flip``: a frozen
backbone in eval mode maps a flipped image to exactly the features it would compute each epoch)
and the epochs only run the head — the dense counterpart of the engine's feature cache.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vistune.backbones import backbone_info
from vistune.config import ConfigError, TrainConfig
from vistune.dense.datasets import DenseDataset, DenseSplits, collate, load_dense_data
from vistune.dense.metrics import DetectionMetric, SegmentationMetric
from vistune.dense.features import FeatureExtractor
from vistune.dense.heads import DenseHead
from vistune.dense.model import DenseModel, build_dense_model, head_config, load_dense, save_dense
from vistune.engine.optim import apply_step, build_optimizer, param_groups, warmup_cosine
from vistune.engine.trainer import (
    _write_json_atomic,
    peak_memory_mb,
    resolve_device,
    seed_everything,
    seeded_backbone,
)
from vistune.tuning import attach

TASKS = ("segment", "detect")
#: The metric each task selects epochs on (and reports first).
PRIMARY = {"segment": "miou", "detect": "map_50"}
#: Its name in log.jsonl and metrics.json.
VAL_KEY = {"segment": "val_miou", "detect": "val_map50"}


def _check(cfg: TrainConfig, task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"dense task must be one of {TASKS}, got {task!r}")
    cfg.validate()
    if cfg.shots is not None:
        raise ConfigError("shots (few-shot sampling) is defined for classification only, not for dense tasks")
    if cfg.init_from:
        raise ConfigError("init_from (PVP) is not supported for dense tasks yet")


def prepare_dense(cfg: TrainConfig, task: str, head_options: dict[str, Any] | None = None,
                  data: DenseSplits | None = None) -> tuple[DenseModel, DenseSplits, torch.device]:
    """Backbone -> data (letterboxed, normalised as the weights expect) -> method -> dense head."""
    _check(cfg, task)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    backbone = seeded_backbone(cfg.backbone, weights=cfg.weights, img_size=cfg.img_size)
    info = backbone_info(backbone)
    if data is None:
        data = load_dense_data(cfg.data, task, img_size=info.img_size, mean=info.mean, std=info.std,
                               augment=cfg.augment, max_per_split=cfg.max_per_split,
                               workers=max(1, cfg.num_workers) if cfg.num_workers else None)
    if cfg.trainval and data.val is not None:
        data.train = DenseDataset(data.train.samples + data.val.samples, task, info.mean, info.std,
                                  flip=data.train.flip)
        data.val = None
    options = {k: v for k, v in cfg.options.items() if k != "freeze_modules"}
    if cfg.method == "spt" and cfg.sensitivity:
        options.setdefault("sensitivity", cfg.sensitivity)
    if cfg.method == "spt" and "sensitivity" not in options:
        options["sensitivity"] = dense_sensitivity(cfg, task, backbone, data, device, head_options)
    seed_everything(cfg.seed)
    tuned = attach(backbone, cfg.method, **options)
    model = build_dense_model(tuned, task, data.num_classes, head_options)
    model.to(device)
    return model, data, device


def dense_sensitivity(cfg: TrainConfig, task: str, backbone: nn.Module, data: DenseSplits,
                      device: torch.device, head_options: dict[str, Any] | None = None,
                      num_batches: int = 16) -> str:
    """SPT's sensitivity scores measured with the *dense* loss; returns the scores file's path.

    SPT allocates its budget where the task's loss is sensitive, so the scores must come from
    the segmentation/detection loss, not a classification proxy. ``compute_sensitivity`` runs
    ``model(images)`` and needs a classifier; we give a throw-away copy of the backbone one (its
    logits enter the loss with weight 0), capture the level outputs during that same forward,
    and return the loss of a freshly initialised dense head on them — the dense analogue of the
    reference's fresh classification head. Batches: the first ``num_batches`` of the train split
    in file order, without flips. The file goes to ``cfg.sensitivity`` or
    ``OUT/sensitivity.safetensors``, and an existing file is reused.
    """
    from vistune.sensitivity import compute_sensitivity, save_scores

    path = Path(cfg.sensitivity) if cfg.sensitivity else Path(cfg.out) / "sensitivity.safetensors"
    if path.is_file():
        return str(path)
    probe = copy.deepcopy(backbone)
    probe.reset_classifier(data.num_classes)
    probe.to(device)
    head = DenseHead(head_config(probe, task, data.num_classes, head_options)).to(device)
    extractor = FeatureExtractor(probe, head.cfg.level_objs())
    current: dict[str, torch.Tensor] = {}
    plain = copy.copy(data.train)
    plain.flip = False

    def batches() -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
        for x, targets in _loader(plain, cfg.batch_size, False, 0):
            current["x"] = x.to(device)
            yield current["x"], targets

    num_batches = max(1, min(num_batches, math.ceil(len(plain) / cfg.batch_size)))
    t0 = time.perf_counter()
    with extractor.capture() as captured:
        def loss_fn(logits: torch.Tensor, targets: list[dict[str, Any]]) -> torch.Tensor:
            x = current["x"]
            out = head(extractor.maps(captured, x), tuple(x.shape[-2:]))
            return head.loss(out, targets) + 0.0 * logits.sum()

        scores = compute_sensitivity(probe, batches(), num_batches=num_batches, loss_fn=loss_fn)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_scores(path, scores, probe, {"batch_size": cfg.batch_size, "num_batches": num_batches,
                                      "seconds": seconds, "loss": f"dense-{task}"})
    del probe
    return str(path)


# ------------------------------------------------------------------------------------------
# Feature cache (method linear)


class FeatureCache:
    """Frozen-backbone features per (sample, flipped), computed once; the head trains on these."""

    def __init__(self, model: DenseModel, dataset: DenseDataset, device: torch.device, batch_size: int,
                 autocast: bool, flips: tuple[bool, ...]) -> None:
        self.store: dict[bool, list[torch.Tensor]] = {}
        model.eval()
        with torch.no_grad():
            for flipped in flips:
                per_level: list[list[torch.Tensor]] = []
                for start in range(0, len(dataset), batch_size):
                    idx = range(start, min(len(dataset), start + batch_size))
                    x = torch.stack([dataset.item(i, flipped)[0] for i in idx]).to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        feats = model.features(x)
                    per_level.append([f.float().cpu() for f in feats])
                self.store[flipped] = [torch.cat([b[lv] for b in per_level]) for lv in range(len(per_level[0]))]

    def gather(self, targets: list[dict[str, Any]], device: torch.device) -> list[torch.Tensor]:
        levels = len(next(iter(self.store.values())))
        return [torch.stack([self.store[t["flipped"]][lv][t["index"]] for t in targets]).to(device)
                for lv in range(levels)]


# ------------------------------------------------------------------------------------------
# Evaluation


def _loader(dataset: DenseDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate)


def _eval_batches(model: DenseModel, dataset: DenseDataset, batch_size: int, device: torch.device,
                  autocast: bool, cache: FeatureCache | None) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    plain = copy.copy(dataset)
    plain.flip = False
    for x, targets in _loader(plain, batch_size, False, 0):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            feats = cache.gather(targets, device) if cache is not None else model.features(x.to(device))
            out = model.head(feats, tuple(x.shape[-2:]))
        yield out, targets


def segmentation_to_original(logits: torch.Tensor, lb) -> torch.Tensor:
    """Canvas logits (K, S, S) -> label map (H, W) of the original image (crop, then resize)."""
    crop = logits[:, : lb.new_h, : lb.new_w].float()
    up = F.interpolate(crop[None], size=(lb.height, lb.width), mode="bilinear", align_corners=False)[0]
    return up.argmax(0)


@torch.no_grad()
def evaluate_split(model: DenseModel, dataset: DenseDataset, *, batch_size: int = 8,
                   device: torch.device | str = "cpu", autocast: bool = False,
                   cache: FeatureCache | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` in original-image coordinates (see module docstring)."""
    device = torch.device(device)
    model.eval()
    task, k = model.task, model.head.cfg.num_classes
    if task == "segment":
        seg = SegmentationMetric(k, model.head.cfg.ignore_index)
        for logits, targets in _eval_batches(model, dataset, batch_size, device, autocast, cache):
            for lg, t in zip(logits, targets):
                s = dataset.samples[t["index"]]
                seg.update(segmentation_to_original(lg, s.lb).cpu(), torch.from_numpy(s.orig_mask))
        return seg.compute()
    det = DetectionMetric(k)
    for out, targets in _eval_batches(model, dataset, batch_size, device, autocast, cache):
        dets = model.head.task_head.detections(out)
        preds, gts = [], []
        for d, t in zip(dets, targets):
            s = dataset.samples[t["index"]]
            preds.append({"boxes": s.lb.boxes_to_original(d["boxes"].cpu()), "scores": d["scores"].cpu(),
                          "labels": d["labels"].cpu()})
            gts.append({"boxes": torch.from_numpy(s.orig_boxes), "labels": torch.from_numpy(s.labels),
                        "iscrowd": torch.from_numpy(s.difficult.astype("int64"))})
        det.update(preds, gts)
    return det.compute()


# ------------------------------------------------------------------------------------------
# Training


def _clone_state(model: DenseModel) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "tuned": {k: v.detach().cpu().clone() for k, v in model.tuned.tuned_state_dict().items()},
        "head": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()},
    }


def _load_state(model: DenseModel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    from vistune.tuning import load_tensors

    load_tensors(model.tuned, state["tuned"], "best-val state")
    model.head.load_state_dict(state["head"])


def _prefixed(prefix: str, res: dict[str, Any], task: str) -> dict[str, Any]:
    if task == "segment":
        return {f"{prefix}_miou": res["miou"], f"{prefix}_per_class_iou": res["per_class_iou"],
                f"{prefix}_pixel_acc": res["pixel_acc"]}
    return {f"{prefix}_map50": res["map_50"], f"{prefix}_map": res["map"], f"{prefix}_map75": res["map_75"],
            f"{prefix}_per_class_ap": res["per_class_ap"]}


def _optimizer(model: DenseModel, cfg: TrainConfig, head_lr: float | None) -> torch.optim.Optimizer:
    """One optimiser; the head may get its own learning rate (it starts from scratch, while
    ``full`` fine-tuning wants a small one for the pre-trained weights). Same weight-decay rule
    (none on 1-D tensors) for both, via the engine's ``param_groups``."""
    method = [p for p in model.method_parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    if head_lr is None:
        return build_optimizer(method + head, cfg.optimizer, cfg.lr, cfg.wd, cfg.momentum)
    if not method:  # linear (or frozen modules): the head is all there is
        return build_optimizer(head, cfg.optimizer, head_lr, cfg.wd, cfg.momentum)
    opt = build_optimizer(method, cfg.optimizer, cfg.lr, cfg.wd, cfg.momentum)
    for group in param_groups(head, cfg.wd):
        opt.add_param_group({**group, "lr": head_lr})
    return opt


def train_dense(cfg: TrainConfig, task: str, *, head_options: dict[str, Any] | None = None,
                head_lr: float | None = None, data: DenseSplits | None = None) -> dict[str, Any]:
    """Train a dense head (+ the method's modules) for ``task`` (``segment`` | ``detect``).

    Reads these ``TrainConfig`` fields: backbone, weights, img_size, method, options, data,
    epochs, batch_size, lr, wd, optimizer, momentum, warmup_epochs, min_lr_ratio, clip_grad,
    accum_steps, precision, seed, out, progress, max_per_split, augment (``flip``), trainval,
    select, val_every, cache_features (linear), device. Writes to ``cfg.out``:
    ``tuned.safetensors`` (method tensors, spine format), ``dense_head.safetensors`` (head tensors
    and config), ``metrics.json``, ``splits.json``, ``log.jsonl``; returns the metrics dict.
    ``head_options`` go to :func:`vistune.dense.model.head_config`; ``head_lr`` (default
    ``cfg.lr``) is the head's learning rate; ``data`` lets tests and benchmarks reuse decoded data.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    model, data, device = prepare_dense(cfg, task, head_options, data)
    out.mkdir(parents=True, exist_ok=True)
    autocast = cfg.precision == "bf16"
    if cfg.options.get("freeze_modules") in (True, "true", "1", "yes"):
        for p in model.method_parameters():
            p.requires_grad_(False)
    if data.val is None and cfg.select == "best-val":
        raise ConfigError("select=best-val needs a validation split, and this data has none")

    t_start = time.perf_counter()
    use_cache = cfg.method == "linear" and cfg.cache_features
    train_cache = val_cache = None
    if use_cache:
        flips = (False, True) if data.train.flip else (False,)
        train_cache = FeatureCache(model, data.train, device, cfg.batch_size, autocast, flips)
        if data.val is not None:
            val_cache = FeatureCache(model, data.val, device, cfg.batch_size, autocast, (False,))
    cache_seconds = time.perf_counter() - t_start

    params = [p for p in model.trainable_parameters() if p.requires_grad]
    optimizer = _optimizer(model, cfg, head_lr)
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / cfg.batch_size) / cfg.accum_steps)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs,
                              int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.min_lr_ratio)
    primary = PRIMARY[task]
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"value": -1.0, "epoch": None, "state": None}
    train_seconds = cache_seconds
    log_path = out / "log.jsonl"
    log_path.unlink(missing_ok=True)

    for epoch in range(cfg.epochs):
        model.train()
        if use_cache:
            model.tuned.eval()
        loader = _loader(data.train, cfg.batch_size, True, cfg.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for i, (x, targets) in enumerate(bar):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                feats = train_cache.gather(targets, device) if use_cache else model.features(x.to(device))
                head_out = model.head(feats, tuple(x.shape[-2:]))
            loss = model.head.loss(head_out, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"dense loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; "
                                         "lower the learning rate")
            (loss / cfg.accum_steps).backward()
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
                apply_step(optimizer, scheduler, params, cfg.clip_grad)
            seen += len(targets)
            loss_sum += loss.item() * len(targets)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}")
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                  "lr": scheduler.get_last_lr()[0], "img_per_s": seen / max(epoch_seconds, 1e-9),
                                  "seconds": epoch_seconds}
        if data.val is not None and ((epoch + 1) % max(cfg.val_every, 1) == 0 or epoch + 1 == cfg.epochs):
            v = evaluate_split(model, data.val, batch_size=cfg.batch_size, device=device, autocast=autocast,
                               cache=val_cache)
            record[VAL_KEY[task]] = v[primary]
            if v[primary] > best["value"]:
                best = {"value": v[primary], "epoch": epoch + 1, "result": v,
                        "state": _clone_state(model) if cfg.select == "best-val" else None}
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.progress:
            msg = f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f}"
            if VAL_KEY[task] in record:
                msg += f" {VAL_KEY[task]} {record[VAL_KEY[task]]:.4f}"
            print(msg + f" ({record['img_per_s']:.1f} img/s)", file=sys.stderr)

    selected = cfg.epochs
    if cfg.select == "best-val" and best["state"] is not None:
        _load_state(model, best["state"])
        selected = best["epoch"]
    val_res = None
    if data.val is not None:
        val_res = best["result"] if best["epoch"] == selected else evaluate_split(
            model, data.val, batch_size=cfg.batch_size, device=device, autocast=autocast, cache=val_cache)
    test_res = (evaluate_split(model, data.test, batch_size=cfg.batch_size, device=device, autocast=autocast)
                if data.test is not None else None)

    report = model.tuned.parameter_report()
    head_params = sum(p.numel() for p in model.head.parameters())
    num_train = len(data.train)
    metrics: dict[str, Any] = {
        "task": task,
        "backbone": report["backbone"],
        "method": report["method"],
        "options": report["options"],
        "data": cfg.data,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "img_size": backbone_info(model.tuned.model).img_size,
        "selected_epoch": selected,
        "selection": cfg.select,
        "lr": cfg.lr,
        "head_lr": head_lr if head_lr is not None else cfg.lr,
        "final_train_loss": history[-1]["train_loss"] if history else None,
    }
    if val_res is not None:
        metrics.update(_prefixed("val", val_res, task))
    if test_res is not None:
        metrics.update(_prefixed("test", test_res, task))
    metrics.update({
        "class_names": list(data.class_names),
        "tuned_params": report["tuned_params"],
        "head_params": head_params,
        "trainable_params": report["tuned_params"] + head_params,
        "backbone_params": report["backbone_params"],
        "tuned_percent": report["tuned_percent"],
        "train_seconds": train_seconds,
        "train_img_per_s": num_train * cfg.epochs / max(train_seconds, 1e-9),
        "feature_cache_seconds": cache_seconds if use_cache else None,
        "peak_memory_mb": peak_memory_mb(device),
        "num_train": num_train,
        "num_val": len(data.val) if data.val is not None else 0,
        "num_test": len(data.test) if data.test is not None else 0,
        "num_classes": data.num_classes,
        "dropped_zero_area_boxes": data.info.get("dropped_zero_area_boxes", 0),
        "precision": cfg.precision,
        "device": str(device),
    })  # fmt: skip
    save_dense(model, out, extra={"config": cfg.to_dict(), "class_names": list(data.class_names),
                                  "data_info": data.info})
    _write_json_atomic(out / "splits.json", data.manifest())
    _write_json_atomic(out / "metrics.json", metrics)
    return metrics


def evaluate_dense(path: str, data_spec: str | None = None, split: str = "test", *, batch_size: int = 8,
                   device: str = "auto") -> dict[str, Any]:
    """Rebuild a dense run (folder or either of its files) and evaluate one split.

    The data spec, ``max_per_split`` and precision default to what the run recorded, so
    ``evaluate_dense(run)`` reproduces the run's test numbers.
    """
    dev = resolve_device(device)
    model, meta = load_dense(path, dev)
    saved = meta.get("config", {})
    spec = data_spec or saved.get("data")
    if not spec:
        raise ConfigError(f"{path}: no data spec given and the run does not record one")
    info = backbone_info(model.tuned.model)
    data = load_dense_data(spec, model.task, img_size=info.img_size, mean=info.mean, std=info.std,
                           max_per_split=saved.get("max_per_split"))
    dataset = {"train": data.train, "val": data.val, "test": data.test}.get(split)
    if dataset is None:
        raise ConfigError(f"data {spec!r} has no {split!r} split")
    if data.num_classes != model.head.cfg.num_classes:
        raise ConfigError(f"data {spec!r} has {data.num_classes} classes, the dense head {model.head.cfg.num_classes}")
    res = evaluate_split(model, dataset, batch_size=batch_size, device=dev,
                         autocast=saved.get("precision") == "bf16")
    return {**_prefixed(split, res, model.task), f"num_{split}": len(dataset), "task": model.task}
