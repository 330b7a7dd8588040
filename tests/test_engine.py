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


def make_folder(root, classes=3, per_class=8, size=20, seed=0, test=4):
    """Images whose class is visible in the mean colour, so a tiny model can learn it.
    ``classes``: a count (folders class0, class1, ...) or the folder names themselves."""
    names = [f"class{c}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 3), ("test", test)):
        for c, name in enumerate(names):
            d = root / split / name
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


# ------------------------------------------------------------------------------ one loop, every task


def test_dense_run_resumes_exactly(tmp_path):
    """Segmentation on the same loop as classification: stop after epoch 1, resume, same numbers."""
    import dataclasses

    from tests.test_dense import make_camvid, tiny_cfg

    root = make_camvid(tmp_path / "cv")
    base = dataclasses.replace(tiny_cfg(tmp_path, f"camvid:{root}", method="lora", epochs=3), task="segment")
    full = train(dataclasses.replace(base, out=str(tmp_path / "a")))
    cfg = dataclasses.replace(base, out=str(tmp_path / "b"))
    assert train(cfg, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    assert not (tmp_path / "b" / "metrics.json").exists() and (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = train(cfg, resume=True)
    for key in ("val_miou", "test_miou", "test_pixel_acc"):
        assert resumed[key] == full[key], key
    la = [json.loads(x)["train_loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["train_loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 3


def test_log_is_rewritten_from_checkpoint_on_resume(folder, tmp_path):
    """``--checkpoint-every N``: epochs that ran after the last checkpoint run again on resume;
    they must not appear twice in the log."""
    cfg = cfg_for(folder, tmp_path / "r", method="linear", epochs=3, checkpoint_every=10)
    train(cfg, stop_after_epoch=1)
    log = tmp_path / "r" / "log.jsonl"
    # an epoch that ran after the checkpoint and was logged, then the process died
    log.write_text(log.read_text() + json.dumps({"epoch": 2, "train_loss": 9.9}) + "\n")
    train(cfg, resume=True)
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert all(json.loads(x)["train_loss"] != 9.9 for x in log.read_text().splitlines())


@pytest.mark.parametrize("method,optimizer,precision", [("lora", "sgd", "fp32"), ("linear", "sgd", "bf16"),
                                                        ("full", "sgd", "fp32")])
def test_diverging_run_stops_and_writes_no_model(folder, tmp_path, capsys, method, optimizer, precision):
    import vistune.precision

    # bf16 here is emulated (conftest), which warns once per process: clear that memory so this
    # test sees the same lines whichever tests ran before it in this worker
    vistune.precision._warn_once.cache_clear()
    out = tmp_path / "nan"
    rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", method, "--data", f"folder:{folder}",
               "--epochs", "3", "--batch-size", "8", "--lr", "1e8", "--clip-grad", "0", "--optimizer", optimizer,
               "--precision", precision, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("vistune: warning:")]
    assert len(warnings) == (precision == "bf16") and all("bf16 autocast is emulated" in w for w in warnings)
    err = [line for line in err if line not in warnings]
    assert rc == 2 and len(err) == 1 and "diverged" in err[0] and "lower the learning rate" in err[0]
    assert not (out / "tuned.safetensors").exists() and not (out / "metrics.json").exists()


def test_non_finite_settings_are_refused_at_parse_time(folder, tmp_path, capsys):
    for extra in (["--lr", "nan"], ["--wd", "-0.1"], ["--warmup-epochs", "-1"], ["--clip-grad", "-1"],
                  ["--method", "lora", "-o", "alpha=nan"], ["--head-lr", "inf"]):
        argv = ["train", "--backbone", "test_vit", "--img-size", "32", "--method", "lora", "--data",
                f"folder:{folder}", "--out", str(tmp_path / "x"), "--no-progress", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], extra
    assert not (tmp_path / "x").exists()


def test_tuned_file_with_nan_is_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from vistune.errors import TunedFileError
    from vistune.workflows.train import evaluate_run

    train(cfg_for(folder, tmp_path / "r", method="lora", epochs=1))
    path = tmp_path / "r" / "tuned.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if ".lora." in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(TunedFileError, match="NaN"):
        evaluate_run(tmp_path / "r")


# ------------------------------------------------------------------------------ output folders


def test_second_run_into_a_busy_folder_is_refused(folder, tmp_path):
    import fcntl
    import os

    from vistune.engine.rundir import LOCK_NAME, RunDirError

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "started": "now"}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds the folder (flock is per open file)
    try:
        with pytest.raises(RunDirError, match="in use by another run.*pid 4242 on elsewhere"):
            train(cfg_for(folder, out, method="linear", epochs=1))
    finally:
        os.close(fd)
    assert not (out / "log.jsonl").exists()
    train(cfg_for(folder, out, method="linear", epochs=1))  # free again: the lock died with its holder


def test_finished_run_is_not_overwritten_without_flag(folder, tmp_path):
    from vistune.engine.rundir import RunDirError

    out = tmp_path / "done"
    first = train(cfg_for(folder, out, method="linear", epochs=1))
    model = (out / "tuned.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="--overwrite"):
        train(cfg_for(folder, out, method="linear", epochs=2))
    assert (out / "tuned.safetensors").read_bytes() == model
    (out / "tuned.safetensors.abc123.tmp").write_text("orphan of a killed writer")
    second = train(cfg_for(folder, out, method="linear", epochs=2), overwrite=True)
    assert second["epochs"] == 2 and first["epochs"] == 1
    assert not list(out.glob("*.tmp"))
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_files_respect_the_umask(folder, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        train(cfg_for(folder, tmp_path / "u", method="linear", epochs=1))
    finally:
        os.umask(old)
    for name in ("tuned.safetensors", "metrics.json", "splits.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / "u" / name).stat().st_mode) == 0o644, name


def test_metrics_json_is_strict_json(folder, tmp_path):
    m = train(cfg_for(folder, tmp_path / "j", method="linear", epochs=1))
    text = (tmp_path / "j" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json"))
    assert m["world_size"] == 1 and m["task"] == "classify"


def test_eval_refuses_data_with_other_class_names(folder, tmp_path, capsys):
    train(cfg_for(folder, tmp_path / "r", method="linear", epochs=1))
    other = make_folder(tmp_path / "other", classes=3)
    for split in ("train", "val", "test"):
        for i in range(3):
            (other / split / f"class{i}").rename(other / split / f"kind{i}")
    rc = main(["eval", "--tuned", str(tmp_path / "r"), "--data", f"folder:{other}", "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained on [class0, class1, class2]" in err
    assert main(["eval", "--tuned", str(tmp_path / "r"), "--data", f"folder:{other}", "--allow-class-mismatch",
                 "--json"]) == 0


# ------------------------------------------------------------------------------ head initialisation


@pytest.mark.parametrize("method", ["linear", "bitfit", "vpt", "lora", "adapter", "spt", "protuning", "full"])
def test_prototype_head_init_for_every_method(folder, tmp_path, method):
    """The head starts as the normalised class means of the method's own starting features."""
    from vistune.engine.distributed import Dist
    from vistune.tasks.classify import PROTOTYPE_SCALE, ClassifyTask

    options = {"spt": {"budget": "2k"}, "vpt": {"length": 2}}.get(method, {})
    cfg = cfg_for(folder, tmp_path / method, method=method, options=options, head_init="prototypes")
    task = ClassifyTask()
    task.setup(cfg, Dist(), tmp_path / method)
    task.tuned.eval()
    x = torch.stack([task.data.train[i][0] for i in range(len(task.data.train))])
    y = torch.tensor([task.data.train[i][1] for i in range(len(task.data.train))])
    with torch.no_grad():
        feats = task.tuned.forward_features(x)
    w = task.head.weight.detach()
    for c in range(task.data.num_classes):
        mean = torch.nn.functional.normalize(feats[y == c], dim=1).mean(0)
        assert torch.nn.functional.cosine_similarity(w[c], mean, dim=0) > 0.9999
    assert w.norm(dim=1).mean() * feats.norm(dim=1).mean() == pytest.approx(PROTOTYPE_SCALE, rel=1e-4)
    assert torch.count_nonzero(task.head.bias) == 0
    with torch.no_grad():  # nearest-prototype classification of the training images themselves
        acc = (task.tuned(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6  # colour-coded classes; chance is 1/3


def test_zero_head_init_and_bad_value(folder, tmp_path):
    from vistune.config import ConfigError
    from vistune.engine.distributed import Dist
    from vistune.tasks.classify import ClassifyTask

    task = ClassifyTask()
    task.setup(cfg_for(folder, tmp_path / "z", method="lora", head_init="zeros"), Dist(), tmp_path / "z")
    assert torch.count_nonzero(task.head.weight) == 0 and torch.count_nonzero(task.head.bias) == 0
    with pytest.raises(ConfigError, match="head_init"):
        cfg_for(folder, tmp_path / "b", head_init="ones")


def test_vtab_subset_draws_train_and_val_from_the_training_pool(tmp_path):
    data = make_folder(tmp_path / "d", classes=3, per_class=8)
    m = train(cfg_for(data, tmp_path / "s", method="linear", epochs=1, subset="10/5"))
    assert (m["num_train"], m["num_val"], m["num_test"]) == (10, 5, 12)
    split = json.loads((tmp_path / "s" / "splits.json").read_text())
    train_ids, val_ids = set(split["splits"]["train"]["ids"]), set(split["splits"]["val"]["ids"])
    assert not train_ids & val_ids and all(i.startswith("train/") for i in train_ids | val_ids)
    m2 = train(cfg_for(data, tmp_path / "t", method="linear", epochs=1, subset="10/5", trainval=True, seed=7))
    assert (m2["num_train"], m2["num_val"]) == (15, 0)  # the final protocol trains on all of them
    split2 = json.loads((tmp_path / "t" / "splits.json").read_text())
    assert set(split2["splits"]["train"]["ids"]) == train_ids | val_ids  # the same 15 whatever the seed


def test_compiled_training_matches_eager(folder, tmp_path, monkeypatch):
    """--compile changes how the step runs, not what it computes: same losses to float rounding,
    and the tuned file holds the eager model's own keys (no torch.compile wrapper prefix).

    The run's ``torch.compile`` traces with dynamo and AOT autograd (where a method's forward or
    its gradients could go wrong) but hands the graphs to ``aot_eager`` instead of inductor: what
    is vistune's here is the tracing and the wrapper, not inductor's kernels, and inductor's cold
    C++ compile took 70-78 s of this test on a fresh machine (2-core AVX2 EPYC). Inductor itself
    is measured by benchmarks/compile_cost.py."""
    import functools

    from safetensors import safe_open

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = train(cfg_for(folder, tmp_path / "eager", epochs=2))
    compiled = train(cfg_for(folder, tmp_path / "compiled", epochs=2, compile=True))
    for a, b in zip(*[[json.loads(line)["train_loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                      for d in ("eager", "compiled")]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
    assert abs(eager["test_loss"] - compiled["test_loss"]) <= 1e-4 * max(1.0, abs(eager["test_loss"]))
    keys = [sorted(safe_open(str(tmp_path / d / "tuned.safetensors"), "pt").keys()) for d in ("eager", "compiled")]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])


def test_compile_is_refused_for_dense_tasks(tmp_path):
    with pytest.raises(ConfigError, match="compile is for classification runs only"):
        make_config(backbone="test_vit", data="camvid:x", task="segment", compile=True, out=str(tmp_path))
