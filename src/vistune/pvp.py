"""PVP: pre-trained visual parameter-efficient tuning.

Stage 1 trains a method's modules on source data with the backbone frozen; stage 2 starts
downstream (few-shot) tuning from those modules instead of from their random/zero init. The
module file is the spine's tuned-file format, so the same checks apply: the backbone
fingerprint must match, the method must match, and every module tensor must have the shape
the target expects. The head never transfers (the target has other classes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from vistune.errors import TunedFileError
from vistune.tuning import MethodSpec, TunedModel, attach, check_backbone, fingerprint, load_tensors, read_tuned_file


def attach_from_pretrained(
    backbone: nn.Module,
    method: str,
    path: str | os.PathLike,
    num_classes: int,
    options: dict[str, Any] | None = None,
) -> TunedModel:
    """Attach ``method`` to ``backbone`` with its modules initialised from the file at ``path``.

    Options recorded in the file define the module shapes; options given here may only repeat
    them (a different rank or prompt length would not fit the pre-trained tensors and is refused
    with the offending key named). The head is new, for ``num_classes``.
    """
    meta, tensors = read_tuned_file(path)
    fp = fingerprint(backbone)
    check_backbone(path, meta, backbone, fp)
    file_spec = MethodSpec.from_dict(meta["method"])
    if file_spec.name != method:
        raise TunedFileError(
            f"--init-from {path}: the file holds {file_spec.name!r} modules, but the method is {method!r}"
        )
    attached = attach(backbone, MethodSpec(method, {**file_spec.options, **(options or {})}),
                      num_classes=num_classes, state=tensors, base_fingerprint=fp)
    for key, value in file_spec.options.items():
        mine = attached.spec.options.get(key)
        if mine != value:
            raise TunedFileError(
                f"--init-from {path}: option {key}={mine!r} differs from the pre-trained modules' "
                f"{key}={value!r}"
            )
    load_tensors(attached, tensors, path, include_head=False)
    return attached


# ---------------------------------------------------------------------------------------------
# Stage 1: pre-train the modules on one or several source datasets.


def image_hashes(dataset, limit: int | None = None) -> list[str]:
    """Short content hashes of a split's decoded images (same backbone ⇒ same resolution), used
    to prove that no source image is a target test image."""
    import hashlib

    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [hashlib.sha1(dataset.uint8(i).contiguous().numpy().tobytes()).hexdigest()[:16] for i in range(n)]


def check_source_target_disjoint(module_file: str | os.PathLike, target_test) -> None:
    """Refuse to use modules pre-trained on images that are in the target's test split."""
    meta, _ = read_tuned_file(module_file)
    recorded = ((meta.get("extra") or {}).get("pretrain") or {}).get("source_image_hashes")
    if not recorded or target_test is None:
        return
    overlap = set(recorded) & set(image_hashes(target_test))
    if overlap:
        raise TunedFileError(
            f"--init-from {module_file}: {len(overlap)} of the target's test images were in the source "
            "data the modules were pre-trained on; pre-train on data without the target's test split"
        )


