"""Shared fixtures: tiny timm models with real shapes, deterministic seeds."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The suite is the CPU suite (CI has no GPU): with a GPU visible, ``--device auto`` and
# ``--precision auto`` would move runs there and the CPU-specific assertions (fp32 on an emulating
# CPU, bit-equal references) would test something else. Hidden before torch starts, and for the
# subprocesses tests start; the CUDA paths are checked by benchmarks/cuda_check.py on a GPU machine.
# VISTUNE_TEST_CUDA=1 leaves the GPU visible.
if os.environ.get("VISTUNE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch

# One torch thread per pytest-xdist worker (``make test`` runs one worker per core), so the workers
# together use the cores once instead of oversubscribing them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VISTUNE_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ``--precision auto`` means bf16 on a CPU with AVX512-BF16/AMX and fp32 elsewhere; the suite computes
# the same numbers on both kinds of machine by treating every CPU as emulating bf16 — set before any
# fixture (module-scoped ones build models too) and inherited by the subprocesses tests start. Tests
# of ``auto`` itself override it with monkeypatch.
os.environ["VISTUNE_CPU_BF16"] = "0"

# torch.compile's on-disk cache (inductor) does not key its kernels by the ATen CPU capability:
# kernels cached by a run under one capability and reused under another gave NaN losses or a
# SIGABRT (measured: a suite with ATEN_CPU_CAPABILITY=avx2 after one without). One cache folder
# per capability keeps the warm cache and never mixes them (an explicit setting wins).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(
    Path(tempfile.gettempdir()) / f"torchinductor_vistune_tests_{torch.backends.cpu.get_cpu_capability()}"))


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread buys nothing, and on a busy 2-core machine its
    OpenMP spin-waits make each small op up to 100x slower (~50 ms for a 64-channel 8x8 conv
    instead of 0.5 ms). Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``;
    the count is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_path(*parts: str) -> Path:
    """A path in ../shared, or skip the test with the reason (a user's clone has no shared/)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data/weights live in ../shared on the project's machines)")
    return path
