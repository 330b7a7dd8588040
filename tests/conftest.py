"""Shared fixtures: tiny timm models with real shapes, deterministic seeds."""

from __future__ import annotations

import io
import os
import runpy
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
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


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str


def run_script(path: str | os.PathLike, *args: object) -> ScriptRun:
    """Run a benchmark script as ``__main__`` in this process, as ``python path args...`` would.

    Why not a subprocess: the scripts' tests check that they run end to end and print what they
    should; a fresh interpreter adds nothing to that but a second import of torch and timm
    (5-6 s on the 2-core AVX2 CPU, per script). What the script changes in the process is
    put back: argv, sys.path, torch's thread count; a test that needs a clean process (signals,
    exit codes of a real ``vistune`` process, fresh plugin registries) still starts one."""
    saved_argv, saved_path, threads = sys.argv, list(sys.path), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [str(path), *(str(a) for a in args)]
    code: object = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as stop:
                code = stop.code
                if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
                    print(code, file=sys.stderr)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(threads)
    returncode = 0 if code is None else code if isinstance(code, int) else 1
    return ScriptRun(returncode, out.getvalue(), err.getvalue())
