"""Engine and CLI end to end, on tiny generated image folders (fast, no shared data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.cli import main
from vistune.config import ConfigError, load_config_file, make_config
from vistune.engine.optim import build_optimizer, param_groups, warmup_cosine
from vistune.workflows.train import train


def make_folder(root, classes=3, per_class=8, size=20, seed=0):
    """Images whose class is visible in the mean colour, so a tiny model can learn it."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 3), ("test", 4)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                arr[..., c % 3] += 150
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


def cfg_for(folder, out, **kw):
    base = dict(backbone="test_vit", img_size=32, method="lora", data=f"folder:{folder}", epochs=2,
                batch_size=8, lr=0.05, out=str(out), progress=False, optimizer="sgd", warmup_epochs=0.5)
    base.update(kw)
    return make_config(**base)


def test_train_writes_metrics_and_eval_reproduces(folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "vpt", "-o", "length=2",
               "-o", "deep=true", "--data", f"folder:{folder}", "--epochs", "2", "--batch-size", "8",
               "--lr", "0.1", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("val_top1", "test_top1", "train_seconds", "train_img_per_s", "peak_memory_mb", "tuned_params",
                "head_params", "num_train", "num_test", "skipped_images"):
        assert key in m, key
    assert m["num_train"] == 24 and m["num_test"] == 12 and m["tuned_params"] == 6 * 2 * 64
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["eval", "--tuned", str(out / "tuned.safetensors"), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["test_top1"] == pytest.approx(m["test_top1"], abs=1e-9)


def test_training_learns(folder, tmp_path):
    m = train(cfg_for(folder, tmp_path / "r", method="linear", epochs=15, lr=0.5, optimizer="sgd"))
    # colour-coded classes: linear probing on random features must beat chance (33%) clearly
    assert m["test_top1"] > 60


@pytest.mark.parametrize("method", ["lora", "linear"])
def test_resume_reaches_same_metrics(folder, tmp_path, method):
    full = train(cfg_for(folder, tmp_path / "a", method=method, epochs=3))
    cfg = cfg_for(folder, tmp_path / "b", method=method, epochs=3)
    stopped = train(cfg, stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1}
    assert not (tmp_path / "b" / "metrics.json").exists()
    resumed = train(cfg, resume=True)
    for key in ("val_top1", "test_top1", "test_loss"):
        assert resumed[key] == full[key], key
    la = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


def test_resume_refuses_changed_settings(folder, tmp_path):
    cfg = cfg_for(folder, tmp_path / "b", epochs=3)
    train(cfg, stop_after_epoch=1)
    with pytest.raises(ConfigError, match="lr"):
        train(cfg_for(folder, tmp_path / "b", epochs=3, lr=0.3), resume=True)


def test_fewshot_writes_file_list(folder, tmp_path):
    m = train(cfg_for(folder, tmp_path / "fs", method="linear", shots=2, seed=3, epochs=1))
    assert m["num_train"] == 6
    manifest = json.loads((tmp_path / "fs" / "splits.json").read_text())
    assert "train" in json.dumps(manifest)


def test_bf16_and_accumulation_run(folder, tmp_path):
    m = train(cfg_for(folder, tmp_path / "bf", method="adapter", precision="bf16", accum_steps=2, epochs=1))
    assert m["precision"] == "bf16" and 0 <= m["test_top1"] <= 100


def test_best_val_selection_is_recorded(folder, tmp_path):
    m = train(cfg_for(folder, tmp_path / "bv", method="bitfit", select="best-val", epochs=3))
    assert m["selection"] == "best-val" and m["selected_epoch"] == m["best_val_epoch"]
    log = [json.loads(line) for line in (tmp_path / "bv" / "log.jsonl").read_text().splitlines()]
    assert max(r["val_top1"] for r in log) == m["best_val_top1"]
    assert all("test" not in k for r in log for k in r)  # test never looked at during training


def test_periodic_test_is_labelled(folder, tmp_path):
    train(cfg_for(folder, tmp_path / "pt", method="linear", eval_test_every=1, epochs=2))
    log = [json.loads(line) for line in (tmp_path / "pt" / "log.jsonl").read_text().splitlines()]
    assert all("periodic_test_top1" in r for r in log)


def test_config_file_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("backbone: test_vit\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config_file(p)
    p.write_text("backbone: test_vit\ndata: folder:x\nlr: 0.2\nbatch-size: 4\noptions: {rank: 4}\n")
    cfg = make_config(load_config_file(p), lr=0.3)
    assert cfg.lr == 0.3 and cfg.batch_size == 4 and cfg.options == {"rank": 4}


def test_cli_bad_input_is_one_line_error(folder, tmp_path, capsys):
    rc = main(["train", "--backbone", "test_vit", "--method", "lora", "-o", "rank=0", "--data",
               f"folder:{folder}", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "rank" in err and "Traceback" not in err
    rc = main(["train", "--backbone", "test_vit", "--method", "lora", "--data", f"folder:{tmp_path}/missing",
               "--out", str(tmp_path / "y"), "--no-progress"])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_schedule_and_weight_decay_groups():
    w = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.zeros(4))
    groups = param_groups([w, b], 0.1)
    assert groups[0]["params"] == [w] and groups[0]["weight_decay"] == 0.1
    assert groups[1]["params"] == [b] and groups[1]["weight_decay"] == 0.0
    opt = build_optimizer([w, b], "sgd", 1.0, 0.1)
    sched = warmup_cosine(opt, total_steps=20, warmup_steps=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[4] <= 1.0  # warm-up rises
    assert lrs[4] == pytest.approx(1.0) or lrs[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # cosine never rises
    assert lrs[-1] < 0.05


def test_shipped_configs_are_valid():
    """Every YAML under configs/ uses only known keys and valid values, and its method options parse."""
    from pathlib import Path

    from vistune.methods import get_method, parse_options

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        values = load_config_file(f)
        cfg = make_config(values, data=values.get("data", "folder:unused"))
        parse_options(get_method(cfg.method), cfg.options)
