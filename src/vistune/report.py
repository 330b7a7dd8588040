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
    """metrics.json of run folders; a sweep folder gives one row (its retrained seeds' mean ± std)."""
    from vistune.workflows.sweep import sweep_row

    rows = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and (row := sweep_row(p)) is not None:
            rows.append(row)
            continue
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


def _cell(key: str, row: dict[str, Any]) -> str:
    text = _fmt(key, row.get(key))
    std = row.get(f"{key}_std")
    if std is not None and row.get(key) is not None:
        text += f" ± {std:.2f} (n={row.get('seeds', '?')})"
    return text


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(k, r) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
