"""``--compile auto``: the decision follows the measured numbers, and is recorded."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vistune.config import make_config
from vistune.engine.autocompile import (
    DEFAULT_SAVING,
    DEFAULT_SECONDS,
    AutoCompile,
    Estimate,
    load_estimate,
    should_compile,
)


class Clock:
    """A fake perf_counter the test advances by each step's pretend duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(ac: AutoCompile, clock: Clock, durations: list[float]) -> list[object]:
    """Call forward() once per step, each step lasting durations[i]; return what each call handed out."""
    handed = []
    for d in durations:
        handed.append(ac.forward())
        clock.now += d
    return handed


def test_decision_rule_is_gain_versus_compile_time():
    est = Estimate(seconds=60.0, saving=0.2)
    assert should_compile(1.0, 301, est)  # 301 * 1.0 * 0.2 = 60.2 s saved > 60 s
    assert not should_compile(1.0, 300, est)
    assert not should_compile(10.0, 1000, Estimate(60.0, 0.0))  # no saving never compiles


def test_short_run_stays_eager_and_never_compiles(tmp_path, capsys):
    model, clock, compiled = nn.Linear(2, 2), Clock(), []
    ac = AutoCompile(model, total_steps=20, key="k", compiler=lambda m: compiled.append(m) or m,
                     cache=tmp_path / "c.json", clock=clock)
    handed = drive(ac, clock, [1.0] * 20)
    assert compiled == [] and all(h is model for h in handed)
    assert ac.report["decision"] == "eager" and ac.report["eager_step_s"] == pytest.approx(1.0)
    # 20 steps: 2 warm-up + 3 probe, decided at call 6 with 15 left: 15 * 1 * 0.10 < 50
    assert ac.report["steps_left"] == 15
    assert "staying eager" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()  # nothing measured, nothing recorded


def test_long_run_compiles_measures_and_records(tmp_path, capsys):
    model, clock = nn.Linear(2, 2), Clock()
    fast = object()
    cache = tmp_path / "c.json"
    ac = AutoCompile(model, total_steps=1000, key="k", compiler=lambda m: fast, cache=cache, clock=clock)
    # 5 eager steps of 1 s, then the compiling step (40 s compile + 0.7 s), then compiled 0.7 s steps
    handed = drive(ac, clock, [1.0] * 5 + [40.7] + [0.7] * 6)
    assert handed[:5] == [model] * 5 and all(h is fast for h in handed[5:])
    assert ac.report["decision"] == "compiled"
    assert ac.report["compile_s"] == pytest.approx(40.0) and ac.report["saving"] == pytest.approx(0.3)
    assert json.loads(cache.read_text()) == {"k": {"seconds": 40.0, "saving": 0.3}}
    assert load_estimate("k", cache) == Estimate(40.0, 0.3, measured=True)
    err = capsys.readouterr().err
    assert "-> compiling" in err and "-> kept" in err


def test_compiled_step_not_faster_goes_back_to_eager(tmp_path):
    model, clock = nn.Linear(2, 2), Clock()
    slow = object()
    ac = AutoCompile(model, total_steps=1000, key="k", compiler=lambda m: slow, cache=tmp_path / "c.json", clock=clock)
    handed = drive(ac, clock, [1.0] * 5 + [30.0] + [1.0] * 3 + [1.0] * 4)
    assert ac.report["decision"] == "eager after trying"
    assert handed[-1] is model and handed[6] is slow
    # recorded as no saving: the next run of this kind will not try again
    assert not should_compile(1.0, 10_000, load_estimate("k", tmp_path / "c.json"))


def test_ranks_decide_on_the_slowest_rank(tmp_path):
    """Every rank gets the same numbers (the max over ranks), so they cannot disagree."""
    model, clock = nn.Linear(2, 2), Clock()
    calls = []

    def gather(x):  # this rank measured 1 s; another rank is twice as slow
        calls.append(x)
        return [x, 2 * x]

    est_file = tmp_path / "c.json"
    est_file.write_text(json.dumps({"k": {"seconds": 100.0, "saving": 0.5}}))
    ac = AutoCompile(model, total_steps=105, key="k", gather=gather, compiler=lambda m: m, cache=est_file, clock=clock)
    drive(ac, clock, [1.0] * 6)
    # 100 steps left: 100 * 2 s * 0.5 = 100 s is not > 100 s compile; with this rank's 1 s alone even less
    assert ac.report["eager_step_s"] == pytest.approx(2.0) and ac.report["decision"] == "eager"
    assert calls == [pytest.approx(1.0)]


def test_unreadable_cache_falls_back_to_defaults(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    assert load_estimate("k", bad) == Estimate(DEFAULT_SECONDS, DEFAULT_SAVING)
    bad.write_text(json.dumps({"k": {"seconds": "x"}}))
    assert load_estimate("k", bad) == Estimate(DEFAULT_SECONDS, DEFAULT_SAVING)


def test_config_spellings():
    for value, want in (("auto", "auto"), ("on", True), ("off", False), (True, True), ("false", False)):
        assert make_config(backbone="test_vit", data="folder:x", compile=value).compile == want
    with pytest.raises(Exception, match="compile must be on, off or auto, got 'sometimes'"):
        make_config(backbone="test_vit", data="folder:x", compile="sometimes")


def test_dense_task_accepts_auto_but_refuses_on():
    make_config(backbone="test_vit", data="camvid:x", task="segment", compile="auto")
    with pytest.raises(Exception, match="compile is for classification runs only"):
        make_config(backbone="test_vit", data="camvid:x", task="segment", compile="on")


def _folder(root, n=12, size=24):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c, name in enumerate(("a", "b")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n if split == "train" else 3):
                arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                arr[..., c] += 150
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_auto_in_a_real_run_records_its_decision(tmp_path, monkeypatch, capsys):
    """A short classification run with compile=auto stays eager (the default estimate cannot be
    repaid in 9 steps) and says so, with its numbers, on stderr and in metrics.json; torch.compile
    is never called."""
    from vistune.workflows.train import train

    monkeypatch.setenv("VISTUNE_COMPILE_CACHE", str(tmp_path / "compile.json"))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled a short run"))
    cfg = make_config(backbone="test_vit", img_size=32, method="lora", data=f"folder:{_folder(tmp_path / 'd')}",
                      epochs=3, batch_size=8, lr=0.05, out=str(tmp_path / "run"), progress=False, compile="auto")
    metrics = train(cfg)
    assert metrics["compile"]["mode"] == "auto" and metrics["compile"]["decision"] == "eager"
    assert metrics["compile"]["steps_left"] == 9 - 6 + 1  # 3 batches x 3 epochs, decided at the 6th
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["compile"]["decision"] == "eager"
    assert "compile auto: eager step" in capsys.readouterr().err
