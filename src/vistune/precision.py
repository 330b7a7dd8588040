"""Numeric precision of a run: ``auto`` picks bf16 autocast only where the hardware runs it natively.

Why this exists: bf16 autocast is ~2.6x *faster* than fp32 on a CPU with AVX512-BF16 or AMX, and
~7x *slower* on one without (AVX2 only: PyTorch then emulates bf16 arithmetic with conversions).
A hard-coded ``bf16`` made the demo crawl on ordinary cloud CPUs without saying why, so the
default is ``auto``: bf16 where it is native (CUDA with bf16 support; a CPU reporting AVX512-BF16
or AMX), fp32 everywhere else. The resolved choice and the reason are written to ``metrics.json``
and printed once at the start of a run, so a number always says how it was computed.

``torch.backends.cpu.get_cpu_capability()`` names only the vector ISA ATen dispatches to
(``DEFAULT``, ``AVX2``, ``AVX512``, ...); it has no bf16 entry (an AVX512 CPU may lack the bf16
instructions, as Skylake-X does). The bf16 check therefore asks the CPU's feature flags through
``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` (cpuinfo), and falls back
to ``/proc/cpuinfo`` where those private helpers are missing.

This module is a leaf (torch only), so tasks, the engine, serving and benchmarks all resolve
precision the same way without import cycles.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vistune.config import PRECISIONS, ConfigError

#: Measured on a 2-core AVX2-only AMD EPYC (DINOv2-S @56 px, batch 32, forward, one thread):
#: fp32 459 ms, bf16 3,263 ms. Quoted in the one-line warning an emulated bf16 run prints.
EMULATED_BF16_SLOWDOWN = 7


#: Set to 1 or 0 to say whether this CPU runs bf16 natively, overriding its feature flags.
CPU_BF16_ENV = "VISTUNE_CPU_BF16"


class PrecisionError(ConfigError):
    """A precision this device cannot run (fp16 without CUDA) or an unknown name."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what runs (``name``), what was asked (``requested``) and why."""

    name: str  # fp32 | bf16 | fp16
    requested: str  # what the user or config asked: auto | fp32 | bf16 | fp16
    reason: str
    native: bool = True  # False: bf16 asked for explicitly on a CPU that emulates it

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None for fp32: no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Autocast for forward passes (losses are computed in fp32 outside it by the tasks)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(device_type) if self.name == "fp16" else None

    def fields(self) -> dict[str, Any]:
        """What ``metrics.json`` records about precision."""
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}

    def line(self) -> str:
        """The run's first log line about precision."""
        return f"precision {self.name} ({self.reason})"


