"""The benchmark scripts run end to end (tiny models): a script that no test runs breaks silently
when the code under it moves. Their numbers are measured on real backbones, not here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import timm

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_table():
    has_peft = importlib.util.find_spec("peft") is not None
    args = ["--backbone", "test_vit", "--img-size", "32", "--rounds", "1", "--steps", "1", "--warmup", "1",
            "--precisions", "fp32"]
    if not has_peft:
        args.append("--no-peft")
    proc = run_script(ROOT / "benchmarks" / "speed.py", *args)
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
    proc = run_script(ROOT / "benchmarks" / "profile_spt.py", "--backbone", "test_vit", "--img-size", "32",
                      "--batch-size", "4", "--rounds", "1", "--top", "3", "--profile", "spt-lora 0.15M",
                      "--variants", "full;lora r8 q,v;spt-lora 0.15M")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert any(line.startswith("spt-lora 0.15M: ") and "op calls" in line for line in out)
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in out if line.startswith("| "))}
    assert rows["lora r8 q,v"][3] == "1.00" and rows["full"][5] == "1.00"  # ratios to LoRA and to full


def test_lora_profile_prints_each_models_gemm_share():
    proc = run_script(ROOT / "benchmarks" / "profile_lora.py", "--backbone", "test_vit", "--img-size", "32",
                      "--steps", "1", "--top", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("machine: ")
    lines = [ln for ln in proc.stdout.splitlines() if "self CPU per step" in ln]
    assert lines[0].startswith("vistune lora r8 q,v: ") and "GEMMs" in lines[0]
    if importlib.util.find_spec("peft") is not None:
        assert lines[1].startswith("peft lora r8 qkv: ")


def _fake_cell(folder: Path, lrs: list[float], chosen: float, values: list[float], tuned: int) -> None:
    """A finished evidence cell as `vistune sweep` leaves it: trials, best, final runs' metrics."""
    import json

    runs = []
    for seed, v in enumerate(values):
        run = folder / "final" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"test_top1": v, "tuned_params": tuned, "head_params": 1925,
                                                      "machine": {"cpu": "x"}, "precision": "fp32"}))
        runs.append({"dir": f"final/seed{seed}", "test_top1": v})
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    (folder / "sweep.json").write_text(json.dumps({
        "trials": [{"params": {"lr": lr}, "value": 50.0 + i} for i, lr in enumerate(lrs)],
        "best": {"params": {"lr": chosen}, "val": 60.0},
        "final": {"mean": mean, "std": std, "metric": "test_top1", "runs": runs}}))


def test_evidence_spt_and_edge_tables(tmp_path):
    """The SPT-vs-base table states each method's own count (not the head's) and SPT minus base,
    starred only beyond both spreads; the grid-edge table says when the choice moved."""
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "benchmarks" / "evidence.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    cells = tmp_path / "matrix" / "dinov2-s14" / "flowers5"
    _fake_cell(cells / "lora", [5e-3, 1e-3], 5e-3, [70.0, 71.0, 72.0], 147_456)
    _fake_cell(cells / "spt-lora", [5e-3, 1e-3], 5e-3, [73.0, 74.0, 75.0], 145_625)
    _fake_cell(cells / "adapter-b16", [5e-3, 1e-3], 1e-3, [70.0, 71.0, 72.0], 152_256)
    _fake_cell(cells / "spt-adapter", [5e-3, 1e-3], 1e-3, [70.5, 71.5, 72.5], 150_134)
    _fake_cell(cells / "full-edge", [5e-4, 1e-4, 2e-5], 2e-5, [60.0, 61.0, 62.0], 21_536_640)
    table = ev.spt_table(tmp_path, ["flowers5"])
    assert "| 0.15M | lora | 147,456 | 71.0 ± 1.0 |" in table
    assert "| 0.15M | spt-lora | 145,625 | 74.0 ± 1.0 |" in table
    assert "| 0.15M | Δ spt-lora − lora | | +3.0* |" in table  # 3.0 > 1.0 + 1.0
    assert "| 0.15M | Δ spt-adapter − adapter-b16 | | +0.5 |" in table  # inside the spreads: no star
    assert "| 0.5M | lora-r27 | - | - |" in table  # a cell not run is a dash, not a missing row
    edges = ev.edge_table(tmp_path, ["flowers5"])
    assert "| full (+2e-05) | flowers5 | 0.0005: 50.0, 0.0001: 51.0, 2e-05: 52.0 | 2e-05 (**moved to the new point**) |" in edges


def test_serve_passes_compares_keys_values_a_padded_pass_and_a_pass_per_prompt_length():
    proc = run_script(ROOT / "benchmarks" / "serve_passes.py", "--backbone", "test_vit", "--img-size", "32",
                      "--rounds", "1", "--pass-cost-tokens", "1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in proc.stdout.splitlines()
                              if line.startswith("| ") and not line.startswith("| batch"))}
    # keys/values: one plain pass; tokens: merged under the policy, split at 0
    assert rows["LV"][2] == "1 / 1 / 2" and rows["LLLL"][2] == "1 / 1 / 1" and rows["VVVV"][2] == "1 / 1 / 1"
    assert rows["LVAl x4"][2] == "1 / 1 / 2" and rows["LLLL"][-1] == "1.00"


def test_cuda_check_runs_its_checks_on_cpu(tmp_path):
    """The GPU machine's check script (benchmarks/cuda_check.py) keeps working on CPU: precision,
    training, exact resume and serving checks all pass (fp16 needs CUDA and is skipped)."""
    proc = run_script(ROOT / "benchmarks" / "cuda_check.py", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "all checks passed" in lines and not any(line.startswith("FAIL") for line in lines)
    for name in ("exact resume on the device", "serve: every row equals its own model on cpu (fp32)",
                 "deep prompts served as keys/values", "train lora --precision auto"):
        assert any(line.startswith(f"ok   {name}") for line in lines), name


def test_calibrate_prints_the_machine_and_both_timings():
    proc = run_script(ROOT / "benchmarks" / "calibrate.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    machine, line = proc.stdout.strip().splitlines()
    assert machine.startswith("machine: ") and "1 threads" in machine
    timings = [float(x) for x in re.findall(r"(\d+\.\d+) s\b", line)]
    assert line.startswith("calibration: ") and len(timings) == 2 and all(t > 0 for t in timings)
