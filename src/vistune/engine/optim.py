"""Optimiser and schedule: the parts every published PETuning recipe shares.

Weight decay is not applied to 1-D tensors (biases, norm scales, sparse deltas): decaying them
towards zero fights the very thing BitFit/SPT tune, and every reference recipe exempts them.
The schedule is linear warm-up from 0 then cosine to ``min_lr``, stepped per *iteration* so
short few-shot runs still get a smooth schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    *,
    head: Iterable[nn.Parameter] = (),
    head_lr: float | None = None,
) -> torch.optim.Optimizer:
    """One optimiser; ``head`` parameters may get their own learning rate.

    A fresh head starts from scratch while pre-trained modules (PVP) or pre-trained weights
    (``full``) want a small step, so the two rates are searched separately. The weight-decay rule
    (none on 1-D tensors) is the same for both.
    """
    params, head = list(params), list(head)
    if head_lr is None:
        params, head = params + head, []
    groups = param_groups(params, weight_decay)
    for group in param_groups(head, weight_decay):
        groups.append({**group, "lr": head_lr})
    if not groups:
        raise ValueError("nothing to optimise: the tuned model has no trainable parameters")
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=1e-8)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor: linear 0→1 over ``warmup_steps``, then cosine 1→``min_lr_ratio``."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    clip_grad: float | None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """End of an accumulation window: clip, step, advance the per-iteration schedule, clear grads.

    With an fp16 ``scaler`` the gradients are unscaled before clipping (the threshold is in true
    units) and a step whose gradients overflowed is skipped by the scaler, which then lowers its scale.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
