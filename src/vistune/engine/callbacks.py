"""Callbacks: what watches a run without changing it (logs, progress, pruning).

The loop calls every callback at fixed points with the same :class:`FitState`; a callback may
read anything, write files (rank 0 only: the loop gives non-main ranks no file-writing
callbacks), or stop the run by raising (an Optuna pruner raises ``optuna.TrialPruned``). Nothing
here may touch parameters, RNGs or data order — that is what keeps resume exact.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vistune.io import finite_json, write_error


@dataclass
class FitState:
    """What the loop knows at a callback point (read-only by convention)."""

    epochs: int
    steps_per_epoch: int
    primary: str  # the task's selection metric, e.g. "top1"
    epoch: int = 0  # 1-based number of the epoch in progress / just finished
    step: int = 0  # optimizer steps taken in this epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None


class Callback:
    def on_fit_start(self, state: FitState) -> None: ...

    def on_epoch_start(self, state: FitState, num_batches: int) -> None: ...

    def on_batch_end(self, state: FitState, loss: float, samples: int, lr: float) -> None: ...

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None: ...

    def on_fit_end(self, state: FitState, metrics: dict[str, Any]) -> None: ...

    def on_run_end(self, out: Path | None, error: BaseException | None) -> None:
        """After ``fit`` returned and its files are on disk (``error`` None), or after it raised.

        Not called by the loop (``on_fit_end`` comes before the files are written) but by the
        workflow around it, through :func:`ending`: the place for uploading the run's files and
        closing a tracking run with its real status.
        """


@contextmanager
def ending(callbacks: Sequence[Callback], out: Path | None) -> Iterator[None]:
    """Call every callback's ``on_run_end`` when the block (one ``fit``) ends, however it ends.

    On an error the callbacks are told and the error goes on unchanged (a callback's own failure
    then is swallowed: the run's error is the one to report).
    """
    try:
        yield
    except BaseException as err:
        for c in callbacks:
            try:
                c.on_run_end(out, err)
            except Exception:  # noqa: BLE001 - see above
                pass
        raise
    for c in callbacks:
        c.on_run_end(out, None)


class JsonlLog(Callback):
    """``OUT/log.jsonl``: one line per finished epoch.

    On resume the file is rewritten from the checkpoint's history first, so epochs that ran after
    the last checkpoint (and will run again) are never logged twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, state: FitState) -> None:
        lines = "".join(json.dumps(finite_json(r)) + "\n" for r in state.history)
        self._write(lines, "w")

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        self._write(json.dumps(finite_json(record)) + "\n", "a")

    def _write(self, text: str, mode: str) -> None:
        try:
            with open(self.path, mode) as f:
                f.write(text)
        except OSError as err:  # a full disk's write() error names no file: name it
            raise (write_error(err, self.path) or err) from None


class Progress(Callback):
    """A tqdm bar per epoch (loss, lr, img/s) and one summary line per epoch, all on stderr."""

    def __init__(self, label: str = "epoch") -> None:
        self.label = label
        self.bar: Any = None
        self.t0 = 0.0
        self.seen = 0

    def on_epoch_start(self, state: FitState, num_batches: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=num_batches, desc=f"{self.label} {state.epoch}/{state.epochs}", leave=False,
                        file=sys.stderr)
        self.t0, self.seen = time.perf_counter(), 0

    def on_batch_end(self, state: FitState, loss: float, samples: int, lr: float) -> None:
        self.seen += samples
        if self.bar is not None:
            self.bar.update(1)
            rate = self.seen / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        msg = f"{self.label} {record['epoch']}/{state.epochs} loss {record['train_loss']:.4f}"
        if "train_top1" in record:
            msg += f" train {record['train_top1']:.1f}%"
        key = f"val_{state.primary}"
        if key in record and record[key] is not None:
            msg += f" {key} {record[key]:.4g}"
        print(msg + f" ({record['img_per_s']:.1f} img/s)", file=sys.stderr)