def pretrain(cfg, sources: list[str], out: str | os.PathLike) -> dict[str, Any]:
    """Train ``cfg.method``'s modules on ``sources`` (backbone frozen), one head per source.

    The modules are shared by all sources; each source has its own head and its batches are
    interleaved round-robin. Writes ``modules.safetensors`` (the spine's format: module tensors
    plus source 0's head), ``heads.safetensors`` (all heads, for inspection) and ``metrics.json``.
    """
    import json
    import math
    import time
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from vistune.backbones import classifier
    from vistune.config import ConfigError
    from vistune.engine.evaluate import evaluate
    from vistune.engine.optim import apply_step, build_optimizer, warmup_cosine
    from vistune.engine.trainer import (
        _loader,
        _spt_scores,
        _write_json_atomic,
        build_backbone_for,
        load_data_for,
        resolve_device,
        seed_everything,
    )

    if cfg.method in ("linear", "full"):
        raise ConfigError(f"pretrain needs a method with modules to transfer; {cfg.method!r} has none "
                          "(use vpt, lora, adapter, spt, protuning or bitfit)")
    if not sources:
        raise ConfigError("pretrain needs at least one --data source")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    backbone = build_backbone_for(cfg)
    datas = [load_data_for(dataclasses.replace(cfg, shots=None), backbone, s) for s in sources]
    options = dict(cfg.options)
    options.pop("freeze_modules", None)
    if cfg.method == "spt" and "sensitivity" not in options:
        options["sensitivity"] = _spt_scores(cfg, backbone, datas[0], device)
    seed_everything(cfg.seed)
    tuned = attach(backbone, cfg.method, num_classes=datas[0].num_classes, **options)
    width = int(getattr(tuned.model, "num_features", classifier(tuned.model).in_features))
    extra_heads = nn.ModuleList(nn.Linear(width, d.num_classes) for d in datas[1:])
    tuned.to(device)
    extra_heads.to(device)
    heads = [classifier(tuned.model), *extra_heads]
    params = [p for p in tuned.parameters() if p.requires_grad] + list(extra_heads.parameters())
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.wd, cfg.momentum)
    per_epoch = sum(math.ceil(len(d.train) / cfg.batch_size) for d in datas)
    scheduler = warmup_cosine(optimizer, per_epoch * cfg.epochs, int(cfg.warmup_epochs * per_epoch), cfg.min_lr_ratio)
    loss_fn = nn.CrossEntropyLoss()
    autocast = cfg.precision == "bf16"
    history = []
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        tuned.train()
        iters = [iter(_loader(d.train, cfg.batch_size, True, cfg.seed * 100_003 + epoch * 31 + i))
                 for i, d in enumerate(datas)]
        active = list(range(len(datas)))
        loss_sum, seen = 0.0, 0
        while active:
            for i in list(active):
                batch = next(iters[i], None)
                if batch is None:
                    active.remove(i)
                    continue
                x, y = batch[0].to(device), batch[1].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = heads[i](tuned.forward_features(x))
                loss = loss_fn(logits.float(), y)
                loss.backward()
                apply_step(optimizer, scheduler, params, cfg.clip_grad)
                loss_sum += loss.item() * len(y)
                seen += len(y)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1)})
        if cfg.progress:
            print(f"pretrain epoch {epoch + 1}/{cfg.epochs} loss {history[-1]['train_loss']:.4f}")
    seconds = time.perf_counter() - t_start
    tuned.eval()
    per_source = []
    for i, (spec, d) in enumerate(zip(sources, datas)):
        split = d.val if d.val is not None else d.test
        res = None
        if split is not None:
            res = evaluate(lambda x, i=i: heads[i](tuned.forward_features(x)),
                           _loader(split, cfg.batch_size, False, 0), d.num_classes, device, autocast)
        per_source.append({"data": spec, "num_train": len(d.train), "num_classes": d.num_classes,
                           "eval_split": "val" if d.val is not None else "test",
                           "eval_top1": None if res is None else res["top1"]})
    hashes = sorted({h for d in datas for part in (d.train, d.val) if part is not None for h in image_hashes(part)})
    extra = {"config": cfg.to_dict(), "pretrain": {"sources": per_source, "source_image_hashes": hashes}}
    tuned.save_tuned(out / "modules.safetensors", extra=extra)
    head_tensors = {f"source{i}.{k}": v.detach().cpu().contiguous() for i, h in enumerate(heads)
                    for k, v in h.state_dict().items()}
    save_file(head_tensors, str(out / "heads.safetensors"),
              metadata={"sources": json.dumps(sources)})
    report = tuned.parameter_report()
    metrics = {"method": cfg.method, "options": report["options"], "sources": per_source,
               "tuned_params": report["tuned_params"], "train_seconds": seconds, "history": history,
               "modules_file": str(out / "modules.safetensors")}
    _write_json_atomic(out / "metrics.json", metrics)
    return metrics
