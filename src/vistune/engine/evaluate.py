"""Evaluation: top-1, per-class accuracy and loss, computed the same way for every split."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device,
    autocast: bool = False,
) -> dict:
    """Accuracy metrics over ``batches``; ``forward`` maps inputs (images or cached features) to logits."""
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = forward(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(dim=1)
        y_cpu, hit = y.cpu(), (pred == y).cpu()
        total += torch.bincount(y_cpu, minlength=num_classes)
        correct += torch.bincount(y_cpu[hit], minlength=num_classes)
        n += len(y)
    per_class = [(c / t).item() if t > 0 else None for c, t in zip(correct, total)]
    return {
        "top1": 100.0 * correct.sum().item() / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "per_class_top1": [None if v is None else 100.0 * v for v in per_class],
        "num": n,
    }
