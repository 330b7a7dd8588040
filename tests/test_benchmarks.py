"""The benchmark scripts run end to end (tiny models): a script that no test runs breaks silently
when the code under it moves. Their numbers are measured on real backbones, not here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_table():
    has_peft = importlib.util.find_spec("peft") is not None
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--backbone", "test_vit", "--img-size", "32",
           "--rounds", "1", "--steps", "1", "--warmup", "1", "--precisions", "fp32"]
    if not has_peft:
        cmd.append("--no-peft")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| fp32 |"):
            rows[cells[1]] = cells
    assert rows["full"][3] == "1.00"  # every ratio is against full fine-tuning in the same precision
    machine = next(line for line in proc.stdout.splitlines() if line.startswith("machine: "))
    assert "capability" in machine and "threads" in machine and machine.endswith("precision fp32")
    # LoRA r8 on q and v: blocks x 2 slices x r(d + d), over the linear probe's head (METHODS.md)
    vit = timm.create_model("test_vit", img_size=32)
    d = vit.embed_dim
    lora, linear = (int(rows[k][6].replace(",", "")) for k in ("lora r8 q,v", "linear (no cache)"))
    assert lora - linear == len(vit.blocks) * 2 * 8 * (d + d)
    if has_peft:
        assert "peft lora r8 qkv" in rows
    assert {"spt-lora 0.15M", "spt-adapter 0.15M"} <= set(rows)
    # the sensitivity pass is timed apart from the per-step table (paid once per task)
    sens = next(line for line in proc.stdout.splitlines() if line.startswith("SPT sensitivity pass"))
    assert "1 batch(es) of 32" in sens and "default 16 batches" in sens


def test_spt_profile_prints_ops_and_round_robin_ratios():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_spt.py"), "--backbone", "test_vit", "--img-size", "32",
           "--batch-size", "4", "--rounds", "1", "--top", "3", "--profile", "spt-lora 0.15M",
           "--variants", "full;lora r8 q,v;spt-lora 0.15M"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert any(line.startswith("spt-lora 0.15M: ") and "op calls" in line for line in out)
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in out if line.startswith("| "))}
    assert rows["lora r8 q,v"][3] == "1.00" and rows["full"][5] == "1.00"  # ratios to LoRA and to full


def test_lora_profile_prints_each_models_gemm_share():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_lora.py"), "--backbone", "test_vit", "--img-size", "32",
           "--steps", "1", "--top", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("machine: ")
    lines = [ln for ln in proc.stdout.splitlines() if "self CPU per step" in ln]
    assert lines[0].startswith("vistune lora r8 q,v: ") and "GEMMs" in lines[0]
    if importlib.util.find_spec("peft") is not None:
        assert lines[1].startswith("peft lora r8 qkv: ")