def cpu_features() -> set[str]:
    """The CPU's bf16-relevant features: a subset of {"AVX512_BF16", "AMX"}."""
    found: set[str] = set()
    checks = (("AVX512_BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
    helpers = [getattr(torch.cpu, fn, None) for _, fn in checks]
    if all(callable(h) for h in helpers):
        for (name, _), helper in zip(checks, helpers):
            with contextlib.suppress(Exception):
                if helper():
                    found.add(name)
        return found
    flags = set((_cpuinfo("flags") or "").split())
    if "avx512_bf16" in flags:
        found.add("AVX512_BF16")
    if "amx_bf16" in flags or "amx_tile" in flags:
        found.add("AMX")
    return found


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_capability() -> str:
    """ATen's CPU vector ISA (``AVX2``, ``AVX512``, ...), as every timing line prints it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - very old torch: the line still says something
        return "unknown"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 autocast natively, and a short why."""
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CUDA"
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        cap = cpu_capability()
        forced = os.environ.get(CPU_BF16_ENV, "").strip()
        if forced in ("0", "1"):  # the user's word over the feature flags (also keeps tests machine-independent)
            return forced == "1", f"CPU {cap}, {CPU_BF16_ENV}={forced}"
        feats = cpu_features()
        if feats and not cap.startswith("AVX512"):
            # ATen dispatches AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, or an old build): its bf16
            # ops are emulated whatever the CPU has (measured: 11x slower than with AVX512 dispatch)
            return False, f"CPU {cap} dispatch (the CPU has {'+'.join(sorted(feats))}, ATen does not use it)"
        if feats:
            return True, f"CPU {cap} with {'+'.join(sorted(feats))}"
        return False, f"CPU {cap} without AVX512_BF16/AMX"
    return False, f"{device.type}: native bf16 not checked"


def resolve_precision(requested: str, device: torch.device | str, *, prefer: str | None = None) -> Precision:
    """Turn ``auto|fp32|bf16|fp16`` into what runs on ``device``.

    ``prefer`` is a precision ``auto`` should keep when the hardware allows (``vistune eval`` of
    an fp32 run stays fp32 on a bf16 machine, so it reproduces the run's own number); ``auto``
    never picks an emulated bf16. An explicit ``bf16`` where it is emulated runs as asked but
    warns once per process, in one line, with the expected cost.
    """
    dev = torch.device(device)
    if requested not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp16":
        if dev.type != "cuda":
            raise PrecisionError(f"fp16 autocast needs a CUDA device (this run is on {dev.type}); "
                                 "use --precision auto, bf16 or fp32")
        return Precision("fp16", requested, "fp16 autocast with a gradient scaler, as asked")
    if requested == "fp32":
        return Precision("fp32", requested, "fp32, as asked")
    native, why = native_bf16(dev)
    if requested == "bf16":
        if not native:
            _warn_once(f"vistune: warning: bf16 autocast is emulated here ({why}): expect it to be about "
                       f"{EMULATED_BF16_SLOWDOWN}x slower than fp32; --precision auto picks fp32 on this machine")
            return Precision("bf16", requested, f"bf16, as asked; emulated ({why})", native=False)
        return Precision("bf16", requested, f"bf16, as asked ({why})")
    if prefer == "fp32":
        return Precision("fp32", requested, "auto: fp32, the precision the run was trained in")
    if prefer == "fp16" and dev.type == "cuda":
        return Precision("fp16", requested, "auto: fp16, the precision the run was trained in")
    if native:
        return Precision("bf16", requested, f"auto: {why}, bf16 autocast runs natively")
    return Precision("fp32", requested, f"auto: {why}, so fp32 (bf16 would be emulated, ~{EMULATED_BF16_SLOWDOWN}x slower)")


@functools.cache
def _warn_once(message: str) -> None:
    """One stderr line per distinct message per process (a sweep's 20 runs warn once)."""
    print(message, file=sys.stderr)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """vistune's version, plus the git commit (and ``.dirty``) when it runs from a checkout, so a
    result made at one code state is never mistaken for one made at another."""
    from vistune import __version__

    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=10", "HEAD"], check=False, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode != 0:
            return __version__
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "."], check=False,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha.stdout.strip()}" + (".dirty" if dirty.stdout.strip() else "")


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """The facts every timing is printed with: CPU model, ATen capability, bf16 support, threads,
    torch, and the vistune code that ran."""
    feats = cpu_features()
    return {
        "cpu": _cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_bf16": "+".join(sorted(feats)) if feats else "none",
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "vistune": code_version(),
    }


def machine_line(precision: str | None = None, threads: int | None = None) -> str:
    """One line naming this machine, for the top of every benchmark table."""
    return format_machine(machine_info(threads), precision)


def format_machine(m: dict[str, Any] | None, precision: str | None = None) -> str:
    """One line from a :func:`machine_info` record (as ``metrics.json`` keeps it)."""
    if not m:
        text = "machine: not recorded (a run written before vistune recorded its machine)"
    else:
        text = (f"machine: {m.get('cpu')}, capability {m.get('cpu_capability')}, native bf16: {m.get('cpu_bf16')}, "
                f"{m.get('threads')} threads, torch {m.get('torch')}")
        if m.get("cuda"):
            text += f", GPU {m['cuda']}"
        if m.get("vistune"):
            text += f", vistune {m['vistune']}"
    if precision:
        text += f", precision {precision}"
    return text


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"

