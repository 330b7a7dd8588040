"""Shared fixtures: tiny timm models with real shapes, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VISTUNE_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def shared_path(*parts: str) -> Path:
    """A path in ../shared, or skip the test with the reason (a user's clone has no shared/)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data/weights live in ../shared on the project's machines)")
    return path
