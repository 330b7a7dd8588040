"""Tables from run folders: every number a README or closing note shows is printed by this code
from the runs' own ``metrics.json``, never typed by hand."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_COLUMNS = (
    ("method", "method"),
    ("options", "options"),
    ("test_top1", "test top-1"),
    ("val_top1", "val top-1"),
    ("tuned_params", "tuned params"),
    ("head_params", "head"),
    ("train_img_per_s", "train img/s"),
    ("train_seconds", "train s"),
    ("peak_memory_mb", "peak MB"),
)


def load_metrics(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        p = Path(p)
        f = p / "metrics.json" if p.is_dir() else p
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "options":
        return ",".join(f"{k}={v}" for k, v in value.items() if k != "sensitivity") or "-"
    if isinstance(value, float):
        return f"{value:.1f}" if key not in ("test_top1", "val_top1") else f"{value:.2f}"
    if isinstance(value, int) and key.endswith("params"):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
