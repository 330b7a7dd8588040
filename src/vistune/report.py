"""Tables from run folders: every number a README or closing note shows is printed by this code
from the runs' own ``metrics.json``, never typed by hand."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vistune.errors import VistuneError
from vistune.precision import format_machine
from vistune.robustness.report import robustness_summary
from vistune.tasks import DEFAULT_TASK, get_task, task_names, task_of
from vistune.workflows.sweep import sweep_row

if TYPE_CHECKING:
    from vistune.tasks.base import Task

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


_NUMERIC = ("tuned_params", "head_params", "train_img_per_s", "train_seconds", "peak_memory_mb")


def _task_classes() -> list[type[Task]]:
    return [get_task(name) for name in task_names()]


def _metric_formats() -> dict[str, str]:
    """Each task kind's metric keys -> that kind's number format (declared on its class)."""
    return {key: t.metric_format for t in _task_classes()
            for key in (*t.metric_keys, *(k for k, _ in t.report_columns))}


def task_columns(rows: Sequence[dict[str, Any]], base: Sequence[tuple[str, str]] = DEFAULT_COLUMNS) -> tuple:
    """``base`` with its task-metric columns replaced by those of the task kinds the rows hold
    (classification's when all rows are classification runs, so such a table is unchanged)."""
    kinds = list(dict.fromkeys(task_of(r) for r in rows)) or [get_task(DEFAULT_TASK)]
    metric_keys = {k for t in _task_classes() for k, _ in t.report_columns}
    cols = [c for c in base if c[0] not in metric_keys]
    wanted = list(dict.fromkeys(c for t in kinds for c in t.report_columns))
    at = next((i for i, c in enumerate(base) if c[0] in metric_keys), len(cols))
    at = min(at, len(cols))
    return tuple(cols[:at] + wanted + cols[at:])


class ReportError(VistuneError, ValueError):
    """A metrics.json that is not one vistune wrote (not JSON, NaN values, wrong types)."""


def _refuse_constant(name: str) -> None:
    raise ReportError(name)


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """One run's metrics.json, refused with one line unless it is a strict-JSON object of a run.

    ``NaN``/``Infinity`` are not JSON; vistune never writes them (a diverging run stops without
    metrics), so a file holding them is damaged or from a broken run and must not become a
    normal-looking table row.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except ReportError as err:
        raise ReportError(f"{path} holds {err}, which is not a number in JSON (a diverged run or a damaged "
                          "file); leave it out of the report") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not JSON ({err})") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ReportError(f"{path} is not a vistune metrics.json (expected a JSON object with a 'method' key)")
    for key in (*_NUMERIC, *_metric_formats()):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ReportError(f"{path}: {key} is {value!r}, not a number")
    if data.get("options") is not None and not isinstance(data["options"], dict):
        raise ReportError(f"{path}: options is {data['options']!r}, not an object")
    return {**data, **robustness_summary(path.parent)}  # mCA / robust / OOD columns when the run has them


def load_metrics(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """metrics.json of run folders; a sweep folder gives one row (its retrained seeds' mean ± std).
    Paths without metrics are skipped (a run still in progress); a damaged file is refused.
    ``vistune report`` uses :func:`collect_rows`, which also says what it skipped and why."""
    rows = []
    for p in paths:
        row = _row_of(Path(p), sweep_row)
        if not isinstance(row, str):
            rows.append(row)
    return rows


def collect_rows(paths: Iterable[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(rows, skipped): a row per readable run or sweep, and ``(path, reason)`` for every path
    that gave none — absent, an empty folder, an unfinished run, a damaged file.

    Why not one error for all: a table of twenty runs must not be lost to one broken file, and a
    path that gives no row must not vanish silently (a typo would go unnoticed); the caller shows
    both.
    """
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        p = Path(p)
        try:
            row = _row_of(p, sweep_row)
        except ReportError as err:
            skipped.append((str(p), str(err).removeprefix(f"{p}: ").removeprefix(f"{p / 'metrics.json'}: ")))
            continue
        except OSError as err:
            skipped.append((str(p), f"cannot be read ({err.strerror or err})"))
            continue
        if isinstance(row, str):
            skipped.append((str(p), row))
        else:
            rows.append(row)
    return rows, skipped


def _row_of(p: Path, sweep_row: Any) -> dict[str, Any] | str:
    """One path's row, or the reason it has none."""
    if not p.exists():
        return "no such file or folder"
    if p.is_dir():
        try:
            row = sweep_row(p)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ReportError(f"{p / 'sweep.json'} is not a vistune sweep result ({err!r})") from None
        if row is not None:
            return row
        f = p / "metrics.json"
        if f.is_file():
            return read_metrics(f)
        names = {c.name for c in p.iterdir()} - {".vistune.lock"}
        if not names:
            return "empty folder"
        if names & {"checkpoint.pt", "log.jsonl", "study.journal"}:
            return "unfinished run (no metrics.json yet)"
        return "no metrics.json or sweep.json in this folder"
    return read_metrics(p)


def _fmt(key: str, value: Any, formats: dict[str, str]) -> str:
    if value is None:
        return "-"
    if key == "options":
        return ",".join(f"{k}={v}" for k, v in value.items() if k != "sensitivity") or "-"
    if isinstance(value, float):
        return format(value, formats.get(key, ".1f"))
    if isinstance(value, int) and key.endswith("params"):
        return f"{value:,}"
    return str(value)


def _cell(key: str, row: dict[str, Any], formats: dict[str, str]) -> str:
    text = _fmt(key, row.get(key), formats)
    std = row.get(f"{key}_std")
    if std is not None and row.get(key) is not None:
        # one seed has no spread to show: say so instead of printing a meaningless "± 0.00"
        n = row.get("seeds", "?")
        text += " (1 seed)" if n == 1 else f" ± {std:.2f} (n={n})"
    return text


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    formats = _metric_formats()
    body = ["| " + " | ".join(_cell(k, r, formats) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def machine_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Which machine and precision made the rows' numbers: one line per distinct pair, naming the
    rows when there are several (a table mixing an AVX2 fp32 run with a native-bf16 one says so)."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        line = format_machine(r.get("machine"), r.get("precision"))
        groups.setdefault(line, []).append(str(r.get("method", "?")))
    if len(groups) == 1:
        return list(groups)
    return [f"{line} (rows: {', '.join(methods)})" for line, methods in groups.items()]
