"""``--compile auto``: compile the training forward only when the run is long enough to repay it.

torch.compile (inductor) takes a one-off compile — tens of seconds to minutes on a CPU — and then
saves a fraction of every step (-3% to +18% per method in bf16, ~14% on an fp32 LoRA step:
benchmarks/RESULTS.md). Whether that pays depends on the run: a 3-epoch sweep trial on 800
images loses, a 30-epoch run on 50k images wins. So the decision is made per run, from numbers:

1. the first steps run eagerly; their wall time per step ``t_e`` is measured (the interval
   between two training forwards: the whole step, data and backward included);
2. the expected gain ``steps_left · t_e · saving`` is compared with the expected compile time.
   ``saving`` and the compile time come from what compiling cost the last time this machine
   compiled the same kind of step (a small JSON cache); before any such record, from the defaults
   below (measured on DINOv2-S, see benchmarks/RESULTS.md);
3. if it compiles, the compile time and the compiled step time are measured and recorded, and
   a compiled step that is not faster than the eager one sends the run back to eager.

Every decision is one ``vistune: compile auto: ...`` line on stderr, with the numbers behind it.
Under DDP every rank takes the same decision from the slowest rank's times (one gather per
decision), so no rank compiles alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.io import write_text_atomic

#: Before this machine has compiled a step of this kind: benchmarks/compile_cost.py on DINOv2-S @112,
#: batch 32, bf16, 2 threads (RESULTS.md) measured compiles of 29-52 s and savings of -3% (full),
#: +4% (LoRA q,v) and +18% (Adapter); fp32 LoRA saved ~14% in the issue-11 table. So: a 50 s
#: compile repaid at 10% per step until this machine has measured its own.
DEFAULT_SECONDS = 50.0
DEFAULT_SAVING = 0.10

#: A compiled step must be at least this much faster than eager to be kept.
MIN_SAVING = 0.02


def cache_path() -> Path:
    """Where measured compile costs are kept (``$VISTUNE_COMPILE_CACHE`` overrides, e.g. in tests)."""
    env = os.environ.get("VISTUNE_COMPILE_CACHE")
    return Path(env) if env else Path("~/.cache/vistune/compile.json").expanduser()


@dataclass(frozen=True)
class Estimate:
    """What compiling a step of one kind costs (seconds, once) and saves (fraction of an eager step)."""

    seconds: float
    saving: float
    measured: bool = False


def load_estimate(key: str, path: Path | None = None) -> Estimate:
    """The last measurement for ``key``, or the defaults; an unreadable cache is ignored (it is a hint)."""
    path = path or cache_path()
    try:
        entry = json.loads(path.read_text())[key]
        return Estimate(float(entry["seconds"]), float(entry["saving"]), measured=True)
    except (OSError, ValueError, KeyError, TypeError):
        return Estimate(DEFAULT_SECONDS, DEFAULT_SAVING)


def save_estimate(key: str, est: Estimate, path: Path | None = None) -> None:
    path = path or cache_path()
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    table[key] = {"seconds": round(est.seconds, 2), "saving": round(est.saving, 4)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    except OSError as err:  # a read-only home must not fail a training run over a hint
        print(f"vistune: compile auto: could not record the measured cost in {path} ({err})", file=sys.stderr)


def should_compile(step_s: float, steps_left: int, est: Estimate) -> bool:
    """True when the time the compiled steps would save exceeds the compile itself."""
    return steps_left * step_s * est.saving > est.seconds


def _median_max(times: list[float], gather: Callable[[Any], list[Any]]) -> float:
    """The median of this rank's step times, the slowest rank's (every rank gets the same number)."""
    return max(float(t) for t in gather(statistics.median(times)))


class AutoCompile:
    """Hands the training step its forward (eager or compiled) and measures as it goes.

    Call :meth:`forward` once per training forward; the interval between two calls is a step.
    States: ``warmup`` (eager, not timed) → ``probe`` (eager, timed) → ``eager`` for good, or
    ``compiling`` (the first compiled step, which carries the compile) → ``check`` (compiled,
    timed) → ``compiled`` for good or back to ``eager``.
    """

    def __init__(self, model: nn.Module, total_steps: int, key: str, *,
                 gather: Callable[[Any], list[Any]] = lambda x: [x], compiler: Callable[[nn.Module], Any] | None = None,
                 warmup: int = 2, probe: int = 3, cache: Path | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.total, self.key = model, total_steps, key
        self.gather, self.compiler, self.cache, self.clock = gather, compiler, cache, clock
        self.warmup, self.probe = warmup, probe
        self.state = "warmup"
        self.calls = 0
        self.last: float | None = None
        self.times: list[float] = []
        self.eager_s = 0.0
        self.compile_step_s = 0.0
        self.compiled_fn: Any = None
        self.report: dict[str, Any] = {"mode": "auto", "decision": "pending"}

    def summary(self) -> dict[str, Any]:
        """The decision and its numbers, for metrics.json (a run too short to measure ran eagerly)."""
        if self.report["decision"] == "pending" and self.state in ("warmup", "probe"):
            return {**self.report, "decision": "eager", "why": "fewer steps than the measurement needs"}
        return dict(self.report)

    def _say(self, text: str) -> None:
        print(f"vistune: compile auto: {text}", file=sys.stderr)

    def forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        now = self.clock()
        interval = None if self.last is None else now - self.last
        self.last = now
        self.calls += 1
        step = getattr(self, f"_on_{self.state}")
        step(interval)
        return self.compiled_fn if self.state in ("compiling", "check", "compiled") else self.model

    # one handler per state; ``interval`` is the previous step's wall time (None on the first call)
    def _on_warmup(self, interval: float | None) -> None:
        if self.calls > self.warmup:
            self.state = "probe"
            self.times = []

    def _measured(self, interval: float | None) -> float | None:
        """Adds this step's time to the measurement under way; once it holds ``probe`` steps, the
        slowest rank's median step time (every rank gets the same number), else None."""
        self.times.append(float(interval or 0.0))
        return _median_max(self.times, self.gather) if len(self.times) >= self.probe else None

    def _on_probe(self, interval: float | None) -> None:
        eager_s = self._measured(interval)
        if eager_s is None:
            return
        self.eager_s = eager_s
        left = self.total - self.calls + 1
        est = load_estimate(self.key, self.cache)
        gain = left * self.eager_s * est.saving
        source = "measured here before" if est.measured else "default, nothing measured on this machine yet"
        why = (f"eager step {self.eager_s:.3f} s x {left} steps left x {est.saving:.0%} saving = {gain:.0f} s "
               f"vs a {est.seconds:.0f} s compile ({source})")
        self.report.update(eager_step_s=round(self.eager_s, 4), steps_left=left, expected_gain_s=round(gain, 1),
                           expected_compile_s=round(est.seconds, 1))
        if should_compile(self.eager_s, left, est):
            self._say(f"{why} -> compiling")
            self.compiled_fn = (self.compiler or torch.compile)(self.model)
            self.state = "compiling"
        else:
            self._say(f"{why} -> staying eager")
            self.report["decision"] = "eager"
            self.state = "eager"

    def _on_eager(self, interval: float | None) -> None:
        pass

    def _on_compiling(self, interval: float | None) -> None:
        # the call that switched ran the first compiled forward: this interval carries the compile
        self.compile_step_s = float(interval or 0.0)
        self.times = []
        self.state = "check"

    def _on_check(self, interval: float | None) -> None:
        compiled_s = self._measured(interval)
        if compiled_s is None:
            return
        compile_s = _median_max([self.compile_step_s], self.gather) - compiled_s  # the slowest rank's
        saving = 1.0 - compiled_s / self.eager_s if self.eager_s > 0 else 0.0
        save_estimate(self.key, Estimate(max(compile_s, 0.0), max(saving, 0.0)), self.cache)
        self.report.update(compile_s=round(compile_s, 1), compiled_step_s=round(compiled_s, 4),
                           saving=round(saving, 4))
        line = (f"compiled in {compile_s:.0f} s; step {compiled_s:.3f} s vs {self.eager_s:.3f} s eager "
                f"({saving:+.0%} saved)")
        if saving < MIN_SAVING:
            self._say(f"{line} -> back to eager (recorded for next time)")
            self.report["decision"] = "eager after trying"
            self.compiled_fn = None
            self.state = "eager"
        else:
            self._say(f"{line} -> kept")
            self.report["decision"] = "compiled"
            self.state = "compiled"

    def _on_compiled(self, interval: float | None) -> None:
        pass
