"""Checkpoints: what makes ``--resume`` reproduce an uninterrupted run bit for bit.

A checkpoint holds the task's trainable tensors (tuned tensors plus heads; never the frozen
backbone), the optimizer and scheduler state, every RNG a step can draw from (torch, numpy,
Python; one set per rank), the log so far, the best-on-val snapshot and the settings that must
not change across a resume. It is written atomically by rank 0 and read with
``weights_only=True`` (a checkpoint is a file a user may receive from someone else).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistune.config import ConfigError
from vistune.io import torch_save_atomic, unreadable_reason
from vistune.methods import get_method, parse_options

CHECKPOINT = "checkpoint.pt"
FORMAT = "vistune.checkpoint/2"

#: Run settings that may differ between an interrupted run and its resume.
RESUMABLE_KEYS = ("out", "progress", "num_workers", "device", "eval_test_every", "checkpoint_every",
                  "val_every", "overwrite", "data_root", "group_thresholds")


class CheckpointError(ConfigError):
    """A checkpoint is missing, corrupt, foreign, or was written with other settings."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate(tuple(py[:1]) + (tuple(py[1]),) + tuple(py[2:]))


def config_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one.

    Method options are compared as parsed values, so ``-o rank=2`` on the command line and
    ``rank: 2`` in a YAML file are the same setting.
    """
    out = {k: v for k, v in config.items() if k not in RESUMABLE_KEYS}
    try:
        opts = parse_options(get_method(out.get("method", "")), out.get("options") or {})
        out["options"] = json.loads(json.dumps(dataclasses.asdict(opts), default=str))
    except (ValueError, TypeError):
        pass  # an unknown method or bad options fail elsewhere with their own message
    return out


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    return torch_save_atomic({"format": FORMAT, **state}, path)


def load_checkpoint(path: str | os.PathLike, config: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and check it belongs to this run; every problem is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - arbitrary bytes: unpickling raises KeyError, IndexError, ...
        raise CheckpointError(
            f"--resume: {path} is not a readable vistune checkpoint ({unreadable_reason(err)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"--resume: {path} is not a vistune checkpoint (format {got!r}, expected {FORMAT!r})")
    want = config_fingerprint(config)
    if ckpt.get("config") != want:
        saved = ckpt.get("config") or {}
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise CheckpointError(f"--resume: checkpoint {path} was written with different settings: {diff}")
    return ckpt
